import Foundation
import Glibc
import Testing
@testable import RewindCore

/// Replication's storage side: records read from an origin (`replicatedRecords`) and stored
/// by a replica (`JournalWriter.appendReplicated`) under the origin's seqs, a replica built
/// from a seed (`ReplicaBuilder`), peers holding retention, and failover (`promote`).
@Suite struct ReplicationTests {
    static let bs = 4096

    /// Seed a replica of `origin` as the link does: its base (non-zero runs) as of its horizon.
    static func seedReplica(of origin: Mirror, at path: String) throws -> Mirror {
        let seed = try #require(try origin.seed())
        let builder = try ReplicaBuilder(path: path, seed: seed)
        try origin.forEachBaseDataRun { at, bytes in try builder.write(at: at, bytes) }
        return try builder.finish()
    }

    /// Ship every record the replica lacks, in batches of random sizes.
    static func ship(_ origin: Mirror, to replica: Mirror, _ rng: inout SplitMix) throws {
        let writer = JournalWriter(mirror: replica)
        while true {
            let next = try replica.meta().lastSeq + 1
            let batch = try origin.replicatedRecords(from: next, maxRecords: Int.random(in: 1...40, using: &rng),
                                                     maxBytes: Int.random(in: 1...(256 << 10), using: &rng))
            if batch.isEmpty { return }
            #expect(batch.first?.seq == next)
            try writer.appendReplicated(batch)
            try writer.commit()
        }
    }

