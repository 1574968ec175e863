import Glibc

/// What one compaction did.
public struct CompactionReport: Sendable, Codable {
    public var fromHorizon: UInt64
    public var toHorizon: UInt64
    /// Distinct blocks written into base.img: each folded block exactly once.
    public var blocksWritten: UInt64
    public var recordsRemoved: UInt64
    public var bytesFolded: UInt64
    public var bookmarksRemoved: [String]
}

/// Folds the oldest records into base.img as they leave the retention window.
///
/// Protocol (crash-safe at every instant):
/// 1. Under an exclusive `base.lock`, record the target horizon j in the header and make it
///    durable. From then on points before j are refused.
/// 2. For each block changed in (horizon, j], write its newest content at or before j into
///    base.img — once per block — then fsync base.img.
/// 3. Delete, in bounded transactions, each block's index entries <= j (all of a block's at
///    once), the records <= j, the segments wholly <= j and bookmarks before j; then set
///    horizon = j.
/// A reader at any point >= j finds either a block's old entries (whose newest <= j equals
/// what step 2 wrote) or none (then base.img, already rewritten): the same bytes. On open, a
/// target above the horizon means a crash in 2 or 3: both are idempotent and are redone.
struct Compactor {
    let mirror: Mirror
    /// Blocks handled per read or write transaction, so the live writer is never held up long.
    static let chunkBlocks = 4096
    /// Records deleted per write transaction.
    static let chunkRecords = 16384

    /// Compact up to `target`, which must lie in (horizon, lastSeq].
    /// `sourceSyncedThrough`: the live server's source is known fdatasynced through this seq
    /// (it just synced it: `ServePipeline.retentionPass`), later than the header may say yet;
    /// the header is raised to it in the transaction that records the target, before anything
    /// is folded, so a crash after the fold never finds the floor below the horizon.
    func compact(to target: UInt64, sourceSyncedThrough: UInt64? = nil, peersYield: Bool = false,
                 progress: ProgressObserver?) throws -> CompactionReport {
        if let (floor, live) = try mirror.unreplayedSourceFloor(sourceSyncedThrough: sourceSyncedThrough), target > floor {
            if live {
                throw RewindError.invalidArgument("seq:\(target) is after seq:\(floor), the last record the served source is known synced through (a crash now would rewrite the source from the records after it); the server syncs its source every 10 s (sooner under heavy writes): try again in a moment")
            }
            throw RewindError.invalidArgument("seq:\(target) is after seq:\(floor), the last record the source is known to hold: its server stopped without syncing it, and the records after it are what the next `rewind serve` replays into the source; start `rewind serve` once, then compact")
        }
        let lock = try FileLock(path: mirror.baseLockPath, kind: .exclusive, waitSeconds: 30,
                                holder: "a restore or export is reading an old point; try again when it ends")
        defer { lock.release() }
        let journal = mirror.journal
        // The index of (horizon, target] is held to its records before the target is recorded:
        // once recorded, a retry (the next retention pass, the next open) finishes the
        // compaction without asking, and would delete the damage the check found.
        let current = try mirror.meta()
        if current.target <= current.horizon, target > current.horizon {
            try checkIndex(from: current.horizon, upTo: target)
        }
        // Under the pins' lock: no export pins a point below the target once it is recorded.
        let before = try mirror.withPinsChecked(target: target, peersYield: peersYield) { try journal.env.write { txn -> MirrorMeta in
            var m = try journal.readMeta(txn)
            if m.pendingRollback != MirrorMeta.none { throw RewindError.interruptedRollback(target: m.pendingRollback) }
            guard target <= m.lastSeq else { throw RewindError.pointAfterLatest(point: "seq:\(target)", latest: m.lastSeq) }
            guard target >= m.oldestPoint else {
                throw RewindError.pointBeforeHorizon(point: "seq:\(target)", horizon: m.oldestPoint)
            }
            if target > m.target { m.target = target }
            if let synced = sourceSyncedThrough, synced > m.sourceSyncedSeq { m.sourceSyncedSeq = min(synced, m.lastSeq) }
            try journal.writeMeta(txn, m)
            return m
        } }
        try mirror.sync()
        CrashPoint.hit("compact.target-recorded")
        return try finish(target: before.target, progress: progress, lockHeld: true)
    }

