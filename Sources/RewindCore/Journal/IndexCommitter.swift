import Foundation

/// The thread that owns a served journal's LMDB write transaction: it indexes the records the
/// writer has put in the log (`Batch`, one per group commit, in seq order) and commits them.
///
/// Why a thread of its own: under a stream of random writes an index commit took the writer
/// 200–360 ms every half second (the log's fdatasync, then LMDB writing and syncing ~16k dirty
/// leaves), and writes answered ahead of the journal filled their bound and waited — p99.99
/// latency of 0.4–0.6 s against nbdkit's 16 ms. LMDB ties a write transaction to the thread
/// that began it, so the index moves here whole, and the writer never waits for LMDB. Nothing
/// durable depends on it: the log is synced before each commit, and a record the index lacks
/// after a crash is indexed again from the log (`replayLogTail`).
public final class IndexCommitter: @unchecked Sendable {
    /// When a transaction commits: after `intervalNanoseconds` (readers of points see records
    /// this much later), or once it holds `maxChanges` records or `maxBlocks` block entries —
    /// LMDB keeps the pages those dirty in memory until the commit, at worst one 4 KiB leaf
    /// each (random writes over a large index), so `maxBlocks` bounds them (~64 MiB).
    public struct Policy: Sendable {
        public var intervalNanoseconds: UInt64
        public var maxChanges: Int
        public var maxBlocks: Int
        public init(intervalNanoseconds: UInt64, maxChanges: Int, maxBlocks: Int) {
            (self.intervalNanoseconds, self.maxChanges, self.maxBlocks) = (intervalNanoseconds, maxChanges, maxBlocks)
        }
    }

    /// One group commit's records (payload already in the log) and the header fields they move.
    struct Batch {
        var records: [(header: RecordHeader, seq: UInt64, blockHashes: [UInt64])] = []
        var blocks = 0
        var lastSeq: UInt64 = 0
        var lastTime: UInt64 = 0
        var lastCumulative: UInt64 = 0
        var logEnd: UInt64 = 0
        var sourceSynced: UInt64?
    }

    private let mirror: Mirror
    private let policy: Policy
    private let onFailure: @Sendable (Error) -> Void
    private let cond = NSCondition()
    // Under `cond`:
    private var queue: [Batch] = []
    private var queuedBlocks = 0
    private var commitWanted = false
    private var staging = false        // a transaction is open
    private var stopping = false
    private var abandoning = false
    private var abandoned = false      // the transaction was given up: nothing more is indexed
    private var exited = false
    private var failure: Error?
    // The committer thread's own:
    private var txn: LMDBTransaction?
    private var meta = MirrorMeta(blockSize: 512, uuid: [], volumeSize: 0, now: 0)
    private var stagedChanges = 0, stagedBlocks = 0
    private var stagedSince: UInt64 = 0

    init(mirror: Mirror, policy: Policy, onFailure: @escaping @Sendable (Error) -> Void) {
        self.mirror = mirror
        self.policy = policy
        self.onFailure = onFailure
        let thread = Thread { [self] in run() }
        thread.name = "rewind-index"
        thread.start()
    }

    /// Queue a batch. Waits while two transactions' worth of block entries are queued (the
    /// writer then runs at the index's pace: room for one commit's duration of arrivals);
    /// throws once indexing has failed or been given up.
    func send(_ batch: Batch) throws {
        cond.lock()
        defer { cond.unlock() }
        while failure == nil && !abandoned && !queue.isEmpty && queuedBlocks + batch.blocks > 2 * policy.maxBlocks {
            // The thread may be asleep on a short queue (it is woken per pile): a batch
            // larger than the room left must have it drain, or both wait for ever.
            cond.broadcast()
            cond.wait()
        }
        if let failure { throw failure }
        guard !abandoned else { throw RewindError.invalidArgument("the journal index was given up") }
        queue.append(batch)
        queuedBlocks += batch.blocks
        // Woken for a pile, not for every batch: a batch's indexing waits anyway (for the
        // interval, or `requestCommit` when the volume goes idle), and a wake-up per group
        // commit put a thread switch and LMDB's work beside every FLUSH at queue depth 1.
        if queue.count >= Self.wakeBatches || queuedBlocks >= policy.maxBlocks / 16 { cond.broadcast() }
    }

    /// Batches queued before the thread is woken to index them (or fewer holding
    /// `maxBlocks / 16` block entries).
    static let wakeBatches = 16

    /// Commit what has been sent, soon (without waiting).
    func requestCommit() {
        cond.lock()
        commitWanted = true
        cond.broadcast()
        cond.unlock()
    }

    /// Commit everything sent so far, and wait until it is committed.
    func commitAndWait() throws {
        cond.lock()
        defer { cond.unlock() }
        commitWanted = true
        cond.broadcast()
        while failure == nil && !abandoned && (commitWanted || !queue.isEmpty || staging) { cond.wait() }
        if let failure { throw failure }
    }

