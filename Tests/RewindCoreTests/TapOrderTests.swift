import Foundation
import Glibc
import Synchronization
import Testing
@testable import RewindCore

/// What `rewind tap` relies on from the core: `WriteOrder` (requests sharing a block run one
/// at a time, in arrival order; the rest together) and `Mirror.reconcile` (the start's
/// comparison with the upstream journals exactly the blocks that differ).
@Suite struct TapOrderTests {
    /// Invariant: at every moment no two started-and-not-left requests share a block; two
    /// requests sharing a block start in the order they entered; every request starts once
    /// every earlier one has left. Random ranges (unaligned, some spanning blocks), random
    /// order of leaving, 300 rounds.
    @Test func writeOrderModel() {
        var rng = SystemRandomNumberGenerator()
        for round in 0..<300 {
            let bs = 4096
            let order = WriteOrder(blockSize: bs)
            // Started requests (id → block range), the order starts happened in, all entered.
            let started = Mutex<[(id: UInt64, blocks: Range<UInt64>)]>([])
            let starts = Mutex<[UInt64]>([])
            let violations = Mutex<[String]>([])
            var entered: [(id: UInt64, blocks: Range<UInt64>)] = []
            let count = Int.random(in: 1...40, using: &rng)
            var pendingLeaves: [UInt64] = []
            for i in 0..<count {
                let offset = UInt64.random(in: 0..<(64 * UInt64(bs)), using: &rng)
                let length = UInt64.random(in: 1...UInt64(3 * bs), using: &rng)
                let range = offset..<offset + length
                let blocks = offset / UInt64(bs)..<(offset + length + UInt64(bs) - 1) / UInt64(bs)
                entered.append((UInt64(i + 1), blocks))
                order.enter(range) { id in
                    started.withLock { s in
                        if let other = s.first(where: { $0.blocks.overlaps(blocks) }) {
                            violations.withLock { $0.append("round \(round): \(id) started while \(other.id) shares a block") }
                        }
                        s.append((id, blocks))
                    }
                    starts.withLock { $0.append(id) }
                }
                // Sometimes leave a random started request between entries.
                let running = started.withLock { $0.map(\.id) }.filter { !pendingLeaves.contains($0) }
                if let id = running.randomElement(using: &rng), Bool.random(using: &rng) {
                    started.withLock { $0.removeAll { $0.id == id } }
                    pendingLeaves.append(id)
                    order.leave(id)
                }
            }
            // Leave the rest, in random order, until all have started and left.
            var guardCount = 0
            while true {
                let running = started.withLock { $0.map(\.id) }
                guard let id = running.randomElement(using: &rng) else { break }
                started.withLock { $0.removeAll { $0.id == id } }
                order.leave(id)
                guardCount += 1
                #expect(guardCount <= count)
                if guardCount > count { break }
            }
            #expect(violations.withLock { $0 } == [])
            let sequence = starts.withLock { $0 }
            #expect(Set(sequence).count == count, "round \(round): \(sequence.count) of \(count) started")
            #expect(order.count == 0)
            // Sharing a block: started in the order entered.
            for a in entered { for b in entered where a.id < b.id && a.blocks.overlaps(b.blocks) {
                let ia = sequence.firstIndex(of: a.id) ?? -1, ib = sequence.firstIndex(of: b.id) ?? -1
                #expect(ia < ib, "round \(round): \(a.id) and \(b.id) share a block but started \(ib) before \(ia)")
            } }
        }
    }

    /// Invariant: after `reconcile`, the latest point equals the image byte for byte; every
    /// earlier point reads as before; the new records are writes of exactly the differing
    /// blocks (joined into runs); an image equal to the mirror adds nothing.
    @Test func reconcileJournalsExactlyTheDifferingBlocks() throws {
        let dir = TempDir("reconcile")
        defer { dir.remove() }
        let bs = 4096, blocks = 512
        var image = [UInt8](repeating: 0, count: bs * blocks)
        for i in 0..<image.count / 3 { image[i] = UInt8(truncatingIfNeeded: i &* 7 &+ 3) }
        let imagePath = dir.file("img")
        try Data(image).write(to: URL(fileURLWithPath: imagePath))
        let mirror = try Mirror.create(at: dir.file("m"), from: imagePath, blockSize: bs)
        // Some history: writes through the journal, the same in the image.
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<20 {
            let off = Int.random(in: 0..<(image.count - 9000), using: &rng), n = Int.random(in: 1...9000, using: &rng)
            let data = (0..<n).map { _ in UInt8.random(in: 0...255, using: &rng) }
            try mirror.append([.write(UInt64(off), data)])
            image.replaceSubrange(off..<off + n, with: data)
        }
        let before = try mirror.meta().lastSeq
        let points = try (0...before).map { try readAll(mirror, at: .seq($0)) }
        // Nothing differs: nothing is journalled.
        try Data(image).write(to: URL(fileURLWithPath: imagePath))
        let same = try mirror.reconcile(with: BlockFile(path: imagePath, mode: .readOnly))
        #expect(same.records == nil && same.differingBlocks == 0 && same.comparedBytes == UInt64(image.count))
        // Bypassing writes: single bytes, a run of blocks, the last block.
        var differing = Set<Int>()
        for _ in 0..<15 {
            let at = Int.random(in: 0..<image.count, using: &rng)
            image[at] &+= 1
            differing.insert(at / bs)
        }
        for b in 100..<140 { image[b * bs + 5] &+= 1; differing.insert(b) }
        image[image.count - 1] &+= 1; differing.insert(blocks - 1)
        try Data(image).write(to: URL(fileURLWithPath: imagePath))
        let report = try mirror.reconcile(with: BlockFile(path: imagePath, mode: .readOnly))
        #expect(report.comparedAt == before)
        #expect(report.differingBlocks == UInt64(differing.count))
        #expect(try readAll(mirror, at: .latest) == image)
        for seq in 0...before { #expect(try readAll(mirror, at: .seq(seq)) == points[Int(seq)], "seq:\(seq) changed") }
        // The records: writes of exactly those blocks, consecutive ones joined.
        let records = try #require(report.records)
        #expect(records.lowerBound == before + 1)
        var covered = Set<Int>()
        for seq in records {
            let h = try mirror.journal.env.read { try mirror.journal.header($0, seq: seq) }
            #expect(h.kind == .write && h.offset % UInt64(bs) == 0 && h.length % UInt64(bs) == 0)
            for b in Int(h.offset) / bs..<Int(h.offset + h.length) / bs { covered.insert(b) }
        }
        #expect(covered == differing)
        #expect(records.count < differing.count, "runs of differing blocks were not joined")
        // A volume of another size is refused.
        let other = dir.file("other")
        try Data(count: bs).write(to: URL(fileURLWithPath: other))
        #expect(throws: RewindError.self) { try mirror.reconcile(with: BlockFile(path: other, mode: .readOnly)) }
    }
}
