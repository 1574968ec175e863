import Foundation

/// The write path of a served volume: one sequencer that turns write-nature requests from
/// every connection into journal records and source writes, in one order. Engine logic with
/// no network types in it: requests come in as `VolumeOp`s and are answered through their
/// completions, so it is tested on its own (`ServePipelineTests`, the power-cut simulation).
///
/// Five threads, each with one job:
/// - the **writer** (group commit): requests join one FIFO in the order they arrive — the
///   seq order of the journal and the order of writes to the source (invariants 2 and 5). A
///   plain write is answered as soon as it is queued and visible to reads (`overlay`), like a
///   write into a disk's cache; every `commitIntervalNanoseconds` (sooner when a FLUSH or FUA
///   write waits, or the queue passes `ackedBytesMax / 2`) the writer appends everything
///   queued to the payload log as one chunk. A FLUSH or FUA request is answered once the log
///   is fdatasynced past it: the journal alone makes it durable, whatever the source holds.
/// - the **applier** writes journalled batches to the source, in order — and only once their
///   log chunk is durable (write-ahead across a power cut: the source never holds a write
///   the journal could lose). Batches that a FLUSH's sync already covered go at once; for the
///   others the **log syncer** fdatasyncs the log, one sync for every batch waiting when it
///   starts, while the applier writes those already durable.
///   A fourth thread fdatasyncs the source every 10 s (or after 4 GiB or 100,000
///   records), and that seq becomes the mirror's
///   `sourceSyncedSeq`: what a start after a crash must rewrite is the records after it
///   (`Mirror.rewriteBlocks(ofRecordsAfter:)`), seconds of writes, not the history.
/// - the **index thread** (`IndexCommitter`) builds and commits the LMDB index of what the
///   writer logged, off both paths; the synced log alone brings records back after a crash.
///
/// Any failure — a log append, a sync of the log or the source, a source write, an index
/// commit — fences the volume for good: every request in flight and after is answered EIO
/// (ENOSPC when the disk or map is full), no FLUSH is answered with success again, and reads
/// go on from the source and what is still queued for it. Nothing is retried: after a failed
/// sync the kernel may have dropped the pages it could not write (`PayloadLog.failure`).
public final class ServePipeline: @unchecked Sendable {
    /// The syncs the pipeline makes, for metrics and the benchmark's count of them.
    public enum SyncKind: String, Sendable, CaseIterable {
        /// The log, before a FLUSH or FUA write is answered.
        case flush
        /// The log, before batches no FLUSH covered are written to the source (write-ahead).
        case beforeApply = "before_apply"
        /// The source, every 10 s or sooner: moves `sourceSyncedSeq` (what recovery starts from).
        case source
    }

    /// What a full journal does (`--on-full`): the log's file system, or LMDB's, refused a write.
    public enum FullPolicy: String, Sendable, CaseIterable {
        /// Give up the oldest history: fold it into the base (compaction), which frees the log
        /// it held, and journal the write again; fence with ENOSPC only when that frees nothing.
        case compact
        /// Fence at once: the write is answered ENOSPC, every later one EIO.
        case fail
    }

