import Glibc

/// What a rollback did.
public struct RollbackReport: Sendable, Codable {
    public var fromSeq: UInt64
    public var toSeq: UInt64
    public var recordsRemoved: UInt64
    /// Blocks rewritten in the source (with `--source`): only those changed after the point.
    public var sourceBlocksRewritten: UInt64
    public var bookmarksRemoved: [String]
}

extension Mirror {
    /// Cut the mirror back to `point`: records after it are removed and the next write gets
    /// seq point+1. With `source`, first revert that image in place by rewriting only the
    /// blocks changed after the point.
    ///
    /// Crash-safe: the target is recorded (`pendingRollback`, with the source it reverts:
    /// `PendingRollback`) and made durable first; until the cut completes, points after it are
    /// refused and writers stop with a message to re-run the same rollback, which redoes the
    /// idempotent steps. A run that finishes it must be started the same way (same target, and
    /// `--source` naming the same file, or none), else it is refused with the command to run.
    /// `ownerLockHeld`: the caller owns the mirror already (`receive --rejoin`).
    public func rollback(to point: Point, source: String?, ownerLockHeld: Bool = false,
                         progress: ProgressObserver? = nil) throws -> RollbackReport {
        let owner = ownerLockHeld ? nil : try FileLock(path: ownerLockPath, kind: .exclusive, waitSeconds: 0,
                                                       holder: "another rewind process (serve, receive or rollback) owns this mirror")
        defer { owner?.release() }
        // Opened and identified before anything is recorded: the pending mark names the file,
        // and the descriptor checked is the one written.
        let reverting = try source.map { try RollbackSource(path: $0) }
        // A rollback resumed after a crash may have cut part of the index after its target.
        let resumed = try meta().pendingRollback != MirrorMeta.none
        if let reverting {
            // Never behind a running server's back, and only into the file this mirror
            // journals (a resumed rollback is held to the file it recorded instead).
            try SourceLock.checkNotServed(reverting.path)
            if !resumed { try sourceIdentity()?.check(reverting.identity, mirror: path, given: reverting.path) }
        }
        // A point an export reads is never cut away under it (`Pin`).
        let before = try withPinsChecked(rollbackTo: try resolve(point)) { try recordRollbackTarget(point, source: reverting) }
        try sync()
        CrashPoint.hit("rollback.target-recorded")
        let k = before.pendingRollback
        var rewritten: UInt64 = 0
        if let reverting {
            rewritten = try revertSource(reverting, to: k, checkThroughLatest: !resumed, progress: progress)
            CrashPoint.hit("rollback.source-reverted")
        }
        // Where the log can be cut: at the chunk of record k+1 when that record starts it.
        let logCut = try journal.env.read { txn -> UInt64? in
            guard k < before.lastSeq, let (_, next) = try? journal.record(txn, atOrAfter: k + 1) else { return nil }
            if k > before.horizon, (try? journal.header(txn, seq: k))?.segment == next.segment { return nil }
            return next.segment - UInt64(LogChunk.headerSize)
        }
        let removed = try cutJournal(after: k, last: before.lastSeq)
        CrashPoint.hit("rollback.records-deleted")
        var dropped: [String] = []
        try journal.env.write { txn in
            var m = try journal.readMeta(txn)
            for (name, seq) in try journal.allBookmarks(txn) where seq > k {
                try journal.delete(bookmark: name, txn)
                dropped.append(name)
            }
            if k == m.horizon {
                m.lastTime = m.horizonTime
                m.lastCumulative = m.horizonCumulative
            } else {
                let h = try journal.header(txn, seq: k)
                m.lastTime = h.timestamp
                m.lastCumulative = h.cumulative
            }
            m.lastSeq = k
            m.generation += 1
            try writeGenerationStart(txn, k)
            m.pendingRollback = MirrorMeta.none
            try txn.delete(journal.meta, PendingRollback.key)
            m.sourceSyncedSeq = min(m.sourceSyncedSeq, k)
            // The abandoned history's chunks carry the old generation, so replay never takes
            // them back; cutting the log where it started only frees the space.
            if let logCut, logCut < m.logEnd { m.logEnd = logCut }
            try journal.writeMeta(txn, m)
        }
        try sync()
        if let logCut { try journal.log.truncate(at: logCut) }
        return RollbackReport(fromSeq: before.lastSeq, toSeq: k, recordsRemoved: removed,
                              sourceBlocksRewritten: rewritten, bookmarksRemoved: dropped)
    }

