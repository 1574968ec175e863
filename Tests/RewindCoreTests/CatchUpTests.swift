import Foundation
import Glibc
import Testing
@testable import RewindCore

/// A replica's consistent catch-up (K9): the blocks changed by records the origin folded
/// before the replica got them, sent as of the origin's horizon and applied as one record —
/// the replica goes from its point d straight to the origin's point s, keeps its history
/// before d, and never reads as a mix.
@Suite struct CatchUpTests {
    static let bs = 4096

    /// The blocks a change touches.
    static func blocks(of c: Change, blockSize: Int) -> Range<UInt64> {
        let bs = UInt64(blockSize)
        guard c.kind != .flush, c.length > 0 else { return 0..<0 }
        return c.offset / bs..<(c.offset + c.length + bs - 1) / bs
    }

    /// Write a catch-up of `dirty` from `origin` (its point `seq`) into `replica`.
    static func catchUp(_ replica: Mirror, from origin: Mirror, at seq: UInt64, dirty: DirtySet,
                        abandonAfter: Int? = nil) throws -> (runs: [CatchUpRun], checksum: UInt64?) {
        let snapshot = try Snapshot(mirror: origin, point: .seq(seq))
        defer { snapshot.close() }
        let runs = try snapshot.catchUpRuns(for: dirty)
        let om = try origin.meta()
        let time = seq == om.horizon ? om.horizonTime : try origin.journal.env.read { try origin.journal.header($0, seq: seq).timestamp }
        let writer = try CatchUpWriter(mirror: replica, from: try replica.meta().lastSeq, seq: seq, timestamp: time, runs: runs)
        var pieces = 0
        var abandoned = false
        try snapshot.forEachCatchUpData(runs, maxBytes: 3 * bs) { piece in
            if let limit = abandonAfter, pieces >= limit { abandoned = true; return }
            try writer.write(piece)
            pieces += 1
        }
        if abandoned { writer.abandon(); return (runs, nil) }
        return (runs, try writer.finish())
    }

