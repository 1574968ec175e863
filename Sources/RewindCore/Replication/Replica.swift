import Glibc

/// What a new receiver's mirror is built from: the origin's identity and horizon. The
/// origin's base.img (its data, holes skipped) follows, then its records from horizon + 1, so
/// the replica holds every point the origin holds, under the same seqs.
public struct ReplicaSeed: Sendable, Equatable {
    public var uuid: [UInt8]
    public var volumeSize: UInt64
    public var blockSize: UInt32
    public var generation: UInt64
    public var horizon: UInt64
    public var horizonTime: UInt64
    public var createdTime: UInt64
    public var horizonCumulative: UInt64

    public init(uuid: [UInt8], volumeSize: UInt64, blockSize: UInt32, generation: UInt64, horizon: UInt64,
                horizonTime: UInt64, createdTime: UInt64, horizonCumulative: UInt64) {
        self.uuid = uuid
        self.volumeSize = volumeSize
        self.blockSize = blockSize
        self.generation = generation
        self.horizon = horizon
        self.horizonTime = horizonTime
        self.createdTime = createdTime
        self.horizonCumulative = horizonCumulative
    }
}

extension Mirror {
    static let replicaKey = Array("replica".utf8)
    static let replicaValue: [UInt8] = { var v = Array("receiving".utf8); v.appendLE(xxh3(Array("receiving".utf8))); return v }()

    /// Whether this mirror receives its volume from another unit (`receive`), so that nothing
    /// else may write it until `promote` makes it an origin.
    public func isReplica() throws -> Bool {
        try journal.env.read { txn in
            guard let raw = try txn.get(journal.meta, Self.replicaKey) else { return false }
            guard Array(raw) == Self.replicaValue else {
                throw RewindError.damagedMirror(path: path, why: "its replica mark fails its check (journal/data.mdb is damaged)")
            }
            return true
        }
    }

    /// Make a former origin's mirror a replica (`receive --rejoin`): from now on only
    /// `receive` writes it, until a `promote`. What it knew as an origin goes: the source it
    /// journalled (no source follows a replica; what the source was owed would hold its
    /// compactions forever) and the peers it streamed to (their positions would hold its
    /// retention; the peers it forwards to now are recorded afresh).
    public func markReplica() throws {
        try journal.env.write { txn in
            try txn.put(journal.meta, Self.replicaKey, Self.replicaValue)
            _ = try txn.delete(journal.meta, SourceIdentity.key)
            _ = try txn.delete(journal.meta, SourceState.key)
        }
        try sync()
        for peer in try peerRecords() { forgetPeer(peer.id) }
    }

    /// Throw `replica` when only `receive` may write this mirror.
    public func refuseIfReplica() throws {
        if try isReplica() { throw RewindError.replica(path: path) }
    }

    /// The seed a new receiver starts from: this mirror's identity at its horizon. nil while a
    /// compaction is unfinished (base.img is then between two points); the sender waits.
    public func seed() throws -> ReplicaSeed? {
        let m = try meta()
        guard m.target <= m.horizon else { return nil }
        return ReplicaSeed(uuid: m.uuid, volumeSize: m.volumeSize, blockSize: m.blockSize, generation: m.generation,
                           horizon: m.horizon, horizonTime: m.horizonTime, createdTime: m.createdTime,
                           horizonCumulative: m.horizonCumulative)
    }

    /// Each run of non-zero blocks of base.img (the volume as of the horizon), with its offset:
    /// holes and zero blocks skipped (`forEachNonZeroRun`). Hold a pin at the horizon
    /// meanwhile, so no compaction rewrites base.img underneath. Returns the bytes of data
    /// extents read.
    @discardableResult
    public func forEachBaseDataRun(reached: (UInt64) throws -> Void = { _ in },
                                   _ body: (UInt64, UnsafeRawBufferPointer) throws -> Void) throws -> UInt64 {
        try forEachNonZeroRun(of: base, size: volumeSize, blockSize: blockSize, reached: reached, body)
    }
}

/// Builds a replica's mirror from a seed: in `PATH.creating`, renamed into place when
/// `finish` has written and synced everything, so a receiver killed while being seeded is left
/// with no mirror (and is seeded again), never half of one.
public final class ReplicaBuilder {
    public let path: String
    public let seed: ReplicaSeed
    private let staging: String
    private let base: BlockFile
    public private(set) var bytesWritten: UInt64 = 0