    /// Step 1: record the target k (`pendingRollback`) and how the rollback was started
    /// (`PendingRollback`), and forget the source's state at the last clean stop of `serve`
    /// (the source is about to be rewritten, or left behind the cut mirror); or, with a
    /// rollback pending, check that this run finishes it as it was started. Not yet durable:
    /// the caller syncs. Returns the header as it now is.
    func recordRollbackTarget(_ point: Point, source: RollbackSource?) throws -> MirrorMeta {
        let mirror = withoutTrailingSlashes(path)
        return try journal.env.write { txn -> MirrorMeta in
            var m = try journal.readMeta(txn)
            let k = try resolve(point, txn)
            let finishing = m.pendingRollback != MirrorMeta.none
            if finishing {
                if let pending = try pendingRollback(txn) {
                    guard pending.target == m.pendingRollback else {
                        throw RewindError.damagedMirror(path: path, why: "its record of the interrupted rollback's source names seq:\(pending.target), its header seq:\(m.pendingRollback)")
                    }
                    try pending.checkFinishing(requested: k, given: source?.identity, givenPath: source?.path, mirror: mirror)
                } else if m.pendingRollback != k {
                    // Started by a rewind that did not record its source.
                    throw RewindError.interruptedRollback(target: m.pendingRollback)
                }
            }
            if m.target > m.horizon && k < m.target {
                throw RewindError.pointBeforeHorizon(point: point.description, horizon: m.target)
            }
            if let source, source.sizeBytes != volumeSize {
                throw RewindError.invalidArgument("\(source.path) is \(source.sizeBytes) bytes but the mirror's volume is \(volumeSize): not its source")
            }
            if !finishing {
                m.pendingRollback = k
                try journal.writeMeta(txn, m)
                try txn.put(journal.meta, PendingRollback.key, PendingRollback(target: k, source: source?.identity).encoded())
                try txn.delete(journal.meta, SourceState.key)
            }
            return m
        }
    }

    /// Write into the source the content at seq k of every block changed after k; fsync.
    private func revertSource(_ source: RollbackSource, to k: UInt64, checkThroughLatest: Bool,
                              progress: ProgressObserver?) throws -> UInt64 {
        let rewritten = try rewriteBlocks(changedAfter: k, asOf: .seq(k), into: source.file,
                                          checkThroughLatest: checkThroughLatest, progress: progress)
        try source.file.sync()
        return rewritten
    }

    /// Delete index entries and records after k, in bounded transactions.
    func cutJournal(after k: UInt64, last: UInt64) throws -> UInt64 {
        var resume = blockKey(0, 0)
        var finished = false
        while !finished {
            try journal.env.write { txn in
                let cursor = try txn.cursor(journal.blocks)
                var entry = try cursor.seek(atLeast: resume)
                var count = 0
                while let e = entry, let key = decodeBlockKey(e.key) {
                    if count >= Compactor.chunkBlocks * 4 { resume = blockKey(key.block, key.seq); return }
                    count += 1
                    if key.seq > k { try cursor.deleteCurrent() }
                    entry = try cursor.next()  // after a delete, the entry that followed
                }
                finished = true
            }
            CrashPoint.hit("rollback.index-chunk-deleted")
        }
        return k < last ? try journal.deleteRecords(k + 1...last) : 0
    }
}