    /// Invariant (K6): every point of the window reads the same bytes on the origin and on a
    /// replica seeded from it after a compaction (so its base holds data and its horizon is
    /// not 0), fed the origin's records in random batches while the origin keeps writing; the
    /// records carry the same seqs, times, kinds, ranges and checksums; the origin's latest
    /// point equals the model.
    @Test func aReplicaReadsEveryPointAsTheOriginDoes() throws {
        let dir = TempDir("replica-model")
        defer { dir.remove() }
        let bs = Self.bs
        let initial = halfFilledVolume(blockSize: bs, mul: 7, add: 3)
        try writeFile(dir.file("seed.img"), initial)
        let origin = try Mirror.create(at: dir.file("a.rewind"), from: dir.file("seed.img"), blockSize: bs)
        let size = origin.volumeSize
        var model = VolumeModel(bytes: initial)
        var rng = SplitMix(seed: 18)
        func write(_ n: Int) throws {
            for _ in 0..<n {
                let changes = (0..<Int.random(in: 1...6, using: &rng)).map { _ in randomChange(&rng, size: size, blockSize: bs) }
                changes.forEach { model.apply($0) }
                try origin.append(changes)
            }
        }
        try write(40)
        _ = try origin.compact(to: .seq(30))
        let replica = try Self.seedReplica(of: origin, at: dir.file("b.rewind"))
        #expect(try replica.isReplica())
        #expect(try replica.meta().horizon == 30)
        for _ in 0..<4 {
            try Self.ship(origin, to: replica, &rng)
            try write(30)
        }
        try Self.ship(origin, to: replica, &rng)
        let a = try origin.meta(), b = try replica.meta()
        #expect(b.lastSeq == a.lastSeq)
        #expect(b.uuid == a.uuid && b.lastTime == a.lastTime && b.generation == a.generation)
        #expect(try readAll(origin, at: .latest) == model.bytes)
        for seq in 30...a.lastSeq {
            let x = try readAll(origin, at: .seq(seq)), y = try readAll(replica, at: .seq(seq))
            #expect(firstDifference(x, y) == nil, "seq:\(seq) differs at byte \(firstDifference(x, y) ?? -1)")
        }
        var originRecords: [RecordHeader] = [], replicaRecords: [RecordHeader] = []
        try origin.forEachRecord(in: 31...a.lastSeq) { originRecords.append($0.header) }
        try replica.forEachRecord(in: 31...a.lastSeq) { replicaRecords.append($0.header) }
        #expect(originRecords.map { [$0.timestamp, $0.offset, $0.length, $0.checksum, UInt64($0.kind.rawValue), $0.fua ? 1 : 0] }
                == replicaRecords.map { [$0.timestamp, $0.offset, $0.length, $0.checksum, UInt64($0.kind.rawValue), $0.fua ? 1 : 0] })
        // A replica reopened (as after a restart) resumes where it was.
        let reopened = try Mirror.open(at: replica.path)
        #expect(try reopened.meta().lastSeq == a.lastSeq)
        #expect(try readAll(reopened, at: .latest) == model.bytes)
    }

    /// A record that is not the next one, or whose payload, range, size or time is wrong, is
    /// refused with its reason and changes nothing; the right record is then stored.
    @Test func badRecordsAreRefusedAndChangeNothing() throws {
        let dir = TempDir("replica-bad")
        defer { dir.remove() }
        let origin = try Mirror.create(at: dir.file("a.rewind"), size: 64 * 4096)
        try origin.append([.write(4096, [UInt8](repeating: 7, count: 4096)), .zero(100, 9000), .write(10, [1, 2, 3])])
        let replica = try Self.seedReplica(of: origin, at: dir.file("b.rewind"))
        let records = try origin.replicatedRecords(from: 1, maxRecords: 10, maxBytes: 1 << 20)
        #expect(records.map(\.seq) == [1, 2, 3])
        let writer = JournalWriter(mirror: replica)
        func refused(_ rs: [ReplicatedRecord], _ message: String, sourceLocation: SourceLocation = #_sourceLocation) {
            do {
                try writer.appendReplicated(rs)
                Issue.record("stored; expected: \(message)", sourceLocation: sourceLocation)
            } catch {
                #expect("\(error)" == message, sourceLocation: sourceLocation)
                writer.abort(keepLog: false)
            }
            #expect((try? replica.meta().lastSeq) == 0, sourceLocation: sourceLocation)
        }
        refused([records[1]], "received seq:2 where seq:1 follows this mirror's newest record")
        var flipped = records[0]
        flipped.payload[100] ^= 1
        refused([flipped], "record seq:1 is corrupt: payload checksum mismatch (damaged on the way)")
        var past = records[0]
        past.offset = 64 * 4096 - 100
        refused([past], "record seq:1 is corrupt: it changes 4096 bytes at 262044, past the volume's end (262144)")
        var short = records[0]
        short.payload.removeLast(4096)
        refused([short], "record seq:1 is corrupt: its payload is 0 bytes, its write stores 4096")
        var early = records[1]
        early.timestamp = records[0].timestamp - 1
        refused([records[0], early], "record seq:2 is corrupt: its time \(formatRFC3339(early.timestamp)) is before the record it follows")
        try writer.appendReplicated(records)
        try writer.commit()
        #expect(try readAll(replica, at: .latest) == readAll(origin, at: .latest))
        // A record folded into the origin's base is not offered: the peer needs a new seed.
        _ = try origin.compact(to: .seq(2))
        let behind = #expect(throws: RewindError.self) { try origin.replicatedRecords(from: 2, maxRecords: 1, maxBytes: 1) }
        #expect(behind.map { "\($0)" } == "seq:2 was folded into the base (the oldest point is seq:2); the peer needs a new seed or a resync")
        #expect(try origin.replicatedRecords(from: 4, maxRecords: 1, maxBytes: 1).isEmpty)
    }

    /// Invariant: a peer's durable seq holds retention and `compact --to` like a pin, across
    /// restarts (it is a file, not a lock); forgetting the peer lets them go on.
    @Test func aPeerHoldsTheRecordsItLacks() throws {
        let dir = TempDir("replica-peer")
        defer { dir.remove() }
        let m = try Mirror.create(at: dir.file("a.rewind"), size: 64 * 4096)
        for i in 0..<30 { try m.append([.write(UInt64(i % 64) * 4096, [UInt8](repeating: UInt8(i), count: 4096))]) }
        let id = String(repeating: "ab", count: 32)
        try m.recordPeer(PeerRecord(id: id, address: "10.0.0.2:7310", durableSeq: 10, updated: 1, state: "streaming"), sync: true)
        #expect(try m.peerRecords().map(\.durableSeq) == [10])
        do {
            _ = try m.compact(to: .seq(20))
            Issue.record("compacted past the peer")
        } catch {
            #expect("\(error)" == "seq:20 is after seq:10, a point in use by replication peer abababababababab… (10.0.0.2:7310); stop it, or compact to seq:10 at most")
        }
        let report = try m.compact(keepAgeNanoseconds: nil, keepBytes: 0)
        #expect(report != nil)
        #expect(try m.meta().horizon == 10)
        #expect(try m.lag(after: 10).records == 20)
        #expect(try m.lag(after: 10).bytes == 20 * 4096)
        #expect(try m.status().peers.map(\.lagRecords) == [20])
        unlink(dir.file("a.rewind/peers/\(id).peer"))
        _ = try m.compact(keepAgeNanoseconds: nil, keepBytes: 0)
        #expect(try m.meta().horizon == 30)
        // The journal's file system full (serve's makeRoom): peers yield; one left behind the
        // horizon holds nothing more (it needs a new seed), so retention goes on.
        try m.recordPeer(PeerRecord(id: id, address: "10.0.0.2:7310", durableSeq: 32, updated: 1), sync: true)
        for i in 30..<40 { try m.append([.write(UInt64(i % 64) * 4096, [UInt8](repeating: UInt8(i), count: 4096))]) }
        #expect(try m.compact(keepAgeNanoseconds: nil, keepBytes: 0)?.toHorizon == 32)
        #expect(try m.compact(keepAgeNanoseconds: nil, keepBytes: 0, peersYield: true)?.toHorizon == 40)
        #expect(try m.retentionHolds().isEmpty)
        #expect(try m.status().peers.map(\.durableSeq) == [32])
    }

    /// Failover: promote cuts back to the point, writes the source, raises the generation,
    /// records where it began and drops the replica mark; serve and rollback refuse a replica.
    @Test func promoteMakesAReplicaAnOrigin() throws {
        let dir = TempDir("replica-promote")
        defer { dir.remove() }
        let origin = try Mirror.create(at: dir.file("a.rewind"), size: 64 * 4096)
        for i in 0..<12 { try origin.append([.write(UInt64(i) * 4096, [UInt8](repeating: UInt8(i + 1), count: 4096))]) }
        let replica = try Self.seedReplica(of: origin, at: dir.file("b.rewind"))
        var rng = SplitMix(seed: 1)
        try Self.ship(origin, to: replica, &rng)
        let refusal = #expect(throws: RewindError.self) { try replica.refuseIfReplica() }
        #expect(refusal.map { "\($0)" } == "\(replica.path) is a replica: it receives its volume from another unit (rewind receive); make it an origin first with `rewind promote \(replica.path) --to SOURCE`")
        #expect("\(RewindError.replica(path: "b.rewind"))" == "b.rewind is a replica: it receives its volume from another unit (rewind receive); make it an origin first with `rewind promote b.rewind --to SOURCE`")
        let expected = try readAll(origin, at: .seq(8))
        let r = try replica.promote(at: .seq(8), to: dir.file("b.img"))
        #expect(r.seq == 8 && r.recordsRemoved == 4)
        #expect(fileBytes(dir.file("b.img")) == expected)
        #expect(try !replica.isReplica())
        #expect(try replica.meta().lastSeq == 8)
        #expect(try replica.meta().generation > origin.meta().generation)
        #expect(try replica.generationStart() == 8)
        do {
            _ = try replica.promote(at: .latest, to: dir.file("c.img"))
            Issue.record("promoted an origin")
        } catch {
            #expect("\(error)" == "\(replica.path) is already an origin; serve it (rewind serve SOURCE --mirror \(replica.path))")
        }
    }
}