    /// Invariant (K9): after a catch-up to s, every point from s on reads on the replica
    /// exactly as on the origin (and the model), every point it had before still reads as it
    /// did, the seqs between are refused as points, and the replica's journal verifies,
    /// compacts across the catch-up and goes on receiving records; an abandoned catch-up
    /// leaves it unchanged, and one whose chunk reached the log but not the index is dropped by
    /// replay — the replica is back at its previous point, never a mix.
    @Test func aCatchUpIsOneConsistentPoint() throws {
        let dir = TempDir("catchup")
        defer { dir.remove() }
        let bs = Self.bs
        let initial = halfFilledVolume(blockSize: bs, mul: 11, add: 7)
        try writeFile(dir.file("seed.img"), initial)
        let origin = try Mirror.create(at: dir.file("a.rewind"), from: dir.file("seed.img"), blockSize: bs)
        let size = origin.volumeSize
        var model = VolumeModel(bytes: initial)
        var images: [UInt64: [UInt8]] = [0: initial]
        var touched: [UInt64: Range<UInt64>] = [:]  // seq → blocks its change touched
        var rng = SplitMix(seed: 9)
        func write(_ n: Int) throws {
            for _ in 0..<n {
                let c = randomChange(&rng, size: size, blockSize: bs)
                model.apply(c)
                let seq = try origin.append([c]).upperBound
                images[seq] = model.bytes
                touched[seq] = Self.blocks(of: c, blockSize: bs)
            }
        }
        try write(30)
        let dataMDB = dir.file("b.rewind/journal/data.mdb")
        let s: UInt64 = 60
        var dirty = DirtySet()
        // The replica's first life, in a scope of its own: its LMDB environment is closed
        // (the object released) before data.mdb is put back as a crash would leave it.
        func firstLife() throws -> (d: UInt64, logEnd: UInt64, before: [UInt8], checksum: UInt64?) {
            let replica = try ReplicationTests.seedReplica(of: origin, at: dir.file("b.rewind"))
            try ReplicationTests.ship(origin, to: replica, &rng)
            let d = try replica.meta().lastSeq
            #expect(d == 30)
            // The origin goes on and folds what the replica has not got.
            try write(40)
            _ = try origin.compact(to: .seq(s))
            #expect(throws: RewindError.self) { _ = try origin.replicatedRecords(from: d + 1, maxRecords: 10, maxBytes: 1 << 20) }
            for seq in d + 1...s { if let r = touched[seq], !r.isEmpty { dirty.insert(r) } }

            // Abandoned half way: nothing changed.
            let logEnd = try replica.meta().logEnd
            _ = try Self.catchUp(replica, from: origin, at: s, dirty: dirty, abandonAfter: 2)
            #expect(try replica.meta().lastSeq == d && replica.meta().logEnd == logEnd)
            #expect(try readAll(replica, at: .latest) == images[d])

            // In the log, not in the index (a crash between the log's sync and the index
            // commit): replay drops it.
            let before = fileBytes(dataMDB)
            let first = try Self.catchUp(replica, from: origin, at: s, dirty: dirty)
            #expect(first.checksum != nil)
            #expect(try replica.meta().lastSeq == s)
            return (d, logEnd, before, first.checksum)
        }
        let (d, logEnd, before, firstChecksum) = try firstLife()
        try writeFile(dataMDB, before)
        let reopened = try Mirror.open(at: dir.file("b.rewind"), recover: true)
        #expect(try reopened.meta().lastSeq == d)
        #expect(try reopened.meta().logEnd == logEnd)
        #expect(try readAll(reopened, at: .latest) == images[d])

        // Done properly.
        let done = try Self.catchUp(reopened, from: origin, at: s, dirty: dirty)
        #expect(done.checksum == firstChecksum)
        #expect(try reopened.meta().lastSeq == s)
        #expect(done.runs.contains { $0.zero } && done.runs.contains { !$0.zero })
        #expect(try readAll(reopened, at: .latest) == images[s])
        for seq in 0...d { #expect(try readAll(reopened, at: .seq(seq)) == images[seq], "seq:\(seq) before the catch-up") }
        // It holds d records and the catch-up, whatever the gap: what status counts.
        #expect(try reopened.status().records == d - reopened.meta().oldestPoint + 1)
        do {
            _ = try reopened.resolve(.seq(d + 5))
            Issue.record("seq:\(d + 5) resolved on the replica")
        } catch {
            #expect("\(error)" == "seq:\(d + 5) is not a point on this replica: a catch-up brought it from seq:\(d) to seq:\(s) at once (use either)")
        }
        // A time inside the gap resolves to a record; the newest FLUSH before it steps over the gap.
        let tS = try reopened.journal.env.read { try reopened.journal.header($0, seq: s).timestamp }
        #expect(try reopened.resolve(.time(tS, text: "t")) == s)
        #expect(try reopened.resolve(.time(tS - 1, text: "t")) == d)

        // Records after s follow on; every point from s on matches the origin.
        try write(25)
        try ReplicationTests.ship(origin, to: reopened, &rng)
        let last = try origin.meta().lastSeq
        #expect(try reopened.meta().lastSeq == last)
        for seq in s...last {
            #expect(try readAll(reopened, at: .seq(seq)) == images[seq], "seq:\(seq) after the catch-up")
        }
        _ = try reopened.verify()
        var catchUps: UInt64 = 0
        try reopened.forEachBucket(in: 0...last, widthNanoseconds: 1 << 62) { catchUps += $0.catchUps }
        #expect(catchUps == 1)
        #expect(try reopened.lag(after: d).records == last - d)

        // A cascade peer at d gets the catch-up record next.
        let next = try reopened.replicatedRecords(from: d + 1, maxRecords: 5, maxBytes: 1 << 20)
        #expect(next.first?.seq == s && next.first?.kind == .catchUp)

        // Retention across the gap lands on a record; folding across the catch-up keeps every later point.
        _ = try reopened.compact(to: .seq(d))
        let held = try reopened.compact(keepAgeNanoseconds: nil, keepBytes: try reopened.meta().lastCumulative - reopened.journal.env.read {
            try reopened.journal.header($0, seq: s).cumulative
        } + 1)
        #expect(held?.toHorizon == s)
        for seq in s...last { #expect(try readAll(reopened, at: .seq(seq)) == images[seq]) }
        _ = try reopened.compact(to: .seq(last - 3))
        #expect(try readAll(reopened, at: .latest) == images[last])
        _ = try reopened.verify()
    }

    /// A peer's bound (`keepBytes`): it holds retention only for that much of the records it
    /// lacks; retention folds the rest, and before it does, the blocks those records changed
    /// go into the peer's dirty set, durably — exactly those, extended by each later fold —
    /// while a peer with no bound still holds everything it lacks.
    @Test func aBoundedPeerKeepsTheBlocksTheFoldedRecordsChanged() throws {
        let dir = TempDir("catchup-bound")
        defer { dir.remove() }
        let m = try Mirror.create(at: dir.file("m.rewind"), size: 64 * 4096)
        let bounded = String(repeating: "b1", count: 32), unbounded = String(repeating: "c2", count: 32)
        // Record k writes block k - 1.
        for i in 0..<20 { try m.append([.write(UInt64(i) * 4096, [UInt8](repeating: UInt8(i + 1), count: 4096))]) }
        try m.recordPeer(PeerRecord(id: bounded, address: "10.0.0.2:7310", durableSeq: 5, updated: 1, keepBytes: 4 * 4096), sync: true)
        #expect(try m.retentionHolds().map(\.seq) == [16])
        _ = try m.compact(keepAgeNanoseconds: nil, keepBytes: 0)
        #expect(try m.meta().horizon == 16)
        var expected = DirtySet()
        expected.insert(5..<16)  // records 6...16
        let why = "the records it lacked passed --peer-keep-size 16384 bytes"
        #expect(try m.peerDirty(bounded) == PeerDirty(from: 5, through: 16, blocks: expected, why: why))
        #expect(try m.status().peers.map { [$0.dirtyBlocks, $0.dirtySince] } == [[11, 5]])
        // Free space below a peer's --peer-min-free: it holds nothing either.
        try m.recordPeer(PeerRecord(id: unbounded, address: "10.0.0.3:7310", durableSeq: 20, updated: 1, minFreeBytes: UInt64.max), sync: true)
        #expect(try m.retentionHolds().isEmpty)
        m.forgetPeer(unbounded)
        // A later fold extends it: a trim across blocks 40..<44, more writes. In dirty-set mode
        // the peer holds nothing (its records are gone): retention folds what it wants.
        try m.append([.trim(40 * 4096, 4 * 4096)])
        for i in 50..<60 { try m.append([.write(UInt64(i) * 4096, [UInt8](repeating: 7, count: 4096))]) }
        _ = try m.compact(keepAgeNanoseconds: nil, keepBytes: 0)
        let horizon = try m.meta().horizon
        #expect(horizon == 31)
        expected.insert(16..<20)  // records 17...20
        expected.insert(40..<44)  // the trim, record 21
        expected.insert(50..<60)  // records 22...31
        #expect(try m.peerDirty(bounded) == PeerDirty(from: 5, through: 31, blocks: expected, why: why))
        // A peer without a bound holds what it lacks.
        try m.recordPeer(PeerRecord(id: unbounded, address: "10.0.0.3:7310", durableSeq: 31, updated: 1), sync: true)
        for i in 0..<8 { try m.append([.write(UInt64(i) * 4096, [UInt8](repeating: 3, count: 4096))]) }
        #expect(try m.compact(keepAgeNanoseconds: nil, keepBytes: 0) == nil)
        #expect(try m.meta().horizon == 31)
        #expect(try m.peerDirty(unbounded) == nil)
        // A damaged set is an error naming it, never an empty set.
        let path = dir.file("m.rewind/peers/\(bounded).dirty")
        var bytes = fileBytes(path)
        bytes[bytes.count - 3] ^= 1
        try writeFile(path, bytes)
        do {
            _ = try m.peerDirty(bounded)
            Issue.record("a damaged dirty set was read")
        } catch {
            #expect("\(error)" == "peers/b1b1b1b1b1b1b1b1….dirty is damaged: its checksum does not match")
        }
    }

    /// A catch-up that does not follow the newest record, goes back in time, or names blocks
    /// out of order or past the volume is refused before anything is written.
    @Test func badCatchUpsAreRefused() throws {
        let dir = TempDir("catchup-bad")
        defer { dir.remove() }
        let m = try Mirror.create(at: dir.file("m.rewind"), size: 64 * 4096)
        try m.append([.write(0, [UInt8](repeating: 1, count: 4096))])
        let t = try m.meta().lastTime
        func refused(_ from: UInt64, _ seq: UInt64, _ time: UInt64, _ runs: [CatchUpRun], _ message: String,
                     sourceLocation: SourceLocation = #_sourceLocation) {
            do {
                _ = try CatchUpWriter(mirror: m, from: from, seq: seq, timestamp: time, runs: runs)
                Issue.record("accepted", sourceLocation: sourceLocation)
            } catch {
                #expect("\(error)" == message, sourceLocation: sourceLocation)
            }
        }
        refused(0, 5, t, [CatchUpRun(0..<1)], "a catch-up from seq:0 for a mirror whose newest record is seq:1")
        refused(1, 1, t, [CatchUpRun(0..<1)], "a catch-up to seq:1 from seq:1")
        refused(1, 5, t - 1, [CatchUpRun(0..<1)], "a catch-up's time \(formatRFC3339(t - 1)) is before the record it follows")
        refused(1, 5, t, [CatchUpRun(4..<6), CatchUpRun(2..<3)], "catch-up run 1 (blocks 2..<3) is empty, out of order or past the volume's 64 blocks")
        refused(1, 5, t, [CatchUpRun(60..<65)], "catch-up run 0 (blocks 60..<65) is empty, out of order or past the volume's 64 blocks")
        let w = try CatchUpWriter(mirror: m, from: 1, seq: 5, timestamp: t, runs: [CatchUpRun(3..<5)])
        try [UInt8](repeating: 9, count: 4096).withUnsafeBytes { try w.write($0) }
        #expect(throws: RewindError.self) { try w.finish() }
        try [UInt8](repeating: 9, count: 4096).withUnsafeBytes { try w.write($0) }
        do {
            try w.finish(checksum: 1)
            Issue.record("a wrong checksum accepted")
        } catch {
            #expect("\(error)".hasSuffix("the sender's 1: damaged on the way"))
        }
        w.abandon()
        #expect(try m.meta().lastSeq == 1)
        _ = try m.verify()
    }
}