    public struct Tuning: Sendable {
        /// Longest an answered write waits to be journalled: bounds what a crash can lose of
        /// unflushed writes and amortises the log's writes over many requests.
        public var commitIntervalNanoseconds: UInt64 = 5_000_000
        /// Answered-but-unjournalled bytes at most; past it, writes are answered once journalled
        /// (backpressure). 8 MiB, not 32: once the index thread sets the pace the queue stays full,
        /// and 32 MiB of it cost ~60 MiB of peak RSS for no more throughput (docs/benchmarks.md).
        public var ackedBytesMax = 8 << 20
        /// Bytes and requests taken into one group commit.
        public var maxBatchBytes = 32 << 20
        public var maxBatchOps = 1024
        /// Journalled bytes not yet in the source at most; past it the writer waits for the applier.
        public var applyBacklogBytesMax = 64 << 20
        /// Longest a journalled batch waits for the log sync that lets it into the source (unless
        /// half of `applyBacklogBytesMax` waits, or a FLUSH syncs first). Each sync ends with a
        /// device cache flush, which in a VM is the host's fsync of the disk image: back to back
        /// they cost random 4 KiB writes at QD 16 a third of their throughput.
        public var writeAheadIntervalNanoseconds: UInt64 = 50_000_000
        /// Bytes of journalled batches waiting for their log sync that start it at once: half the
        /// backlog bound (a quarter measured the same for sequential writes).
        public var writeAheadBytes = 32 << 20
        /// How often the source is fdatasynced (`sourceSyncedSeq`: what a start after a crash
        /// rewrites is the records after it), at the latest — sooner once `sourceSyncBytes` or
        /// `sourceSyncRecords` were written to it since. Not every second: each sync writes back
        /// what the page cache would otherwise coalesce or write later, and at once a second
        /// random 4 KiB writes at QD 16 lost a third of their throughput here.
        public var sourceSyncIntervalNanoseconds: UInt64 = 10_000_000_000
        /// Bytes written to the source since its last sync that call for the next one now: what a
        /// start after a crash may rewrite, at most (DRBD's default activity log covers 1,237
        /// extents of 4 MiB, 4.8 GiB, for the same purpose). Not 1 GiB: each sync writes back
        /// what the page cache would otherwise coalesce, and at one per GiB sequential 1 MiB
        /// writes lost a quarter of their throughput here (docs/benchmarks.md).
        public var sourceSyncBytes = 4 << 30
        /// Records written to the source since its last sync that call for the next one now
        /// (bounds the records a start after a crash reads).
        public var sourceSyncRecords: UInt64 = 100_000
        /// When the index thread commits. Once a second: each commit costs the device two cache
        /// flushes (the log's, then LMDB's), and at one commit per 100 ms random 4 KiB writes at
        /// QD 16 fell to 22–27k IOPS (against 32–47k). At most 16,384 block entries: LMDB holds the
        /// pages they dirty in memory until the commit, ~64 MiB at worst (docs/benchmarks.md).
        public var indexPolicy = IndexCommitter.Policy(intervalNanoseconds: 1_000_000_000, maxChanges: 65536, maxBlocks: 16384)
        /// Once no request has come for this long, staged index updates commit at once, so a
        /// `timeline` or `restore` run after a client finishes sees its records. 20 ms, not 1: at
        /// queue depth 1 a write + FLUSH cycle left a 1 ms gap in 15–20 % of cycles on a loaded
        /// 2-vCPU machine, and each such commit's fdatasync slowed the next FLUSH.
        public var indexCommitIdleNanoseconds: UInt64 = 20_000_000
        /// Drop the log's pages from the page cache once written back (streaming mode). Off
        /// when the journal is replicated: the link's senders read the records back a moment
        /// later, from memory rather than from the disk the server is writing.
        public var keepsLogOutOfCache = true

        public init() {}
        public static let serve = Tuning()
    }

    /// Source writes are cut at this alignment, so the source's page cache holds folios of at
    /// most this size. ext4's buffered write walks every block of the folio it lands in
    /// (`ext4_block_write_begin`): a 4 KiB write into the 1 MiB folio a 1 MiB write left
    /// behind visited 256 buffer heads, 43 % of the server's CPU at random 4 KiB writes.
    public static let sourceWritePieceBytes = 64 << 10

    /// A journalled batch on its way to the source.
    private struct Applied {
        var ops: [VolumeOp]
        var lastSeq: UInt64
        var bytes: Int
        /// When it was handed to the applier (monotonic ns).
        var handedAt: UInt64
    }

    public let tuning: Tuning
    public let onFull: FullPolicy
    private let mirror: Mirror
    /// Used by the writer thread only.
    private let journal: JournalWriter
    private let source: any PipelineSource
    private weak var observer: (any ServePipelineObserver)?
    /// One mutex; each thread waits on a condition of its own (`PipelineLock`).
    private let cond = PipelineLock()
    // Under `cond`:
    private var queue: [VolumeOp] = []       // not yet taken by the writer
    private var inCommit: [VolumeOp] = []    // taken, being journalled
    private var applying: [Applied] = []     // journalled, not yet all in the source
    /// Requests of groups a failure stopped on the writer (the volume is fenced): answered or
    /// refused, never in the source, still seen by reads — a plain write was answered.
    private var stranded: [VolumeOp] = []
    private var applyingBytes = 0
    private var queuedBytes = 0
    private var syncWanted = false
    private var stopping = false
    private var writerDone = false
    private var applierDone = false
    private var syncerDone = false
    private var sourceSyncerDone = false
    /// Every batch through this seq is in the source (not necessarily durable).
    private var appliedSeq: UInt64
    /// Bytes written to the source since its last sync began.
    private var appliedBytesSinceSync = 0
    /// The log is durable through this seq: batches up to it may be written to the source.
    private var logDurableSeq: UInt64
    /// Someone waits for the applier to drain (the writer: a stop, a full journal): the log
    /// syncer syncs at once instead of waiting out its interval.
    private var drainWanted = false
    private var fenced: String?
    /// The source is fdatasynced through this seq (the applier's last source sync).
    private var sourceDurableSeq: UInt64
    /// When the writer last had work (monotonic ns): the idle clock for index commits.
    private var lastActiveAt: UInt64 = 0
    /// When the oldest queued request arrived: a group is taken `commitIntervalNanoseconds` after it.
    private var firstQueuedAt: UInt64 = 0
    /// A wake of the writer at the group's deadline is pending (`submit`).
    private var wakeScheduled = false
    /// The writer waits for the applier to take batches (a backlog bound, a drain): the
    /// applier wakes it after each pass.
    private var writerWaitsForApplier = false
    private var syncCounts = [SyncKind: Int]()
    /// The seq of the newest FLUSH answered (at start: the journal's last record, all durable).
    private var flushedSeq: UInt64 = 0
    /// The last seq appended to the log.
    private var appendedSeq: UInt64 = 0
    /// Someone waits for the index to hold every record appended (`durablePoint`).
    private var indexCommitWanted = false
    // The writer thread's own:
    /// The `sourceSyncedSeq` last handed to the journal.
    private var sentSourceSynced: UInt64
    /// Before this, `makeRoomIfLow` does not look (its last attempt folded nothing).
    private var nextSpaceCheck: UInt64 = 0