    /// Give up what is staged and queued (the log keeps it: the next writer indexes it again)
    /// and LMDB's writer lock with it; wait until the transaction is gone. Nothing is indexed
    /// after this.
    func abandon() {
        cond.lock()
        abandoning = true
        cond.broadcast()
        while !abandoned && !exited { cond.wait() }
        cond.unlock()
    }

    /// End the thread once nothing is staged or queued (after `commitAndWait` or `abandon`).
    func stop() {
        cond.lock()
        stopping = true
        cond.broadcast()
        while !exited { cond.wait() }
        cond.unlock()
    }

    private func run() {
        cond.lock()
        while true {
            if abandoning && !abandoned {
                cond.unlock()
                txn?.abort()
                txn = nil
                cond.lock()
                (queue, queuedBlocks, staging, abandoned) = ([], 0, false, true)
                cond.broadcast()
                continue
            }
            if !abandoned && failure == nil, !queue.isEmpty {
                let batch = queue.removeFirst()
                cond.unlock()
                var error: Error?
                do {
                    try index(batch)
                    if stagedBlocks >= policy.maxBlocks || stagedChanges >= policy.maxChanges
                        || monotonicNanoseconds() - stagedSince >= policy.intervalNanoseconds {
                        try commit()
                    }
                } catch let e { error = e }
                cond.lock()
                queuedBlocks -= batch.blocks
                if let error { fail(error) }
                cond.broadcast()
                continue
            }
            if staging && failure == nil && (commitWanted || stopping || monotonicNanoseconds() - stagedSince >= policy.intervalNanoseconds) {
                cond.unlock()
                var error: Error?
                do { try commit() } catch let e { error = e }
                cond.lock()
                if let error { fail(error) }
                cond.broadcast()
                continue
            }
            if commitWanted && !staging {  // nothing (more) to commit
                commitWanted = false
                cond.broadcast()
            }
            if stopping && !staging { break }
            if staging {
                let due = stagedSince + policy.intervalNanoseconds, now = monotonicNanoseconds()
                if due > now { _ = cond.wait(until: Date(timeIntervalSinceNow: Double(due - now) / 1e9)) }
            } else {
                cond.wait()
            }
        }
        exited = true
        cond.broadcast()
        cond.unlock()
    }

    /// Under `cond`: indexing failed; give the transaction up (the log keeps its records) and
    /// refuse everything after.
    private func fail(_ error: Error) {
        cond.unlock()
        txn?.abort()
        txn = nil
        onFailure(error)
        cond.lock()
        if failure == nil { failure = error }
        (queue, queuedBlocks, staging) = ([], 0, false)
    }

    /// Index one batch in the open transaction (beginning one if none is open).
    private func index(_ batch: Batch) throws {
        let journal = mirror.journal
        do {
            if txn == nil {
                let t = try journal.env.beginWrite()
                do {
                    meta = try journal.readMeta(t)
                    if meta.pendingRollback != MirrorMeta.none { throw RewindError.interruptedRollback(target: meta.pendingRollback) }
                } catch {
                    t.abort()
                    throw error
                }
                txn = t
                (stagedChanges, stagedBlocks, stagedSince) = (0, 0, monotonicNanoseconds())
                cond.lock(); staging = true; cond.unlock()
            }
            guard let txn else { return }
            let cursor = try txn.cursor(journal.blocks)
            for r in batch.records {
                // Each index update faults in a journal page (see `Journal.touched`).
                journal.touched(Mirror.indexUpdateBytes)
                try mirror.index(r.header, seq: r.seq, blockHashes: r.blockHashes, txn, cursor)
            }
            if let s = batch.sourceSynced { meta.sourceSyncedSeq = s }
            (meta.lastSeq, meta.lastTime, meta.lastCumulative, meta.logEnd) = (batch.lastSeq, batch.lastTime, batch.lastCumulative, batch.logEnd)
            try journal.writeMeta(txn, meta)
            stagedChanges += batch.records.count
            stagedBlocks += batch.blocks
        } catch let e as LMDBError {
            throw RewindError.journal(e)
        }
    }

    /// Sync the log (the index must never name payload a power loss could take away), then
    /// commit the transaction.
    private func commit() throws {
        guard let txn else { return }
        try mirror.journal.log.sync()
        self.txn = nil
        defer {  // only once LMDB's commit is done: `commitAndWait` returns on these
            cond.lock()
            staging = false
            if queue.isEmpty { commitWanted = false }  // else the batches sent before the request still owe a commit
            cond.unlock()
        }
        do {
            try txn.commit()
        } catch let e as LMDBError {
            throw RewindError.journal(e)
        }
        // Index updates map journal pages: keep resident memory bounded.
        mirror.journal.boundResidency()
        mirror.indexCommitted?()
    }
}
