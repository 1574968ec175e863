import Foundation
import Logging
import NIOCore
import RewindCore
import RewindNBD

/// The sequencer: one thread per served volume that turns write-nature requests into journal
/// records and source writes, in one order.
///
/// Requests from every connection join one FIFO in the order they arrive; that order is the
/// seq order in the journal and the order of writes to the source (invariants 2 and 5).
///
/// Group commit in time: a plain write is answered as soon as it is queued and visible to
/// reads (`overlay`), like a write into a disk's cache; the commit thread takes everything
/// queued every `commitIntervalNanoseconds` (or sooner when a FLUSH or FUA write waits, or the
/// queue passes `ackedBytesMax`), appends it to the journal as one log chunk — the journal
/// first, write-ahead — then applies it to the source in the same order. The source writes
/// of a batch run on a second thread (`applyQueue`) while the writer journals the next batch:
/// the kernel's cost of a buffered write into the source is as large as the whole journal's,
/// and one thread doing both was the bottleneck. At most one batch is at the applier; overlay
/// reads see it until it is in the source. A FLUSH or FUA
/// request is answered once its batch is in the log and the log and the source are
/// fdatasynced, so it covers every write answered before it, on any connection. The LMDB index
/// of those records is built and committed on a third thread (`IndexCommitter`, by
/// `indexPolicy`), off the FLUSH path and off this one: the synced log alone brings records
/// back after a crash (`JournalWriter`). A crash can lose
/// answered writes that no FLUSH covered — exactly what NBD allows — but never leaves the
/// source holding a write the journal lacks.
final class VolumeWriter: @unchecked Sendable {
    enum Kind {
        case write([UInt8])
        case zero(length: UInt64, noHole: Bool)
        case trim(length: UInt64)
        case flush
    }
    struct Op {
        var kind: Kind
        var offset: UInt64
        var fua: Bool
        /// Answered at commit (FLUSH, FUA, or over the acked-bytes bound); nil once answered.
        var promise: EventLoopPromise<Void>?
        var bytes: Int { if case .write(let d) = kind { return d.count } else { return 0 } }
        var needsSync: Bool { if fua { return true }; if case .flush = kind { return true }; return false }
        var range: Range<UInt64> {
            switch kind {
            case .write(let d): return offset..<offset + UInt64(d.count)
            case let .zero(length, _), let .trim(length): return offset..<offset + length
            case .flush: return 0..<0
            }
        }
    }

    /// Longest an answered write waits to be committed: bounds what a crash can lose of
    /// unflushed writes and amortises the journal's fdatasync over many writes.
    static let commitIntervalNanoseconds: UInt64 = 5_000_000
    /// Answered-but-uncommitted bytes at most; past it, writes are answered at commit
    /// (backpressure). 8 MiB, not 32: once the index thread sets the pace the queue stays full,
    /// and 32 MiB of it cost ~60 MiB of peak RSS for no more throughput (docs/benchmarks.md).
    static let ackedBytesMax = 8 << 20
    /// Bytes and requests taken into one commit: a write answered at its commit waits for its
    /// whole batch to be journalled and applied, so batches stay short.
    static let maxBatchBytes = 32 << 20
    static let maxBatchOps = 1024
    /// Source writes are cut at this alignment, so the source's page cache holds folios of at
    /// most this size. ext4's buffered write walks every block of the folio it lands in
    /// (`ext4_block_write_begin`): a 4 KiB write into the 1 MiB folio a 1 MiB write left
    /// behind visited 256 buffer heads, 43 % of the server's CPU at random 4 KiB writes.
    static let sourceWritePieceBytes = 64 << 10
    /// When the index thread commits. Once a second: each commit costs the device two cache
    /// flushes (the log's `fdatasync`, then LMDB's), 30–60 ms each under a steady stream of
    /// writes on the reference machine, and at one commit per 100 ms random 4 KiB writes at
    /// QD 16 fell to 22–27k IOPS (against 32–47k). At most 16,384 block entries: LMDB holds
    /// the pages they dirty in memory until the commit, at worst one 4 KiB leaf each, so ~64 MiB
    /// whatever the volume's size (a second of random writes unbounded, ~38k entries, took the
    /// server's peak RSS to ~215 MiB). docs/benchmarks.md has the figures.
    static let indexPolicy = IndexCommitter.Policy(intervalNanoseconds: 1_000_000_000, maxChanges: 65536, maxBlocks: 16384)
    /// Once no request has come for this long, staged index updates commit at once, so a
    /// `timeline` or `restore` run after a client finishes sees its records. 20 ms, not 1: at
    /// queue depth 1 a write + FLUSH cycle left a 1 ms gap in 15–20 % of cycles on a loaded
    /// 2-vCPU machine, and each such commit's LMDB fdatasync slowed the next FLUSH (125–150
    /// commits a second; FLUSH 955–1,208 µs against 899–989 µs at 20 ms).
    static let indexCommitIdleNanoseconds: UInt64 = 20_000_000

