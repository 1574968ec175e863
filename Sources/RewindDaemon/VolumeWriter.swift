import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import RewindCore
import RewindNBD

/// The sequencer: one thread per served volume that turns write-nature requests into journal
/// records and source writes, in one order.
///
/// Requests from every connection join one FIFO queue in the order they arrive. The thread
/// takes everything queued (a group commit, bounded by `maxBatchBytes`), appends it to the
/// journal in one LMDB transaction (write-ahead: journal first), applies it to the source in
/// the same order, and — if the batch holds a FLUSH or a FUA write — fdatasyncs the source and
/// syncs the journal once for all of them. Then it answers. So overlapping writes in flight,
/// from any connections, reach the journal and the source in the same order (invariants 2, 5).
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
        var promise: EventLoopPromise<Void>
        var bytes: Int { if case .write(let d) = kind { return d.count } else { return 0 } }
    }

    /// Bytes taken into one group commit. Bounds the LMDB transaction's dirty pages.
    static let maxBatchBytes = 64 << 20
    static let maxBatchOps = 4096

    private let mirror: Mirror
    private let source: BlockFile
    private let logger: Logger
    private let metrics: ServeMetrics
    private let condition = ConditionLock(value: 0)  // value: 1 when work or stop is pending
    private var queue: [Op] = []
    private var stopping = false
    private var thread: Thread?
    private var fenced: String?
    private var syncedSeq: UInt64
    private let stopped = ConditionLock(value: 0)

    init(mirror: Mirror, source: BlockFile, syncedSeq: UInt64, metrics: ServeMetrics, logger: Logger) {
        self.mirror = mirror
        self.source = source
        self.syncedSeq = syncedSeq
        self.metrics = metrics
        self.logger = logger
    }

    func start() {
        let t = Thread { [self] in run() }
        t.name = "rewind-writer"
        thread = t
        t.start()
    }

    func submit(_ op: Op) {
        condition.lock()
        if stopping {
            condition.unlock()
            op.promise.fail(NBDErrno.shutdown)
            return
        }
        queue.append(op)
        condition.unlock(withValue: 1)
    }

    /// Answer everything queued, sync source and journal, record the source as synced, stop.
    func stop() {
        condition.lock()
        stopping = true
        condition.unlock(withValue: 1)
        stopped.lock(whenValue: 1)
        stopped.unlock()
    }

    private func run() {
        while true {
            condition.lock(whenValue: 1)
            var batch: [Op] = []
            var bytes = 0
            while !queue.isEmpty && batch.count < Self.maxBatchOps && (batch.isEmpty || bytes + queue[0].bytes <= Self.maxBatchBytes) {
                bytes += queue[0].bytes
                batch.append(queue.removeFirst())
            }
            let done = stopping && queue.isEmpty && batch.isEmpty
            condition.unlock(withValue: queue.isEmpty && !stopping ? 0 : 1)
            if done { break }
            if !batch.isEmpty { process(batch) }
        }
        finalSync()
        stopped.lock()
        stopped.unlock(withValue: 1)
    }

    private func process(_ batch: [Op]) {
        if let fenced {
            for op in batch { op.promise.fail(NBDErrno.io) }
            logger.debug("refusing \(batch.count) requests: volume fenced (\(fenced))")
            return
        }
        let changes: [Change] = batch.map { op in
            switch op.kind {
            case .write(let data): return .write(op.offset, data, fua: op.fua)
            case let .zero(length, _): return .zero(op.offset, length, fua: op.fua)
            case let .trim(length): return .trim(op.offset, length, fua: op.fua)
            case .flush: return .flush
            }
        }
        // 1. Journal first (write-ahead): a crash after this replays the records into the source.
        let seqs: ClosedRange<UInt64>
        do {
            seqs = try mirror.append(changes, sourceSynced: syncedSeq)
        } catch {
            let errno: NBDErrno = "\(error)".contains("MDB_MAP_FULL") || "\(error)".contains("No space") ? .nospc : .io
            logger.error("journal append failed: \(error)")
            for op in batch { op.promise.fail(errno) }
            return
        }
        metrics.journalAppended(records: batch.count, bytes: batch.reduce(0) { $0 + $1.bytes }, lastSeq: seqs.upperBound)
        // 2. The source, in the same order.
        var sourceError: Error?
        for op in batch where sourceError == nil {
            do {
                switch op.kind {
                case .write(let data): try source.write(at: op.offset, data)
                case let .zero(length, noHole):
                    if noHole {
                        if try !source.zeroRange(at: op.offset, length: length) { try source.writeZeros(at: op.offset, length: length) }
                    } else {
                        try source.punchHole(at: op.offset, length: length)
                    }
                case let .trim(length): try source.punchHole(at: op.offset, length: length)
                case .flush: break
                }
            } catch { sourceError = error }
        }
        if let sourceError {
            fence("source write failed: \(sourceError)")
            for op in batch { op.promise.fail(NBDErrno.io) }
            return
        }
        // 3. One sync for every FLUSH and FUA in the batch.
        if batch.contains(where: { $0.fua || { if case .flush = $0.kind { return true } else { return false } }($0) }) {
            let started = DispatchTime.now().uptimeNanoseconds
            do {
                try source.dataSync()
                try mirror.sync()
                syncedSeq = seqs.upperBound
            } catch {
                // After a failed sync the page cache may have dropped the data: never ack again.
                fence("sync failed: \(error)")
                for op in batch { op.promise.fail(NBDErrno.io) }
                return
            }
            metrics.flushed(nanoseconds: DispatchTime.now().uptimeNanoseconds - started)
        }
        for op in batch { op.promise.succeed(()) }
    }

    private func fence(_ why: String) {
        fenced = why
        logger.critical("volume fenced, every further write fails with EIO: \(why)")
    }

    private func finalSync() {
        guard fenced == nil else { return }
        do {
            try source.dataSync()
            try mirror.sync()
            try mirror.markSourceSynced(try mirror.meta().lastSeq)
        } catch {
            logger.error("final sync failed: \(error)")
        }
    }
}