    /// `stale`: an earlier copy of the volume (yesterday's image) to start from: the seed then
    /// sends only the blocks that differ from it (`staleSums`, `zero`).
    public init(path: String, seed: ReplicaSeed, stale: String? = nil) throws {
        guard seed.blockSize >= 512, seed.blockSize <= 1 << 20, seed.blockSize & (seed.blockSize - 1) == 0,
              seed.volumeSize > 0, seed.volumeSize % UInt64(seed.blockSize) == 0, seed.uuid.count == 16 else {
            throw RewindError.invalidArgument("the seed's volume (\(seed.volumeSize) bytes in blocks of \(seed.blockSize)) is not one a mirror can hold")
        }
        if access(path, F_OK) == 0 { throw RewindError.mirrorExists(path: path) }
        self.path = path
        self.seed = seed
        staging = path + ".creating"
        removeTree(staging)
        guard mkdir(staging, 0o755) == 0 else { throw RewindError.io(path: staging, operation: "mkdir", errno: errno) }
        do {
            base = try BlockFile(path: staging + "/base.img", mode: .createNew)
            try base.truncate(to: seed.volumeSize)
            if let stale {
                let from = try BlockFile(path: stale, mode: .readOnly)
                guard try from.size() == seed.volumeSize else {
                    throw RewindError.invalidArgument("\(stale) is \(try from.size()) bytes; the volume offered is \(seed.volumeSize)")
                }
                // Holes stay holes; extents are copied in the kernel where it can.
                for extent in try from.dataExtents(size: seed.volumeSize) {
                    try base.copyRange(from: from, offset: extent.lowerBound, length: UInt64(extent.count))
                }
            }
        } catch {
            removeTree(staging)
            throw error
        }
    }

    /// The checksum tree of the base as it stands (the stale copy), to compare with the sender's.
    public func staleSums(progress: ProgressObserver? = nil) throws -> BaseSums {
        let path = staging + "/stale.sums"
        unlink(path)
        return try BaseSums.build(of: base, tree: SumTree(blocks: seed.volumeSize / UInt64(seed.blockSize), blockSize: Int(seed.blockSize)),
                                  at: path, seq: seed.horizon, uuid: seed.uuid, progress: progress)
    }

    /// Blocks at `offset` read as zeros in the seed (a stale copy had data there).
    public func zero(at offset: UInt64, length: UInt64) throws {
        guard offset <= seed.volumeSize, length <= seed.volumeSize - offset else {
            throw RewindError.outOfRange(offset: offset, length: length, size: seed.volumeSize)
        }
        try base.punchHole(at: offset, length: length)
    }

    /// Write seed data at `offset` of the base.
    public func write(at offset: UInt64, _ bytes: UnsafeRawBufferPointer) throws {
        guard offset <= seed.volumeSize, UInt64(bytes.count) <= seed.volumeSize - offset else {
            throw RewindError.outOfRange(offset: offset, length: UInt64(bytes.count), size: seed.volumeSize)
        }
        try base.write(at: offset, from: bytes)
        bytesWritten += UInt64(bytes.count)
    }

    /// Sync the base, create the journal (horizon = newest = the seed's seq), mark it a
    /// replica and move it into place.
    public func finish() throws -> Mirror {
        do {
            unlink(staging + "/stale.sums")  // of the stale copy, not of the seed
            try base.sync()
            var meta = MirrorMeta(blockSize: seed.blockSize, uuid: seed.uuid, volumeSize: seed.volumeSize, now: seed.createdTime)
            meta.horizon = seed.horizon
            meta.lastSeq = seed.horizon
            meta.target = seed.horizon
            meta.sourceSyncedSeq = seed.horizon
            meta.horizonTime = seed.horizonTime
            meta.lastTime = seed.horizonTime
            meta.generation = seed.generation
            meta.horizonCumulative = seed.horizonCumulative
            meta.lastCumulative = seed.horizonCumulative
            try Mirror.createJournal(in: staging, mirrorPath: path, meta: meta, extra: ["replica": Mirror.replicaValue])
        } catch {
            abandon()
            throw error
        }
        guard rename(staging, path) == 0 else { throw RewindError.io(path: path, operation: "rename", errno: errno) }
        syncDirectory(containing: path)
        return try Mirror.open(at: path)
    }

    /// Throw the half-built mirror away.
    public func abandon() {
        removeTree(staging)
    }
}