    private let mirror: Mirror
    /// Used by the writer thread only.
    private let journal: JournalWriter
    private let source: BlockFile
    /// Whether the source's fdatasync flushes the device cache under the log too (one ext4 or
    /// XFS file system): then a FLUSH can cost the device one cache flush (`syncLogAndSource`).
    private let logSharesSourceFlush: Bool
    private let logger: Logger
    private let metrics: ServeMetrics
    private let cond = NSCondition()
    private var queue: [Op] = []          // not yet taken by the commit thread
    private var inCommit: [Op] = []       // taken, not yet applied to the source
    private var applying: [Op] = []       // journalled and handed to the applier, not yet in the source
    /// Source writes of journalled batches, one batch at a time, in order.
    private let applyQueue = DispatchQueue(label: "rewind-apply")
    private var queuedBytes = 0
    private var syncWanted = false
    private var stopping = false
    private var finished = false
    private var fenced: String?
    private var syncedSeq: UInt64
    /// When the writer last had work — a request arrived or a batch finished (monotonic ns):
    /// the idle clock for index commits. A commit that took longer than the idle interval
    /// (a FLUSH on a slow disk) must not count as idleness, or every FLUSH at queue depth 1
    /// would be followed by an index commit that the next request waits behind.
    private var lastActiveAt: UInt64 = 0
    /// When the oldest queued request arrived (monotonic ns): a group is taken
    /// `commitIntervalNanoseconds` after it, however the writer was woken.
    private var firstQueuedAt: UInt64 = 0
    /// A plain write into an empty queue wakes the writer from its event loop's timer, at the
    /// group's deadline, not at once (`submit`); set while such a wake is pending.
    private var wakeScheduled = false

    init(mirror: Mirror, source: BlockFile, syncedSeq: UInt64, metrics: ServeMetrics, logger: Logger) {
        self.mirror = mirror
        self.journal = JournalWriter(mirror: mirror)
        journal.keepsLogOutOfCache = true
        logSharesSourceFlush = journal.logSharesDeviceFlush(with: source)
        self.source = source
        self.syncedSeq = syncedSeq
        self.metrics = metrics
        self.logger = logger
        journal.indexOnThread(policy: Self.indexPolicy, onFailure: { [weak self] error in
            self?.fenceFromOtherThread("journal index commit failed: \(error)")
        }, readVolume: { [unowned self] offset, dst in
            // A partial block merges with the source's content once the batch before is in it.
            if let why = waitForApplier() { throw RewindError.invalidArgument("volume fenced: \(why)") }
            try source.read(at: offset, into: dst)
        })
    }

    func start() {
        let t = Thread { [self] in run() }
        t.name = "rewind-writer"
        t.start()
    }