    /// Sync acknowledgement (`--ack sync`): called on the writer with the seq of a batch holding
    /// a FLUSH or FUA write, once it is durable here; it runs `release` when the first peer
    /// holds that seq durably (or its policy gives up waiting). The batch's FLUSH and FUA
    /// replies wait for `release`; its plain writes are answered at once, as NBD lets them be.
    /// Set before `start()`.
    public nonisolated(unsafe) var syncGate: (@Sendable (UInt64, @escaping @Sendable () -> Void) -> Void)?

    /// `sourceSyncedSeq`: the seq the source is known fdatasynced through (the mirror's
    /// `sourceSyncedSeq` once recovery has brought the source up to the journal).
    public init(mirror: Mirror, source: any PipelineSource, sourceSyncedSeq: UInt64, tuning: Tuning = .serve,
                onFull: FullPolicy = .compact, observer: (any ServePipelineObserver)?) {
        self.mirror = mirror
        self.onFull = onFull
        self.source = source
        self.tuning = tuning
        self.observer = observer
        self.sourceDurableSeq = sourceSyncedSeq
        self.sentSourceSynced = sourceSyncedSeq
        self.logDurableSeq = sourceSyncedSeq
        self.appliedSeq = sourceSyncedSeq
        let last = (try? mirror.meta().lastSeq) ?? sourceSyncedSeq
        (flushedSeq, appendedSeq) = (last, last)
        journal = JournalWriter(mirror: mirror)
        journal.keepsLogOutOfCache = tuning.keepsLogOutOfCache
        journal.indexOnThread(policy: tuning.indexPolicy, onFailure: { [weak self] error in
            self?.fenceFromOtherThread("journal index commit failed: \(error)")
        }, readVolume: { [unowned self] offset, dst in try readVolume(at: offset, into: dst) })
    }

    /// Start the writer, the applier and the two syncers (the index thread runs already).
    public func start() {
        let threads: [(String, @Sendable () -> Void)] = [
            ("rewind-writer", { [self] in runWriter() }), ("rewind-apply", { [self] in runApplier() }),
            ("rewind-logsync", { [self] in runLogSyncer() }), ("rewind-srcsync", { [self] in runSourceSyncer() }),
        ]
        for (name, body) in threads {
            let thread = Thread(block: body)
            thread.name = name
            thread.start()
        }
    }

    // MARK: requests

    /// Queue a request. A plain write is answered at once while the answered-but-unjournalled
    /// bytes stay under `ackedBytesMax`; a FLUSH or FUA write once the log is durable past it.
    /// `scheduleWake(ns, fire)`, if given, runs `fire` in `ns` nanoseconds on the caller's event
    /// loop: a plain write into an empty queue then wakes the writer at the group's deadline
    /// from that timer instead of at once — one cross-thread wake-up fewer per write at queue
    /// depth 1 (each is an IPI to a halted vCPU in a VM).
    public func submit(_ op: VolumeOp, scheduleWake: ((UInt64, @escaping @Sendable () -> Void) -> Void)? = nil) {
        var op = op
        var schedule = false, signal = false
        var answerNow: VolumeOp.Completion?
        var refuse: VolumeOp.Failure?
        cond.lock()
        if stopping { refuse = .shutdown } else if fenced != nil { refuse = .io } else {
            if !op.needsSync && queuedBytes + op.bytes <= tuning.ackedBytesMax {
                answerNow = op.completion
                op.completion = nil
            }
            if op.needsSync { syncWanted = true }
            // Wake the writer only when it has something to do: while it gathers a group it
            // wakes by itself at the deadline, and a wake per request (a futex call, a context
            // switch, the lock handed back and forth) cost random 4 KiB writes at queue depth 16
            // a quarter of their throughput.
            let now = monotonicNanoseconds()
            if queue.isEmpty { firstQueuedAt = now }
            var wake = op.needsSync
                || queuedBytes < tuning.ackedBytesMax / 2 && queuedBytes + op.bytes >= tuning.ackedBytesMax / 2
            if !wake && queue.isEmpty && !wakeScheduled {
                if scheduleWake != nil { (wakeScheduled, schedule) = (true, true) } else { wake = true }
            }
            queuedBytes += op.bytes
            queue.append(op)
            lastActiveAt = now
            signal = wake
        }
        cond.unlock()
        // After unlocking: woken under the lock, the writer would only block on it.
        if signal { cond.wake(.writer) }
        if schedule, let scheduleWake {
            scheduleWake(tuning.commitIntervalNanoseconds) { [self] in
                cond.lock()
                wakeScheduled = false
                let wake = !queue.isEmpty
                cond.unlock()
                if wake { cond.wake(.writer) }
            }
        }
        if let refuse { op.completion?(refuse) }
        answerNow?(nil)  // after it is queued: every later read sees it
    }