    /// Steps 2 and 3 for a recorded target (also the crash-recovery path).
    func finish(target: UInt64, progress: ProgressObserver?, lockHeld: Bool = false) throws -> CompactionReport {
        let lock = lockHeld ? nil : try FileLock(path: mirror.baseLockPath, kind: .exclusive, waitSeconds: 30,
                                                 holder: "a reader holds an old point")
        defer { lock?.release() }
        let journal = mirror.journal
        let start = try mirror.meta()
        guard target > start.horizon else {
            return CompactionReport(fromHorizon: start.horizon, toHorizon: start.horizon, blocksWritten: 0,
                                    recordsRemoved: 0, bytesFolded: 0, bookmarksRemoved: [])
        }
        let horizonRecord = try journal.env.read { try journal.header($0, seq: target) }
        // Peers that lack some of these records keep the blocks they changed instead.
        try mirror.recordFoldForPeers(horizon: start.horizon, target: target)
        CrashPoint.hit("compact.peers-recorded")
        // base.sums follows the fold when it described the horizon folded from.
        let sums = try FoldSums(mirror: mirror, from: start.horizon, uuid: start.uuid)
        let written = try fold(upTo: target, sums: sums, progress: progress)
        CrashPoint.hit("compact.folded")
        try mirror.base.sync()
        CrashPoint.hit("compact.base-synced")
        try sums?.finish(horizon: target)
        try deleteIndex(upTo: target, progress: progress)
        // Record `target` itself goes in the last transaction, with the header update, so an
        // interrupted compaction can always read the new horizon's time and byte count.
        var removed = start.horizon < target - 1 ? try journal.deleteRecords(start.horizon + 1...target - 1) : 0
        CrashPoint.hit("compact.records-deleted")
        var dropped: [String] = []
        try journal.env.write { txn in
            var m = try journal.readMeta(txn)
            if try txn.delete(journal.records, seqKey(target)) { removed += 1 }
            for (name, seq) in try journal.allBookmarks(txn) where seq < target {
                try journal.delete(bookmark: name, txn)
                dropped.append(name)
            }
            m.horizon = target
            m.horizonTime = horizonRecord.timestamp
            m.horizonCumulative = horizonRecord.cumulative
            if m.target < target { m.target = target }
            try journal.writeMeta(txn, m)
        }
        try mirror.sync()
        try deleteLogFiles(after: target)
        return CompactionReport(fromHorizon: start.horizon, toHorizon: target, blocksWritten: written,
                                recordsRemoved: removed, bytesFolded: horizonRecord.cumulative - start.horizonCumulative,
                                bookmarksRemoved: dropped)
    }

    /// Before step 1: every index entry of (horizon, target] passes its check and the record
    /// that wrote it agrees, and they add up to those records' tallies (`IndexTally`). One
    /// read-only pass over the index, in bounded read transactions (entries at or below the
    /// target do not change while the base lock is held); no payload is read.
    private func checkIndex(from horizon: UInt64, upTo target: UInt64) throws {
        let journal = mirror.journal
        var found = IndexTally()
        var resume = blockKey(0, 0)
        var finished = false
        var cached: (seq: UInt64, header: RecordHeader)?
        while !finished {
            try journal.env.read { txn in
                let cursor = try txn.cursor(journal.blocks)
                var entry = try cursor.seek(atLeast: resume)
                var scanned = 0
                while let e = entry {
                    guard let key = decodeBlockKey(e.key) else {
                        throw RewindError.damagedMirror(path: mirror.path, why: "an index key is \(e.key.count) bytes (journal/data.mdb is damaged)")
                    }
                    if scanned >= Self.chunkBlocks * 4 { resume = blockKey(key.block, key.seq); return }
                    scanned += 1
                    if key.seq > horizon && key.seq <= target {
                        let (content, hash) = try BlockContent.decode(e.value, seq: key.seq, block: key.block)
                        found.add(hash)
                        if cached?.seq != key.seq { cached = (key.seq, try journal.header(txn, seq: key.seq)) }
                        if let h = cached?.header, !mirror.entryMatches(h, block: key.block, content: content) {
                            throw RewindError.corruptBlock(seq: key.seq, block: key.block,
                                                           why: "its index entry does not match the record's \(h.kind.name) at \(h.offset)+\(h.length) (journal/data.mdb is damaged)")
                        }
                    }
                    entry = try cursor.next()
                }
                finished = true
            }
        }
        let expected = try journal.env.read { try journal.expectedTally($0, seqs: horizon + 1...target) }
        guard expected == found else {
            throw RewindError.damagedMirror(path: mirror.path, why: "the block index holds \(found.count) entries for seq:\(horizon + 1)...seq:\(target) where its records wrote \(expected.count)\(found.count == expected.count ? " (their checks differ)" : ""): journal/data.mdb is damaged; compaction stopped before deleting anything (`rewind verify` names the records)")
        }
    }

