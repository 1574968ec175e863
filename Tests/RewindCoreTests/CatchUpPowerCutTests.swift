import Foundation
import Glibc
import Testing
@testable import RewindCore
import RewindWorkload

/// A power cut during a replica's catch-up (K9), not a SIGKILL: the page cache is lost too
/// (`PowerCutStorage` keeps only what was synced, and a random part of the rest, torn at
/// 512 bytes). After the reboot the replica reads as its previous point d or as the catch-up's
/// point s, byte for byte — never a mix — and as s whenever `CatchUpWriter.finish` returned
/// before the cut (the receiver acks then, and the sender drops what it kept for the peer).
/// Its journal verifies, and one left at d takes the catch-up again.
@Suite(.serialized) struct CatchUpPowerCutTests {
    static func latest(_ m: Mirror) throws -> [UInt8] {
        let snapshot = try Snapshot(mirror: m, point: .latest)
        defer { snapshot.close() }
        return try snapshot.read(at: 0, count: Int(m.volumeSize))
    }

    @Test func aPowerCutLeavesThePreviousPointOrTheCatchUp() throws {
        let root = PowerCutSimulation.makeDirectory()
        defer { removeTree(root) }
        let bs = 4096
        try writeFile(root + "/seed.img", halfFilledVolume(blockSize: bs, mul: 13, add: 5))
        let origin = try Mirror.create(at: root + "/origin.rewind", from: root + "/seed.img", blockSize: bs)
        let pristine = root + "/pristine"
        mkdir(pristine, 0o755)
        var rng = SplitMix(seed: 20_261_207)
        let d: UInt64
        do {
            let replica = try Mirror.create(at: pristine + "/b.rewind", from: root + "/seed.img", blockSize: bs)
            let shared = (0..<20).map { _ in randomChange(&rng, size: origin.volumeSize, blockSize: bs) }
            _ = try origin.append(shared)
            d = try replica.append(shared).upperBound
        }
        var dirty = DirtySet()
        for _ in 0..<40 {
            let c = randomChange(&rng, size: origin.volumeSize, blockSize: bs)
            _ = try origin.append([c])
            let blocks = CatchUpTests.blocks(of: c, blockSize: bs)
            if !blocks.isEmpty { dirty.insert(blocks) }
        }
        let s = try origin.meta().lastSeq
        func image(_ seq: UInt64) throws -> [UInt8] {
            let snapshot = try Snapshot(mirror: origin, point: .seq(seq))
            defer { snapshot.close() }
            return try snapshot.read(at: 0, count: Int(origin.volumeSize))
        }
        let atD = try image(d), atS = try image(s)
        let snapshot = try Snapshot(mirror: origin, point: .seq(s))
        let runs = try snapshot.catchUpRuns(for: dirty)
        var pieces: [[UInt8]] = []
        try snapshot.forEachCatchUpData(runs, maxBytes: 2 * bs) { pieces.append([UInt8]($0)) }
        snapshot.close()
        let time = try origin.journal.env.read { try origin.journal.header($0, seq: s).timestamp }
        #expect(runs.count > 3 && pieces.count > 3 && atD != atS)

        let live = root + "/live"
        let storage = PowerCutStorage(root: live + "/")
        Storage.install(storage)
        defer { Storage.remove(storage) }
        var landed = (previous: 0, catchUp: 0, afterFinish: 0)
        for round in 0..<150 {
            removeTree(live)
            try FileManager.default.copyItem(atPath: pristine, toPath: live)
            let mode = round % 3
            var finished = false
            weak var previous: Mirror?
            do {
                let m = try Mirror.open(at: live + "/b.rewind", recover: true)
                previous = m
                let w = try CatchUpWriter(mirror: m, from: d, seq: s, timestamp: time, runs: runs)
                switch mode {
                case 0:  // during the data
                    let k = Int.random(in: 0...pieces.count, using: &rng)
                    for (i, p) in pieces.enumerated() {
                        if i == k { storage.cut() }
                        try? p.withUnsafeBytes { try w.write($0) }
                    }
                    if k == pieces.count { storage.cut() }
                    finished = (try? w.finish()) != nil
                case 1:  // at a random instant of `finish` (the log's sync, the commit, its sync)
                    for p in pieces { try p.withUnsafeBytes { try w.write($0) } }
                    let timer = DispatchGroup()
                    timer.enter()
                    DispatchQueue.global().asyncAfter(deadline: .now() + .microseconds(Int.random(in: 0..<400, using: &rng))) {
                        storage.cut()
                        timer.leave()
                    }
                    finished = (try? w.finish()) != nil
                    timer.wait()
                default:  // after it returned
                    for p in pieces { try p.withUnsafeBytes { try w.write($0) } }
                    try w.finish()
                    finished = true
                    storage.cut()
                }
                if !finished { w.abandon() }
            }
            try PowerCutSimulation.waitUntilClosed { previous == nil }
            storage.reboot(using: &rng)
            let m = try Mirror.open(at: live + "/b.rewind", recover: true)
            let last = try m.meta().lastSeq
            #expect(last == d || last == s, "round \(round): the replica ends at seq:\(last)")
            if finished { #expect(last == s, "round \(round): a catch-up finish returned for is lost") }
            let latest = try Self.latest(m)
            #expect(latest == (last == s ? atS : atD), "round \(round): the replica at seq:\(last) reads as a mix")
            _ = try m.verify()
            if last == d {
                landed.previous += 1
                if round % 10 == 0 {  // the log's tail is usable: the catch-up is taken again
                    let w = try CatchUpWriter(mirror: m, from: d, seq: s, timestamp: time, runs: runs)
                    for p in pieces { try p.withUnsafeBytes { try w.write($0) } }
                    try w.finish()
                    #expect(try Self.latest(m) == atS)
                    _ = try m.verify()
                }
            } else if finished {
                landed.afterFinish += 1
            } else {
                landed.catchUp += 1
            }
        }
        print("catch-up power cuts: \(landed.previous) at the previous point, \(landed.catchUp) at the catch-up though finish had not returned, \(landed.afterFinish) after finish returned")
        #expect(landed.previous > 0 && landed.afterFinish > 0)
    }
}
