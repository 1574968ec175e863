import Foundation
import Glibc
import Testing
@testable import RewindCore

/// A catch-up is not bounded by a 32-bit length: one of more than 4 GiB of data is stored,
/// indexed, read at every point of its payload, verified and sent on, and the runs of one too
/// many for a frame are joined without losing a block.
@Suite struct LargeCatchUpTests {
    /// The content of block `b` in the large catch-up: a byte derived from b, with b itself in
    /// its first and last 8 bytes (a block read from the wrong place cannot pass).
    static func fill(_ piece: UnsafeMutableRawBufferPointer, firstBlock: UInt64, blockSize: Int) {
        for i in 0..<piece.count / blockSize {
            let b = firstBlock + UInt64(i)
            let block = UnsafeMutableRawBufferPointer(rebasing: piece[i * blockSize..<(i + 1) * blockSize])
            memset(block.baseAddress!, Int32(b &* 0x9E37_79B9_7F4A_7C15 >> 56) | 1, blockSize)  // (a debug build loops byte by byte otherwise)
            block.storeBytes(of: b, toByteOffset: 0, as: UInt64.self)
            block.storeBytes(of: b, toByteOffset: blockSize - 8, as: UInt64.self)
        }
    }

    @Test func aCatchUpOfMoreThan4GiB() throws {
        // On tmpfs when it has room: 4.3 GiB synced to a disk would cost the suite ~15 s.
        let root = statfsFree("/dev/shm") > 8 << 30 ? "/dev/shm" : "/tmp"
        var template = Array("\(root)/rewind-test-large-XXXXXX".utf8CString)
        guard let made = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            Issue.record("no temporary directory under \(root)"); return
        }
        let dir = String(cString: made)
        defer { removeTree(dir) }
        let bs = 64 << 10
        let dataBlocks: UInt64 = 39_999 + 29_990
        let runs = [CatchUpRun(1..<40_000), CatchUpRun(40_000..<40_010, zero: true), CatchUpRun(40_010..<70_000)]
        func expectBlocks(_ mirror: Mirror, sourceLocation: SourceLocation = #_sourceLocation) throws {
            let snapshot = try Snapshot(mirror: mirror, point: .seq(9))
            defer { snapshot.close() }
            var got = [UInt8](repeating: 0, count: bs), want = [UInt8](repeating: 0, count: bs)
            for block: UInt64 in [0, 1, 39_999, 40_000, 40_009, 40_010, 65_600, 69_999, 70_000, 81_919] {
                try got.withUnsafeMutableBytes { try snapshot.read(at: block * UInt64(bs), into: $0) }
                want.withUnsafeMutableBytes { w in
                    switch block {
                    case 0: memset(w.baseAddress!, 7, bs)
                    case 1..<40_000, 40_010..<70_000: Self.fill(w, firstBlock: block, blockSize: bs)
                    default: memset(w.baseAddress!, 0, bs)
                    }
                }
                #expect(got == want, "block \(block)", sourceLocation: sourceLocation)
            }
        }
        do {
            let m = try Mirror.create(at: dir + "/m.rewind", size: 81_920 * UInt64(bs), blockSize: bs)
            try m.append([.write(0, [UInt8](repeating: 7, count: bs))])
            let writer = try CatchUpWriter(mirror: m, from: 1, seq: 9, timestamp: try m.meta().lastTime, runs: runs)
            let piece = UnsafeMutableRawBufferPointer.allocate(byteCount: 64 * bs, alignment: 4096)
            defer { piece.deallocate() }
            for run in runs where !run.zero {
                var at = run.blocks.lowerBound
                while at < run.blocks.upperBound {
                    let n = Int(min(64, run.blocks.upperBound - at))
                    let part = UnsafeMutableRawBufferPointer(rebasing: piece[0..<n * bs])
                    Self.fill(part, firstBlock: at, blockSize: bs)
                    try writer.write(UnsafeRawBufferPointer(part))
                    at += UInt64(n)
                }
            }
            let checksum = try writer.finish()
            let stored = (UInt64(CatchUp.listBlocks(runs: 3, blockSize: bs)) + dataBlocks) * UInt64(bs)
            #expect(stored > UInt64(UInt32.max))
            let h = try m.journal.env.read { try m.journal.header($0, seq: 9) }
            #expect(h.kind == .catchUp && h.storedBytes == stored && h.checksum == checksum && h.length == 70_000 - 1)
            #expect(h.segmentOffset == 1)  // the stored length's high 32 bits

            try expectBlocks(m)
            let report = try m.verify()
            #expect(report.payloadBytes == UInt64(bs) + stored)

            // Sent on (a cascade) in pieces, checked against its checksum as it is read.
            var sent: UInt64 = 0, listed: [CatchUpRun] = []
            try m.forEachCatchUpData(seq: 9, runs: { listed = $0 }, data: { sent += UInt64($0.count) })
            #expect(listed == runs && sent == dataBlocks * UInt64(bs))
        }
        // Reopened (log replay leaves an indexed catch-up alone), it reads the same.
        let again = try Mirror.open(at: dir + "/m.rewind")
        #expect(try again.meta().lastSeq == 9)
        try expectBlocks(again)
    }

    /// Past the runs one frame holds, the runs with the smallest gaps are joined: the result
    /// fits, covers every block of the original runs, sends zeros as zeros only where every
    /// joined block was a zero run, and joins no gap wider than one it keeps.
    @Test func runsJoinedToFitAFrame() throws {
        var rng = SplitMix(seed: 41)
        for round in 0..<200 {
            var runs: [CatchUpRun] = []
            var at: UInt64 = 0
            for _ in 0..<Int(rng.next() % 300) + 1 {
                at += rng.next() % 40
                let n = rng.next() % 12 + 1
                let zero = rng.next() % 3 == 0
                if let last = runs.last, last.blocks.upperBound == at, last.zero == zero { at += 1 }
                runs.append(CatchUpRun(at..<at + n, zero: zero))
                at += n
            }
            let maxRuns = Int(rng.next() % UInt64(runs.count)) + 1
            let joined = CatchUp.coalesce(runs, maxRuns: maxRuns)
            #expect(joined.count <= maxRuns, "round \(round)")
            #expect(throws: Never.self) { try CatchUp.check(joined, volumeBlocks: at) }
            var j = 0
            var widestJoined: UInt64 = 0
            for r in runs {
                while j < joined.count && joined[j].blocks.upperBound <= r.blocks.lowerBound { j += 1 }
                guard j < joined.count, joined[j].blocks.lowerBound <= r.blocks.lowerBound,
                      joined[j].blocks.upperBound >= r.blocks.upperBound else {
                    Issue.record("round \(round): run \(r.blocks) lost"); break
                }
                if joined[j].zero { #expect(r.zero && joined[j].blocks == r.blocks, "round \(round)") }
            }
            for (a, b) in zip(runs, runs.dropFirst()) {
                let gap = b.blocks.lowerBound - a.blocks.upperBound
                if joined.contains(where: { $0.blocks.contains(a.blocks.lowerBound) && $0.blocks.contains(b.blocks.lowerBound) }) {
                    widestJoined = max(widestJoined, gap)
                }
            }
            for (a, b) in zip(joined, joined.dropFirst()) {
                #expect(b.blocks.lowerBound - a.blocks.upperBound >= widestJoined, "round \(round): a narrower gap kept")
            }
            if runs.count <= maxRuns { #expect(joined == runs) }
        }
    }
}

/// Free bytes on the file system holding `path` (0 when it cannot be asked).
func statfsFree(_ path: String) -> UInt64 {
    var s = statvfs()
    guard statvfs(path, &s) == 0 else { return 0 }
    return UInt64(s.f_bavail) * UInt64(s.f_frsize)
}