    /// Writes answered but not yet in the source that overlap `range`, in order: what a read
    /// of the source must lay over what it read.
    public func overlay(_ range: Range<UInt64>) -> [VolumeOp] {
        cond.lock()
        defer { cond.unlock() }
        guard !applying.isEmpty || !stranded.isEmpty || !inCommit.isEmpty || !queue.isEmpty else { return [] }
        var out: [VolumeOp] = []
        for batch in applying { out += batch.ops.filter { $0.range.overlaps(range) } }
        return out + stranded.filter { $0.range.overlaps(range) } + inCommit.filter { $0.range.overlaps(range) }
            + queue.filter { $0.range.overlaps(range) }
    }

    /// Whether any write answered but not yet in the source overlaps `range` (asked on every read).
    public func overlaps(_ range: Range<UInt64>) -> Bool {
        cond.lock()
        defer { cond.unlock() }
        return applying.contains { $0.ops.contains { $0.range.overlaps(range) } } || stranded.contains { $0.range.overlaps(range) }
            || inCommit.contains { $0.range.overlaps(range) } || queue.contains { $0.range.overlaps(range) }
    }

    /// Read the volume as every answered write leaves it: the source, with what is still on
    /// its way there laid over.
    public func read(at offset: UInt64, into dst: UnsafeMutableRawBufferPointer) throws {
        let pending = overlay(offset..<offset + UInt64(dst.count))
        try source.read(at: offset, into: dst)
        for op in pending { op.lay(over: dst, at: offset) }
    }

    /// Why writes are refused, once the volume is fenced.
    public var fenceReason: String? {
        cond.lock()
        defer { cond.unlock() }
        return fenced
    }

    /// How many syncs of each kind were made so far.
    public var syncs: [SyncKind: Int] {
        cond.lock()
        defer { cond.unlock() }
        return syncCounts
    }

    /// Journal everything queued, write it to the source, sync both, record the source as
    /// synced through the journal's end; then end the threads. Requests after this are refused.
    public func stop() {
        cond.lock()
        stopping = true
        cond.wakeAll()
        while !writerDone || !applierDone || !syncerDone || !sourceSyncerDone { cond.wait(.stopper) }
        cond.unlock()
    }

    // MARK: the durable point

    /// Under `cond`, on the writer: have the index thread commit now when `durablePoint` waits.
    private func commitIndexIfWanted() {
        guard indexCommitWanted else { return }
        indexCommitWanted = false
        cond.unlock()
        journal.requestCommit()
        cond.lock()
    }

    /// The newest point a completed FLUSH made durable, once the index holds every record up to
    /// it — so `bookmark`, `timeline`, `restore` and `export`, which read the index, see it —
    /// and the last record appended (durable or about to be). Waits at most `timeoutSeconds`
    /// for the index thread; throws if the volume is fenced or the wait runs out.
    public func durablePoint(timeoutSeconds: Double = 30) throws -> (flushed: UInt64, appended: UInt64) {
        cond.lock()
        if let why = fenced { cond.unlock(); throw RewindError.invalidArgument("volume fenced: \(why)") }
        let point = (flushed: flushedSeq, appended: appendedSeq)
        indexCommitWanted = true
        cond.unlock()
        cond.wake(.writer)
        let deadline = monotonicNanoseconds() + UInt64(timeoutSeconds * 1e9)
        var pause: UInt32 = 200
        while try mirror.meta().lastSeq < point.flushed {
            guard monotonicNanoseconds() < deadline else {
                throw RewindError.invalidArgument("the index did not reach seq:\(point.flushed) within \(timeoutSeconds) s")
            }
            usleep(pause)
            pause = min(pause * 2, 5_000)
        }
        return point
    }

    // MARK: the writer

    private func runWriter() {
        cond.lock()
        while true {
            if queue.isEmpty && !stopping {
                idle()
                continue
            }
            if queue.isEmpty && stopping { break }
            // Let a group gather, unless someone waits for a sync or the queue is large.
            let due = firstQueuedAt + tuning.commitIntervalNanoseconds
            while !syncWanted && !stopping && queuedBytes < tuning.ackedBytesMax / 2 && monotonicNanoseconds() < due {
                if !cond.wait(.writer, until: due) { break }
            }
            var take = 0, bytes = 0
            while take < queue.count && take < tuning.maxBatchOps && (take == 0 || bytes + queue[take].bytes <= tuning.maxBatchBytes) {
                bytes += queue[take].bytes
                take += 1
            }
            inCommit = Array(queue[0..<take])
            queue.removeFirst(take)
            queuedBytes -= bytes
            syncWanted = queue.contains { $0.needsSync }
            let batch = inCommit
            cond.unlock()
            commit(batch)
            cond.lock()
            inCommit.removeAll()
            commitIndexIfWanted()
            lastActiveAt = monotonicNanoseconds()
            if stopping { cond.wake(.applier) }  // it ends once nothing is queued or in commit
        }
        // Drained: the applier finishes, then the final syncs.
        waitForApplier { !applying.isEmpty }
        cond.unlock()
        finalSync()
        cond.lock()
        writerDone = true
        cond.wakeAll()
        cond.unlock()
    }

