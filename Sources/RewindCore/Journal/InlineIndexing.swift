/// Indexing in an LMDB write transaction on the writer's thread, kept open across appends
/// until `commit()` makes it visible to readers. The default: tools and tests that append,
/// then commit.
///
/// LMDB's writer lock belongs to the thread that took it: use from the writer's thread only.
final class InlineIndexing: JournalIndexing {
    private let mirror: Mirror
    private var journal: Journal { mirror.journal }
    private let appender: ChunkAppender
    private var txn: LMDBTransaction?
    /// The current append's cursor on `blocks` in `txn`: closed (nil) before `txn` ends.
    private var cursor: LMDBCursor?
    private(set) var meta: MirrorMeta?
    /// The log's end when the open transaction began (nil once committed): what an abort
    /// that discards the log cuts back to.
    private var beganAtLogEnd: UInt64?

    var commitOwed: Bool { false }

    init(mirror: Mirror, appender: ChunkAppender) {
        self.mirror = mirror
        self.appender = appender
    }

    func beginAppend() throws -> MirrorMeta {
        let txn = try begin()
        guard let meta else {
            throw RewindError.invalidArgument("no open journal transaction")
        }
        cursor = try txn.cursor(journal.blocks)
        return meta
    }

    private func begin() throws -> LMDBTransaction {
        if let txn { return txn }
        let t = try journal.env.beginWrite()
        do {
            let m = try journal.readMeta(t)
            if m.pendingRollback != MirrorMeta.none { throw RewindError.interruptedRollback(target: m.pendingRollback) }
            meta = m
            beganAtLogEnd = m.logEnd
            appender.syncedTo = m.logEnd  // synced by whoever committed it (a rollback may have cut it back)
        } catch {
            t.abort()
            throw error
        }
        txn = t
        return t
    }

    func index(_ header: RecordHeader, seq: UInt64, blockHashes: [UInt64], blocks: Int) throws {
        guard let txn, let cursor else {
            throw RewindError.invalidArgument("no open journal transaction")
        }
        // Each index update faults in a journal page, which may map the 2 MiB folio around
        // it: counted as `indexUpdateBytes` of reading (see `Journal.touched`).
        journal.touched(Mirror.indexUpdateBytes)
        try mirror.index(header, seq: seq, blockHashes: blockHashes, txn, cursor)
    }

    /// As the open transaction sees it: records staged earlier in this append included.
    func newest(_ block: UInt64) throws -> (seq: UInt64, content: BlockContent)? {
        guard let cursor else {
            throw RewindError.invalidArgument("no open journal transaction")
        }
        return try journal.lookup(cursor, block: block, atOrBefore: UInt64.max)
    }

    /// base.img: the index holds every record.
    func readUnindexed(_ block: UInt64, into dst: UnsafeMutableRawBufferPointer) throws {
        try mirror.base.read(at: block * UInt64(mirror.blockSize), into: dst)
    }

    func finishAppend(_ meta: MirrorMeta, sourceSynced: UInt64?) throws {
        cursor = nil
        guard let txn else {
            throw RewindError.invalidArgument("no open journal transaction")
        }
        try journal.writeMeta(txn, meta)
        self.meta = meta
    }

    /// Sync the log, then commit the index transaction (readers see the new records). If the
    /// sync fails the transaction stays open and the caller chooses how to abort; if LMDB's
    /// commit fails the transaction is gone, and `abort(keepLog: false)` can still cut the log.
    func commit() throws {
        guard let txn else { return }
        try appender.syncLog(upTo: meta?.logEnd)
        cursor = nil
        self.txn = nil
        meta = nil
        do {
            try txn.commit()
        } catch let e as LMDBError {
            throw RewindError.journal(e)
        }
        beganAtLogEnd = nil
        mirror.indexCommitted?()
    }

    /// Nothing to ask: `commit()` commits on this thread.
    func requestCommit() {}

    /// Abandon what is staged. With `keepLog` false, the log is cut back to where the
    /// transaction began, so no later replay resurrects the abandoned records; with it true
    /// (a fenced server whose source already holds them), the next writer replays them.
    func abort(keepLog: Bool) {
        // Cut the log while still holding LMDB's writer lock, so no other writer's chunk can
        // have followed ours.
        if !keepLog, let end = beganAtLogEnd { try? journal.log.truncate(at: end) }
        cursor = nil
        txn?.abort()
        txn = nil
        meta = nil
        beganAtLogEnd = nil
    }

    func stop() {}
}
