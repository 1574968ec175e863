/// Failover: a replica becomes an origin.
extension Mirror {
    static let generationStartKey = Array("generationStart".utf8)

    /// The seq the current generation began at: where the last promote or rollback continued
    /// from (0 for a mirror's first generation). Sent in the link's hello so a receiver of an
    /// older generation can tell whether it holds records the new history does not.
    public func generationStart() throws -> UInt64 {
        try journal.env.read { txn in
            guard let raw = try txn.get(journal.meta, Self.generationStartKey) else { return 0 }
            guard raw.count == 16, xxh3(UnsafeRawBufferPointer(rebasing: raw[0..<8])) == raw.loadLE(at: 8, as: UInt64.self) else {
                throw RewindError.damagedMirror(path: path, why: "its generation start fails its check (journal/data.mdb is damaged)")
            }
            return raw.loadLE(at: 0, as: UInt64.self)
        }
    }

    func writeGenerationStart(_ txn: LMDBTransaction, _ seq: UInt64) throws {
        var v = [UInt8](); v.appendLE(seq)
        v.appendLE(xxh3(v))
        try txn.put(journal.meta, Self.generationStartKey, v)
    }

    /// A receiver takes on its sender's newer generation (`LinkAdmission` checked that this
    /// mirror holds nothing after `start`).
    public func adoptGeneration(_ generation: UInt64, start: UInt64) throws {
        try journal.env.write { txn in
            var m = try journal.readMeta(txn)
            guard generation > m.generation else { return }
            m.generation = generation
            try journal.writeMeta(txn, m)
            try writeGenerationStart(txn, start)
        }
        try sync()
    }

    /// Make this replica an origin: cut it back to `point` when that is not its newest record,
    /// write the volume as of the point to `source` (a new file, or with `force` an existing
    /// file or block device), then raise the generation — so the old origin's stream is refused
    /// by this unit and its peers — and drop the replica mark. `serve SOURCE --mirror MIRROR`
    /// continues with the same volume UUID and the next seq.
    public func promote(at point: Point, to source: String, force: Bool = false,
                        progress: ProgressObserver? = nil) throws -> PromoteReport {
        guard try isReplica() else {
            throw RewindError.invalidArgument("\(path) is already an origin; serve it (rewind serve SOURCE --mirror \(shellWord(path)))")
        }
        let owner = try FileLock(path: ownerLockPath, kind: .exclusive, waitSeconds: 0,
                                 holder: "a rewind receive owns this mirror; stop it first")
        let seq = try resolve(point)
        let before = try meta()
        owner.release()
        var removed: UInt64 = 0
        if seq < before.lastSeq {
            // Rollback refuses replicas from the command line only; here it is the first step.
            removed = try rollback(to: .seq(seq), source: nil, progress: progress).recordsRemoved
        }
        let lock = try FileLock(path: ownerLockPath, kind: .exclusive, waitSeconds: 0,
                                holder: "a rewind receive owns this mirror; stop it first")
        defer { lock.release() }
        let restored = try restore(at: .seq(seq), to: source, force: force, progress: progress)
        let generation = try journal.env.write { txn -> UInt64 in
            var m = try journal.readMeta(txn)
            m.generation += 1
            m.sourceSyncedSeq = seq  // the source is the volume as of seq, synced by restore
            try journal.writeMeta(txn, m)
            try writeGenerationStart(txn, seq)
            _ = try txn.delete(journal.meta, Self.replicaKey)
            return m.generation
        }
        try sync()
        return PromoteReport(seq: seq, source: source, bytes: restored.bytes, recordsRemoved: removed, generation: generation)
    }
}

public struct PromoteReport: Sendable, Codable {
    /// The point the new origin continues from.
    public var seq: UInt64
    public var source: String
    public var bytes: UInt64
    /// Records after the point, cut from the mirror (promote --at an earlier point).
    public var recordsRemoved: UInt64
    public var generation: UInt64
}