    func submit(_ op: Op, on loop: EventLoop) {
        var op = op
        var scheduleWake = false, signal = false
        var answerNow: EventLoopPromise<Void>?
        var refuse: NBDErrno?
        cond.lock()
        if stopping { refuse = .shutdown } else if fenced != nil { refuse = .io } else {
            if !op.needsSync && queuedBytes + op.bytes <= Self.ackedBytesMax {
                answerNow = op.promise
                op.promise = nil
            }
            if op.needsSync { syncWanted = true }
            // Wake the writer only when it has something to do: while it gathers a group it
            // wakes by itself at the deadline, and a wake per request (a futex call here, a
            // context switch there, the lock handed back and forth) cost random 4 KiB writes
            // at queue depth 16 a quarter of their throughput. A plain write into an empty
            // queue has nothing to do before the group's deadline either: the event loop's
            // timer wakes the writer then, so a write followed by a FLUSH (queue depth 1)
            // costs one cross-thread wake-up, not two — each is an IPI to a halted vCPU in a
            // VM (FLUSH at QD 1: docs/design.md).
            let now = monotonicNanoseconds()
            if queue.isEmpty { firstQueuedAt = now }
            let wake = op.needsSync || queuedBytes < Self.ackedBytesMax / 2 && queuedBytes + op.bytes >= Self.ackedBytesMax / 2
            if !wake && queue.isEmpty && !wakeScheduled { (wakeScheduled, scheduleWake) = (true, true) }
            queuedBytes += op.bytes
            queue.append(op)
            lastActiveAt = now
            signal = wake
        }
        cond.unlock()
        // After unlocking: signalled under the lock, the writer woke only to block on it.
        if signal { cond.signal() }
        if scheduleWake {
            loop.scheduleTask(in: .nanoseconds(Int64(Self.commitIntervalNanoseconds))) { [self] in
                cond.lock()
                wakeScheduled = false
                if !queue.isEmpty { cond.signal() }
                cond.unlock()
            }
        }
        if let refuse { op.promise?.fail(refuse) }
        answerNow?.succeed(())  // after it is in the queue: every later read sees it
    }

    /// Writes answered but not yet in the source that overlap `range`, in order.
    func overlay(_ range: Range<UInt64>) -> [Op] {
        cond.lock()
        defer { cond.unlock() }
        guard !applying.isEmpty || !inCommit.isEmpty || !queue.isEmpty else { return [] }
        return (applying + inCommit + queue).filter { $0.range.overlaps(range) }
    }

    /// Whether any write answered but not yet in the source overlaps `range` (what `overlay`
    /// returns, without building it: asked on every read).
    func overlaps(_ range: Range<UInt64>) -> Bool {
        cond.lock()
        defer { cond.unlock() }
        return applying.contains { $0.range.overlaps(range) } || inCommit.contains { $0.range.overlaps(range) }
            || queue.contains { $0.range.overlaps(range) }
    }

    /// Commit everything queued, sync source and journal, record the source as synced, stop.
    func stop() {
        cond.lock()
        stopping = true
        cond.broadcast()
        while !finished { cond.wait() }
        cond.unlock()
    }

    private func run() {
        cond.lock()
        while true {
            if queue.isEmpty && !stopping {
                // Idle: have the index committed once no request has come for a moment.
                if journal.commitOwed {
                    let due = lastActiveAt + Self.indexCommitIdleNanoseconds
                    let now = monotonicNanoseconds()
                    if now >= due {
                        cond.unlock()
                        journal.requestCommit()
                        cond.lock()
                    } else {
                        _ = cond.wait(until: Date(timeIntervalSinceNow: Double(due - now) / 1e9))
                    }
                } else {
                    cond.wait()
                }
                continue
            }
            if queue.isEmpty && stopping { break }
            // Let a group gather, unless someone waits for a sync or the queue is large.
            let due = firstQueuedAt + Self.commitIntervalNanoseconds, now = monotonicNanoseconds()
            let deadline = Date(timeIntervalSinceNow: Double(due > now ? due - now : 0) / 1e9)
            while !syncWanted && !stopping && queuedBytes < Self.ackedBytesMax / 2 {
                if !cond.wait(until: deadline) { break }
            }
            var take = 0, bytes = 0
            while take < queue.count && take < Self.maxBatchOps && (take == 0 || bytes + queue[take].bytes <= Self.maxBatchBytes) {
                bytes += queue[take].bytes
                take += 1
            }
            inCommit = Array(queue[0..<take])
            queue.removeFirst(take)
            queuedBytes -= bytes
            syncWanted = queue.contains { $0.needsSync }
            let batch = inCommit
            cond.unlock()
            let (failure, handedOff) = commit(batch)
            cond.lock()
            inCommit.removeAll()
            lastActiveAt = monotonicNanoseconds()
            cond.broadcast()
            cond.unlock()
            if !handedOff {
                for op in batch { if let failure { op.promise?.fail(failure) } else { op.promise?.succeed(()) } }
            }
            cond.lock()
        }
        cond.unlock()
        _ = waitForApplier()
        finalSync()
        cond.lock()
        finished = true
        cond.broadcast()
        cond.unlock()
    }