    /// Under `cond`, nothing queued: have the index committed once no request has come for a
    /// moment (with the source's newest sync, so a crash after it redoes little), else wait.
    private func idle() {
        commitIndexIfWanted()
        let owed = journal.commitOwed || sourceDurableSeq > sentSourceSynced
        guard owed, fenced == nil else {
            cond.wait(.writer)
            return
        }
        let due = lastActiveAt + tuning.indexCommitIdleNanoseconds
        guard monotonicNanoseconds() >= due else {
            cond.wait(.writer, until: due)
            return
        }
        let durable = sourceDurableSeq
        cond.unlock()
        if durable > sentSourceSynced {
            // No records: only the header's sourceSyncedSeq moves.
            if (try? journal.append([], sourceSynced: durable)) != nil { sentSourceSynced = durable }
        }
        journal.requestCommit()
        cond.lock()
    }

    /// Journal one group (its log chunk; its index updates go to the index thread), sync the
    /// log if a FLUSH or FUA write is in it, hand it to the applier, answer its requests.
    private func commit(_ batch: [VolumeOp]) {
        if fenceReason != nil {
            journal.abort(keepLog: true)  // the applier or the index thread fenced: give the index up here
            strand(batch, .io)
            return
        }
        makeRoomIfLow()
        let durable = sourceDurableSeqNow()
        let seqs: ClosedRange<UInt64>
        do {
            seqs = try appendMakingRoom(batch.map(\.change), sourceSynced: durable)
        } catch {
            // Writes already answered are lost to the journal: refuse everything from now on,
            // so the next FLUSH reports the failure (as a disk reports a writeback error).
            fenceOnWriter("journal append failed: \(error)")
            strand(batch, Self.isOutOfSpace(error) ? .noSpace : .io)
            return
        }
        let bytes = batch.reduce(0) { $0 + $1.bytes }
        observer?.journalAppended(records: batch.count, bytes: bytes, lastSeq: seqs.upperBound)
        let needsSync = batch.contains(where: \.needsSync)
        // Sync acknowledgement: the link reads committed records, so the index commit (which
        // syncs the log itself first) starts now, beside this FLUSH's own log sync.
        if needsSync && syncGate != nil { journal.requestCommit() }
        if needsSync {
            let started = monotonicNanoseconds()
            do {
                try journal.syncLog()
            } catch {
                fenceOnWriter("journal sync failed: \(error)")
                strand(batch, Self.isOutOfSpace(error) ? .noSpace : .io)
                return
            }
            counted(.flush, since: started)
        }
        cond.lock()
        if !applying.isEmpty && applyingBytes + bytes > tuning.applyBacklogBytesMax {
            drainWanted = true
            cond.wake(.logSyncer)
            waitForApplier { !applying.isEmpty && applyingBytes + bytes > tuning.applyBacklogBytesMax }
            drainWanted = false
        }
        if fenced != nil {
            cond.unlock()
            journal.abort(keepLog: true)
            strand(batch, .io)
            return
        }
        // One step: overlay reads never miss the batch nor see it twice.
        let pendingBefore = bytesAwaitingLogSync
        if needsSync { logDurableSeq = max(logDurableSeq, seqs.upperBound) }  // covers the batches before it too
        appendedSeq = seqs.upperBound
        if let i = batch.lastIndex(where: { $0.change.kind == .flush }) {
            flushedSeq = max(flushedSeq, seqs.lowerBound + UInt64(i))  // one record per request, in order
        }
        applying.append(Applied(ops: batch, lastSeq: seqs.upperBound, bytes: bytes, handedAt: monotonicNanoseconds()))
        applyingBytes += bytes
        inCommit.removeAll()
        // Wake only who has work: the applier when the batch may go to the source now; the log
        // syncer when it waits for a first batch to time, or half the backlog now waits.
        let half = tuning.writeAheadBytes
        let wakeSyncer = !needsSync && (pendingBefore == 0 || pendingBefore < half && pendingBefore + bytes >= half)
        cond.unlock()
        if needsSync { cond.wake(.applier) }
        if wakeSyncer { cond.wake(.logSyncer) }
        if needsSync, let gate = syncGate {
            let held = batch.filter(\.needsSync)
            answer(batch.filter { !$0.needsSync }, nil)
            gate(seqs.upperBound) { for op in held { op.completion?(nil) } }
        } else {
            answer(batch, nil)
        }
    }

