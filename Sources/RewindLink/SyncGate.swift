import Foundation
import Logging
import RewindCore

/// `--ack sync`: FLUSH and FUA replies wait until the first peer holds their seq durably, so
/// a completed FLUSH means durable here and on that peer (and a write completed before it is
/// on both). When the peer cannot keep up for `timeoutSeconds` — down, cut off, slow — the
/// gate degrades to async rather than stall the host: it releases every waiting reply, says so
/// in the log, the peers table and the metrics, and returns to sync once the peer has caught
/// up with the journal. `timeoutSeconds` 0: never degrade (the host waits for the peer).
public final class SyncGate: @unchecked Sendable {
    let sender: LinkSender
    let mirror: Mirror
    let timeoutSeconds: Double
    let logger: Logger
    private let cond = NSCondition()
    private var waiting: [(seq: UInt64, since: UInt64, release: @Sendable () -> Void)] = []
    private var durable: UInt64 = 0
    private var degradedSince: UInt64?
    private var stopped = false
    /// Times the gate degraded to async.
    public private(set) var degradations = 0

    public init(sender: LinkSender, mirror: Mirror, timeoutSeconds: Double, logger: Logger) {
        self.sender = sender
        self.mirror = mirror
        self.timeoutSeconds = timeoutSeconds
        self.logger = logger
        sender.setMode("sync")
        sender.onAck { [weak self] seq in self?.acked(seq) }
        let t = Thread { [weak self] in self?.watch() }
        t.name = "rewind-sync-gate"
        t.start()
    }

    public var isDegraded: Bool { cond.withLock { degradedSince != nil } }

    /// Hold `release` until the peer holds `seq` (ServePipeline.syncGate).
    public func hold(_ seq: UInt64, _ release: @escaping @Sendable () -> Void) {
        let now: Bool = cond.withLock {
            if degradedSince != nil || durable >= seq || stopped { return true }
            waiting.append((seq, monotonicNanoseconds(), release))
            return false
        }
        if now { release() }
    }

    /// Release everything and stop watching (the server stops).
    public func stop() {
        let all: [@Sendable () -> Void] = cond.withLock {
            stopped = true
            cond.broadcast()
            defer { waiting.removeAll() }
            return waiting.map(\.release)
        }
        all.forEach { $0() }
    }

    private func acked(_ seq: UInt64) {
        var ready: [@Sendable () -> Void] = []
        var recovered = false
        cond.withLock {
            durable = max(durable, seq)
            while let first = waiting.first, first.seq <= durable {
                ready.append(first.release)
                waiting.removeFirst()
            }
            if degradedSince != nil, let last = try? mirror.meta().lastSeq, durable >= last {
                degradedSince = nil
                recovered = true
            }
        }
        ready.forEach { $0() }
        if recovered {
            sender.setMode("sync")
            logger.notice("sync peer \(sender.peer) caught up at seq:\(seq): FLUSH waits for it again (sync)")
        }
    }

    /// Degrade when the oldest waiting reply has waited `timeoutSeconds`.
    private func watch() {
        guard timeoutSeconds > 0 else { return }
        let limit = UInt64(timeoutSeconds * 1e9)
        while true {
            var released: [@Sendable () -> Void] = []
            let stop: Bool = cond.withLock {
                _ = cond.wait(until: Date(timeIntervalSinceNow: 0.02))
                if stopped { return true }
                if degradedSince == nil, let first = waiting.first, monotonicNanoseconds() - first.since >= limit {
                    degradedSince = monotonicNanoseconds()
                    degradations += 1
                    released = waiting.map(\.release)
                    waiting.removeAll()
                }
                return false
            }
            if stop { return }
            if !released.isEmpty {
                sender.setMode("sync, degraded to async")
                logger.warning("sync peer \(sender.peer) has not acknowledged for \(timeoutSeconds) s (\(sender.status.state)): degrading to async — \(released.count) FLUSH/FUA replies released without it; back to sync once it catches up")
                released.forEach { $0() }
            }
        }
    }
}