    /// Journal (log chunk, its index updates queued), then source, then (if asked) sync of both.
    /// Returns the errno to answer waiting requests with (nil: success); `handedOff` when the
    /// batch's source writes went to the applier, which answers its waiting requests.
    private func commit(_ batch: [Op]) -> (NBDErrno?, handedOff: Bool) {
        if let fenced = fenceReason {
            journal.abort(keepLog: true)  // the applier may have fenced: give up LMDB's writer lock here
            logger.debug("refusing \(batch.count) requests: volume fenced (\(fenced))")
            return (.io, false)
        }
        let changes: [Change] = batch.map { op in
            switch op.kind {
            case .write(let data): return .write(op.offset, data, fua: op.fua)
            case let .zero(length, _): return .zero(op.offset, length, fua: op.fua)
            case let .trim(length): return .trim(op.offset, length, fua: op.fua)
            case .flush: return .flush
            }
        }
        let seqs: ClosedRange<UInt64>
        do {
            seqs = try journal.append(changes, sourceSynced: syncedSeq)
        } catch {
            journal.abort(keepLog: true)
            // Writes already answered are lost to the journal: refuse everything from now on,
            // so the next FLUSH reports the failure (as a disk reports a writeback error).
            fence("journal append failed: \(error)")
            return (Self.isOutOfSpace(error) ? .nospc : .io, false)
        }
        metrics.journalAppended(records: batch.count, bytes: batch.reduce(0) { $0 + $1.bytes }, lastSeq: seqs.upperBound)
        // The previous batch reaches the source first (seq order, invariant 5).
        if waitForApplier() != nil {
            journal.abort(keepLog: true)  // the applier fenced the volume (and logged why)
            return (.io, false)
        }
        let needsSync = batch.contains(where: \.needsSync)
        if !needsSync {
            cond.lock()
            applying = batch  // moved in one step: overlay reads never miss it nor see it twice
            inCommit.removeAll()
            cond.unlock()
            applyQueue.async { [self] in apply(batch) }
            return (nil, true)
        }
        do {
            try Self.write(batch, to: source)
        } catch {
            fence("source write failed: \(error)")
            return (.io, false)
        }
        let started = DispatchTime.now().uptimeNanoseconds
        do {
            try syncLogAndSource()
            syncedSeq = seqs.upperBound
        } catch {
            // After a failed sync the page cache may have dropped the data: never ack again.
            fence("sync failed: \(error)")
            return (.io, false)
        }
        metrics.flushed(nanoseconds: DispatchTime.now().uptimeNanoseconds - started)
        return (nil, false)
    }

    /// Make the log and the source durable. When the source's fdatasync flushes the device
    /// cache under the log too and the log owes only data, the log is written out first and
    /// the source's fdatasync is the one cache flush for both (`PayloadLog.sync(flushedBy:)`);
    /// otherwise the two fdatasyncs run side by side.
    private func syncLogAndSource() throws {
        if logSharesSourceFlush {
            source.startWriteback()  // the source's pages travel while the log's are written out
            if try journal.syncLog(sharingFlush: { try source.dataSync() }) { return }
        }
        // The two syncs touch different files: run them side by side.
        let sourceSync = SyncResult()
        let group = DispatchGroup()
        DispatchQueue.global().async(group: group) { [source] in sourceSync.set { try source.dataSync() } }
        defer { group.wait() }  // never leave the source's sync running past a failure
        try journal.syncLog()
        group.wait()
        try sourceSync.get()
    }