    /// A failure stopped `batch` on the writer (the volume is fenced): keep it where reads see
    /// it — its plain writes may have been answered — and refuse what still waits.
    private func strand(_ batch: [VolumeOp], _ failure: VolumeOp.Failure) {
        cond.lock()
        stranded += batch.map { var op = $0; op.completion = nil; return op }
        inCommit.removeAll()
        cond.unlock()
        answer(batch, failure)
    }

    /// Append to the journal; when its file system is full and the policy is `.compact`, give
    /// up the oldest history to make room (`makeRoom`) and try again, up to three times, each
    /// folding more. A write refused with ENOSPC took no bytes, so it can be tried again (unlike
    /// a failed sync, whose pages the kernel may have dropped).
    private func appendMakingRoom(_ changes: [Change], sourceSynced durable: UInt64) throws -> ClosedRange<UInt64> {
        var attempt = 0
        while true {
            do {
                let seqs = try journal.append(changes, sourceSynced: durable)
                sentSourceSynced = durable
                return seqs
            } catch where onFull == .compact && attempt < 3 && Self.isOutOfSpace(error) {
                attempt += 1
                guard try makeRoom(keepingFraction: attempt == 3 ? 0 : 1.0 / Double(1 << attempt), because: "\(error)") else {
                    throw error  // nothing left to give up
                }
            }
        }
    }

    /// When the journal's file system has less free than this, a `.compact` pipeline gives up
    /// history before a write fails: LMDB's commits (on the index thread, which cannot make
    /// room) need space too. A quarter of the file system, at most 256 MiB.
    static func lowSpaceBytes(fileSystemBytes: UInt64) -> UInt64 { min(256 << 20, fileSystemBytes / 4) }

    /// Under `.compact`, before each group commit: if the journal's file system runs low,
    /// give up half the history now (`statvfs`, ~1 µs). After an attempt that could fold
    /// nothing (all history still owed to the source, or none left), the next waits a second.
    private func makeRoomIfLow() {
        guard onFull == .compact, monotonicNanoseconds() >= nextSpaceCheck,
              let (free, total) = mirror.journal.log.fileSystemSpace(), free < Self.lowSpaceBytes(fileSystemBytes: total) else { return }
        let folded = (try? makeRoom(keepingFraction: 0.5, because: "only \(free) bytes free of \(total) on the journal's file system")) ?? false
        if !folded { nextSpaceCheck = monotonicNanoseconds() + 1_000_000_000 }
    }

    /// The journal is full (`reason`): fold the oldest history into the base, keeping
    /// `keepingFraction` of the journal's payload (or none), on the writer thread. First every
    /// journalled batch goes into the source and the source is synced and recorded as such —
    /// compaction folds only records the source holds durably (`unreplayedSourceFloor`).
    /// False when there was nothing to fold.
    private func makeRoom(keepingFraction: Double, because reason: String) throws -> Bool {
        cond.lock()
        drainWanted = true
        cond.wake(.logSyncer)
        waitForApplier { !applying.isEmpty }
        drainWanted = false
        let why = fenced
        cond.unlock()
        if let why { throw RewindError.invalidArgument("volume fenced: \(why)") }
        let synced = try syncSourceNow()  // drained: through the last journalled batch
        _ = try journal.append([], sourceSynced: synced)
        sentSourceSynced = synced
        try journal.commit()
        let before = try mirror.meta()
        let keep = UInt64(Double(before.journalBytes) * keepingFraction)
        // The volume before a replication peer's position: peers left behind keep the blocks
        // the folded records changed (`PeerDirty`) and are caught up from them when they return.
        guard let report = try mirror.compact(keepAgeNanoseconds: nil, keepBytes: keep, peersYield: true),
              report.toHorizon > report.fromHorizon else {
            return false
        }
        let behind = ((try? mirror.peerRecords()) ?? []).filter { $0.durableSeq < report.toHorizon }
        let peers = behind.isEmpty ? "" : "; replication peers left behind the new oldest point, to be caught up from the blocks changed: "
            + behind.map { "\($0.id.prefix(16))… at seq:\($0.durableSeq)" }.joined(separator: ", ")
        observer?.madeRoom(report, after: reason + peers)
        return true
    }

    private func answer(_ batch: [VolumeOp], _ failure: VolumeOp.Failure?) {
        for op in batch { op.completion?(failure) }
    }

    private func sourceDurableSeqNow() -> UInt64 {
        cond.lock()
        defer { cond.unlock() }
        return sourceDurableSeq
    }