    /// Step 2: write each block's newest content <= target into base.img, once per block.
    /// Each entry it uses passes its own check (the tallies were checked before step 1).
    private func fold(upTo target: UInt64, sums: FoldSums?, progress: ProgressObserver?) throws -> UInt64 {
        let journal = mirror.journal
        let base = mirror.base
        let bs = UInt64(mirror.blockSize)
        var written: UInt64 = 0
        var block = [UInt8](repeating: 0, count: mirror.blockSize)
        var resume: [UInt8] = blockKey(0, 0)
        let total = try journal.env.read { try $0.count(journal.blocks) }
        progress?.begin(phase: "folding into base", total: UInt64(total))
        var scanned: UInt64 = 0
        var finished = false
        while !finished {
            // One bounded read transaction per chunk of blocks.
            try journal.env.read { txn in
                let cursor = try txn.cursor(journal.blocks)
                var entry = try cursor.seek(atLeast: resume)
                var blocksInChunk = 0
                var current: (block: UInt64, seq: UInt64, value: BlockContent)?
                func emit() throws {
                    guard let c = current else { return }
                    switch c.value {
                    case .zero:
                        try base.punchHole(at: c.block * bs, length: bs)
                        try sums?.folded(c.block, hash: nil)
                    case let .data(segment, off, hash):
                        try block.withUnsafeMutableBytes { b in
                            try journal.readBlock(seq: c.seq, block: c.block, segment: segment, offset: off, hash: hash, into: b)
                            try base.write(at: c.block * bs, from: UnsafeRawBufferPointer(b))
                        }
                        try sums?.folded(c.block, hash: hash)
                    }
                    written += 1
                    current = nil
                }
                while let e = entry {
                    guard let key = decodeBlockKey(e.key) else {
                        throw RewindError.damagedMirror(path: mirror.path, why: "an index key is \(e.key.count) bytes (journal/data.mdb is damaged)")
                    }
                    guard key.block < mirror.volumeSize / bs else {
                        throw RewindError.corruptBlock(seq: key.seq, block: key.block, why: "its index entry lies past the volume's end (journal/data.mdb is damaged)")
                    }
                    if key.block != current?.block {
                        try emit()
                        if blocksInChunk >= Self.chunkBlocks { resume = blockKey(key.block, 0); return }
                        blocksInChunk += 1
                    }
                    if key.seq <= target {
                        current = (key.block, key.seq, try BlockContent.decode(e.value, seq: key.seq, block: key.block).content)
                    }
                    scanned += 1
                    entry = try cursor.next()
                }
                try emit()
                finished = true
            }
            progress?.update(done: scanned)
            journal.env.releaseMappedPages()
        }
        progress?.end()
        return written
    }

    /// Step 3a: delete index entries <= target, all of one block's in the same transaction.
    private func deleteIndex(upTo target: UInt64, progress: ProgressObserver?) throws {
        let journal = mirror.journal
        var resume = blockKey(0, 0)
        var finished = false
        while !finished {
            try journal.env.write { txn in
                let cursor = try txn.cursor(journal.blocks)
                var entry = try cursor.seek(atLeast: resume)
                var blocksInChunk = 0
                var lastBlock: UInt64?
                while let e = entry {
                    guard let key = decodeBlockKey(e.key) else {
                        throw RewindError.damagedMirror(path: mirror.path, why: "an index key is \(e.key.count) bytes (journal/data.mdb is damaged)")
                    }
                    if key.block != lastBlock {
                        if blocksInChunk >= Self.chunkBlocks { resume = blockKey(key.block, 0); return }
                        blocksInChunk += 1
                        lastBlock = key.block
                    }
                    if key.seq <= target {
                        try cursor.deleteCurrent()
                        // After a delete LMDB's MDB_NEXT returns the entry that followed, without skipping.
                        entry = try cursor.next()
                    } else {
                        entry = try cursor.next()
                    }
                }
                finished = true
            }
            CrashPoint.hit("compact.index-chunk-deleted")
        }
    }

    /// Step 3c: delete the log files that hold nothing after `target` (whole files only: the
    /// chunk of record target+1, or the log's end, marks the first live byte). Runs after the
    /// header moved the horizon, so no reader or replay can want them.
    private func deleteLogFiles(after target: UInt64) throws {
        let journal = mirror.journal
        let firstLive = try journal.env.read { txn -> UInt64 in
            let m = try journal.readMeta(txn)
            guard target < m.lastSeq else { return m.logEnd }
            guard let next = try journal.record(txn, atOrAfter: target + 1) else { return m.logEnd }
            return next.header.segment - UInt64(LogChunk.headerSize)
        }
        journal.log.deleteFiles(before: firstLive)
        journal.log.punchDeadPrefix(before: firstLive)
    }
}

extension Journal {
    func delete(bookmark name: String, _ txn: LMDBTransaction) throws {
        try txn.delete(bookmarks, Array(name.utf8))
    }
}

extension Mirror {
    /// Compact up to `point` (folding every record at or before it into the base).
    public func compact(to point: Point, progress: ProgressObserver? = nil) throws -> CompactionReport {
        let target = try resolve(point)
        return try Compactor(mirror: self).compact(to: target, progress: progress)
    }