    /// Write a journalled batch's changes to the source, in order.
    private static func write(_ batch: [Op], to source: BlockFile) throws {
        for op in batch {
            switch op.kind {
            case .write(let data): try source.write(at: op.offset, data, piecesOf: Self.sourceWritePieceBytes)
            case let .zero(length, noHole):
                if noHole {
                    if try !source.zeroRange(at: op.offset, length: length) { try source.writeZeros(at: op.offset, length: length) }
                } else {
                    try source.punchHole(at: op.offset, length: length)
                }
            case let .trim(length): try source.punchHole(at: op.offset, length: length)
            case .flush: break
            }
        }
    }

    /// On `applyQueue`: the source writes of a batch with no FLUSH or FUA in it, then its
    /// waiting requests answered. A failure fences the volume at once (later writes are
    /// refused); the writer thread gives up the journal's transaction when it next looks.
    private func apply(_ batch: [Op]) {
        var failure: String?
        do { try Self.write(batch, to: source) } catch { failure = "source write failed: \(error)" }
        cond.lock()
        applying.removeAll()
        // Under the same lock: the writer, woken by the broadcast, must see the fence.
        if let failure, fenced == nil { fenced = failure }
        cond.broadcast()
        cond.unlock()
        if let failure { announceFence(failure) }
        for op in batch { if failure != nil { op.promise?.fail(NBDErrno.io) } else { op.promise?.succeed(()) } }
    }

    /// Wait until the applier has written the batch it holds; the fencing reason if it failed.
    private func waitForApplier() -> String? {
        cond.lock()
        defer { cond.unlock() }
        while !applying.isEmpty { cond.wait() }
        return fenced
    }

    /// Why writes are refused, once the volume is fenced.
    var fenceReason: String? {
        cond.lock()
        defer { cond.unlock() }
        return fenced
    }

    /// The journal's map or the disk is full: answer ENOSPC rather than EIO.
    static func isOutOfSpace(_ error: Error) -> Bool {
        switch error {
        case let RewindError.journal(e): return e.isMapFull || e.code == ENOSPC
        case let RewindError.io(_, _, errno): return errno == ENOSPC
        case let e as LMDBError: return e.isMapFull || e.code == ENOSPC
        default: return false
        }
    }

    /// Refuse every later write. Called on the writer thread, which also gives up its open
    /// index transaction (and with it LMDB's writer lock, which compaction and `bookmark`
    /// need): the log keeps the staged records, and the next start indexes them.
    private func fence(_ why: String) {
        journal.abort(keepLog: true)
        _ = recordFence(why)
        announceFence(why)
    }

    /// Refuse every later write, from the index thread: the writer thread gives up the
    /// journal's index when it next looks (`commit`).
    private func fenceFromOtherThread(_ why: String) {
        if recordFence(why) { announceFence(why) }
    }

    /// Set the fence (the first failure is the reason) and wake the writer; whether this was
    /// the first.
    private func recordFence(_ why: String) -> Bool {
        cond.lock()
        defer { cond.unlock() }
        let first = fenced == nil
        if first { fenced = why }
        cond.broadcast()
        return first
    }

    private func announceFence(_ why: String) {
        metrics.volumeFenced()
        logger.critical("volume fenced, every further write fails with EIO: \(why)")
    }

    private func finalSync() {
        guard fenceReason == nil else {
            journal.abort(keepLog: true)  // on this thread, which holds LMDB's writer lock
            return
        }
        do {
            try source.dataSync()
            try journal.commit()
            try mirror.sync()
            try mirror.markSourceSynced(try mirror.meta().lastSeq)
        } catch {
            journal.abort(keepLog: true)
            logger.error("final sync failed: \(error)")
        }
    }
}

/// The outcome of a sync run on another thread.
final class SyncResult: @unchecked Sendable {
    private var error: Error?
    func set(_ body: () throws -> Void) { do { try body() } catch { self.error = error } }
    func get() throws { if let error { throw error } }
}