    /// The volume's content at `offset` for the journal's read-modify-write of a partial block
    /// (on the writer thread): the source with the batches on their way to it laid over.
    /// Later requests (still queued) are not: they come after the change being journalled.
    private func readVolume(at offset: UInt64, into dst: UnsafeMutableRawBufferPointer) throws {
        let range = offset..<offset + UInt64(dst.count)
        cond.lock()
        let pending = applying.flatMap { $0.ops.filter { $0.range.overlaps(range) } }
        cond.unlock()
        // A batch the applier writes meanwhile is laid over again: the same bytes.
        try source.read(at: offset, into: dst)
        for op in pending { op.lay(over: dst, at: offset) }
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
            if recordFence("final sync failed: \(error)") { announce("final sync failed: \(error)") }
        }
    }

    // MARK: the applier

    private func runApplier() {
        cond.lock()
        while true {
            if fenced != nil { break }
            if applying.isEmpty {
                if writerDone || stopping && queue.isEmpty && inCommit.isEmpty { break }
                cond.wait(.applier)
                continue
            }
            if applying[0].lastSeq > logDurableSeq {
                cond.wait(.applier)  // for the log syncer (or a FLUSH) to make the next batch's chunk durable
                continue
            }
            // Every batch whose log chunk is durable; they stay in `applying` (overlay reads see
            // them) until they are in the source.
            let durableSeq = logDurableSeq
            let taken = Array(applying.prefix { $0.lastSeq <= durableSeq })
            cond.unlock()
            var failure: String?
            do {
                for batch in taken { for op in batch.ops { try source.apply(op, pieceBytes: Self.sourceWritePieceBytes) } }
            } catch {
                failure = "source write failed: \(error)"
            }
            cond.lock()
            if let failure {
                fenceLocked(failure)  // the batches stay in `applying`: reads still see what the source lacks
                break
            }
            let bytes = taken.reduce(0) { $0 + $1.bytes }
            let sourceWasCurrent = appliedSeq <= sourceDurableSeq
            applying.removeFirst(taken.count)
            applyingBytes -= bytes
            appliedBytesSinceSync += bytes
            appliedSeq = taken.last?.lastSeq ?? appliedSeq
            // The source syncer waits without a deadline while the source is current, and past
            // its thresholds it syncs now; otherwise its timer stands.
            if sourceWasCurrent || sourceSyncIsLarge { cond.wake(.sourceSyncer) }
            if writerWaitsForApplier { cond.wake(.writer) }
        }
        applierDone = true
        cond.wakeAll()
        cond.unlock()
    }

    // MARK: the source syncer

    /// fdatasync the source now and then, and move `sourceSyncedSeq` to what it covers: every
    /// `sourceSyncIntervalNanoseconds`, or once `sourceSyncBytes` or `sourceSyncRecords` went
    /// into the source since the last sync. A thread of its own: a sync writes back a second's
    /// random writes, and the applier goes on writing meanwhile (a sync covers at least what
    /// was in the source when it began).
    private func runSourceSyncer() {
        var lastSync = monotonicNanoseconds()
        cond.lock()
        while fenced == nil && !applierDone {
            guard appliedSeq > sourceDurableSeq else {
                cond.wait(.sourceSyncer)
                continue
            }
            let due = lastSync + tuning.sourceSyncIntervalNanoseconds
            if monotonicNanoseconds() < due && !sourceSyncIsLarge {
                cond.wait(.sourceSyncer, until: due)
                continue
            }
            cond.unlock()
            let synced = (try? syncSourceNow()) != nil  // a failure fenced the volume
            lastSync = monotonicNanoseconds()
            cond.lock()
            if !synced { break }
        }
        sourceSyncerDone = true
        cond.wake(.stopper)
        cond.unlock()
    }

    /// Under `cond`: bytes of the batches at the applier whose log chunk is not yet durable.
    private var bytesAwaitingLogSync: Int {
        applying.reduce(0) { $0 + ($1.lastSeq > logDurableSeq ? $1.bytes : 0) }
    }

    /// Under `cond`: so much went into the source since its last sync that it is synced now.
    private var sourceSyncIsLarge: Bool {
        appliedBytesSinceSync >= tuning.sourceSyncBytes
            || appliedSeq > sourceDurableSeq && appliedSeq - sourceDurableSeq >= tuning.sourceSyncRecords
    }

    /// Under `cond`, on the writer: wait while `busy()` and the volume is not fenced, woken by
    /// the applier after each pass.
    private func waitForApplier(while busy: () -> Bool) {
        writerWaitsForApplier = true
        while busy() && fenced == nil { cond.wait(.writer) }
        writerWaitsForApplier = false
    }

    /// fdatasync the source on the calling thread; returns the seq it is durable through.
    private func syncSourceNow() throws -> UInt64 {
        cond.lock()
        let target = appliedSeq
        appliedBytesSinceSync = 0
        cond.unlock()
        let started = monotonicNanoseconds()
        do {
            try source.dataSync()
        } catch {
            fence("source sync failed: \(error)")
            throw error
        }
        counted(.source, since: started)
        cond.lock()
        sourceDurableSeq = max(sourceDurableSeq, target)
        cond.unlock()
        cond.wake(.writer)  // an idle writer records the new sourceSyncedSeq in the journal
        return target
    }

    // MARK: the log syncer

    /// Make the log durable under the batches waiting at the applier, one `fdatasync` for all
    /// of those there when it starts: the write-ahead the source's writes wait for. A thread of
    /// its own, so the applier writes the batches already durable while the next sync runs.
    /// It waits until the oldest batch not yet durable has waited `writeAheadIntervalNanoseconds`,
    /// or half the backlog bound is waiting, or someone waits for the applier to drain.
    private func runLogSyncer() {
        cond.lock()
        while fenced == nil && !applierDone {
            guard let target = applying.last?.lastSeq, target > logDurableSeq,
                  let oldest = applying.first(where: { $0.lastSeq > logDurableSeq }) else {
                cond.wait(.logSyncer)
                continue
            }
            let due = oldest.handedAt + tuning.writeAheadIntervalNanoseconds
            if monotonicNanoseconds() < due && bytesAwaitingLogSync < tuning.writeAheadBytes && !drainWanted && !stopping {
                cond.wait(.logSyncer, until: due)
                continue
            }
            cond.unlock()
            let started = monotonicNanoseconds()
            var failure: String?
            do {
                try mirror.journal.log.sync()
                counted(.beforeApply, since: started)
            } catch {
                failure = "journal sync failed: \(error)"
            }
            cond.lock()
            if let failure {
                fenceLocked(failure)
                break
            }
            logDurableSeq = max(logDurableSeq, target)
            cond.wake(.applier)
        }
        syncerDone = true
        cond.wake(.stopper)
        cond.unlock()
    }

    private func counted(_ kind: SyncKind, since started: UInt64) {
        let elapsed = monotonicNanoseconds() - started
        cond.lock()
        syncCounts[kind, default: 0] += 1
        cond.unlock()
        observer?.synced(kind, nanoseconds: elapsed)
    }

    // MARK: fencing

    /// The journal's map or the disk is full: answer ENOSPC rather than EIO.
    public static func isOutOfSpace(_ error: Error) -> Bool {
        switch error {
        case let RewindError.journal(e): return e.isMapFull || e.code == ENOSPC
        case let RewindError.io(_, _, errno): return errno == ENOSPC
        case let e as LMDBError: return e.isMapFull || e.code == ENOSPC
        default: return false
        }
    }

    /// Refuse every later write, from the writer thread, which also gives up the index
    /// transaction (and with it LMDB's writer lock, which compaction and `bookmark` need):
    /// the log keeps the staged records, and the next start indexes them.
    private func fenceOnWriter(_ why: String) {
        journal.abort(keepLog: true)
        if recordFence(why) { announce(why) }
    }

    /// Refuse every later write, from the index thread: the writer gives up the index when it
    /// next looks (`commit`).
    private func fenceFromOtherThread(_ why: String) {
        if recordFence(why) { announce(why) }
    }

    /// Fence the volume for a failure found outside the pipeline (a retention pass's I/O
    /// error): every later write-nature request is refused, as for the pipeline's own.
    public func fence(_ why: String) {
        if recordFence(why) { announce(why) }
    }

    /// Say why the volume is fenced: beside the journal for `rewind status` (`Mirror.recordFence`),
    /// and to the observer (the log, the metric). Once.
    private func announce(_ why: String) {
        mirror.recordFence(why)
        observer?.fenced(why)
    }

    // MARK: retention

    /// One retention pass (compact what left the window), beside the pipeline. An I/O error
    /// fences the volume: after a failed write or sync of base.img the kernel may have dropped
    /// pages a retry would not see, so nothing may be folded, or acknowledged, again; the next
    /// start redoes the compaction from the journal. Other failures (the window's records
    /// still owed to the source) only fail the pass.
    public func retentionPass(keepAgeNanoseconds: UInt64?, keepBytes: UInt64?) throws -> CompactionReport? {
        if let why = fenceReason { throw RewindError.invalidArgument("volume fenced: \(why)") }
        do {
            // Compaction folds only what the source holds durably: sync it now, rather than
            // leave the window's edge up to 10 s behind (`sourceSyncIntervalNanoseconds`).
            let synced = try syncSourceNow()
            return try mirror.compact(keepAgeNanoseconds: keepAgeNanoseconds, keepBytes: keepBytes, sourceSyncedThrough: synced)
        } catch let error as RewindError {
            if case .io = error { fence("compaction failed: \(error)") }
            throw error
        }
    }

    /// Under `cond`: fence for `why` (the first failure is the reason) and wake every thread;
    /// the observer is told outside the lock.
    private func fenceLocked(_ why: String) {
        let first = fenced == nil
        if first { fenced = why }
        cond.wakeAll()
        guard first else { return }
        cond.unlock()
        announce(why)
        cond.lock()
    }

    /// Set the fence (the first failure is the reason) and wake every thread; whether this was
    /// the first.
    private func recordFence(_ why: String) -> Bool {
        cond.lock()
        defer { cond.unlock() }
        let first = fenced == nil
        if first { fenced = why }
        cond.wakeAll()
        return first
    }
}