    /// Compact what falls outside a window of `keepAgeNanoseconds` and/or `keepBytes` of journal
    /// payload. Returns nil when nothing is outside it.
    /// `peersYield`: replication peers do not hold it back (the journal's file system is
    /// full: the volume goes on, and a peer left behind the horizon needs a new seed); pins do.
    public func compact(keepAgeNanoseconds: UInt64?, keepBytes: UInt64?, now: UInt64 = wallClockNanoseconds(),
                        sourceSyncedThrough: UInt64? = nil, peersYield: Bool = false,
                        progress: ProgressObserver? = nil) throws -> CompactionReport? {
        guard var target = try retentionTarget(keepAgeNanoseconds: keepAgeNanoseconds, keepBytes: keepBytes, now: now) else {
            return nil
        }
        if let (floor, _) = try unreplayedSourceFloor(sourceSyncedThrough: sourceSyncedThrough) {
            guard floor > (try meta().oldestPoint) else { return nil }
            target = min(target, floor)
        }
        // Retention stops at the oldest point in use (`retentionHeldBy` says so).
        if let pin = try (peersYield ? livePins() : retentionHolds()).first, pin.seq < target {
            guard pin.seq > (try meta().oldestPoint) else { return nil }
            target = pin.seq
        }
        do {
            return try Compactor(mirror: self).compact(to: target, sourceSyncedThrough: sourceSyncedThrough,
                                                       peersYield: peersYield, progress: progress)
        } catch RewindError.pinned {
            return nil  // a point pinned since the look above: the next pass stops at it
        }
    }

    /// The seq up to which the served source is known fdatasynced, when records follow it:
    /// those records are what a start after a crash (or after a server that stopped uncleanly)
    /// rewrites into the source (`rewriteBlocks(ofRecordsAfter:)`), so no compaction may fold
    /// them. `live`: a server owns the mirror now (it moves the floor every 10 s or sooner).
    /// nil when nothing is owed (a clean stop, a mirror never served).
    func unreplayedSourceFloor(sourceSyncedThrough: UInt64? = nil) throws -> (seq: UInt64, live: Bool)? {
        var m = try meta()
        if let synced = sourceSyncedThrough { m.sourceSyncedSeq = max(m.sourceSyncedSeq, min(synced, m.lastSeq)) }
        guard m.sourceSyncedSeq < m.lastSeq, try journal.env.read({ try $0.get(journal.meta, Array("source".utf8)) }) != nil else {
            return nil
        }
        guard let owner = try? FileLock(path: ownerLockPath, kind: .exclusive, holder: "") else { return (m.sourceSyncedSeq, true) }
        owner.release()
        return (m.sourceSyncedSeq, false)
    }

    /// The oldest pin, when it holds retention back: the window would fold past it.
    public func retentionHeldBy(keepAgeNanoseconds: UInt64?, keepBytes: UInt64?, now: UInt64 = wallClockNanoseconds()) throws -> Pin.Info? {
        guard let pin = try retentionHolds().first,
              let target = try retentionTarget(keepAgeNanoseconds: keepAgeNanoseconds, keepBytes: keepBytes, now: now),
              target > pin.seq else { return nil }
        return pin
    }

    /// The newest seq that falls outside the window, or nil.
    func retentionTarget(keepAgeNanoseconds: UInt64?, keepBytes: UInt64?, now: UInt64) throws -> UInt64? {
        try journal.env.read { txn in
            let m = try journal.readMeta(txn)
            var target = m.oldestPoint
            // A seq a catch-up skipped reads as the catch-up (times and byte counts still never decrease).
            func header(_ s: UInt64) throws -> RecordHeader { try journal.record(txn, atOrAfter: s)?.header ?? journal.header(txn, seq: s) }
            if let age = keepAgeNanoseconds {
                let cutoff = now > age ? now - age : 0
                // Newest record strictly older than the cutoff.
                var lo = m.oldestPoint, hi = m.lastSeq
                while lo < hi {
                    let mid = lo + (hi - lo + 1) / 2
                    if try header(mid).timestamp < cutoff { lo = mid } else { hi = mid - 1 }
                }
                if lo > m.oldestPoint { target = max(target, lo) }
            }
            if let keep = keepBytes, m.lastCumulative - m.horizonCumulative > keep {
                // Smallest seq s with lastCumulative - cumulative(s) <= keep.
                var lo = max(m.oldestPoint, m.horizon + 1), hi = m.lastSeq
                while lo < hi {
                    let mid = lo + (hi - lo) / 2
                    if m.lastCumulative - (try header(mid).cumulative) <= keep { hi = mid } else { lo = mid + 1 }
                }
                target = max(target, lo)
            }
            // Fold to a record, never into a catch-up's gap.
            if target > m.horizon, let r = try journal.record(txn, atOrAfter: target) { target = r.seq }
            return target > m.horizon ? target : nil
        }
    }
}
