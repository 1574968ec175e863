import CoreMetrics
import Foundation
import Metrics
import Logging
import NIOConcurrencyHelpers
import RewindCore
import RewindNBD

/// The serve daemon's metrics, through swift-metrics (exported by swift-prometheus on
/// `--metrics`): requests, bytes and latency by command, in-flight requests, connections,
/// journal records and bytes, flush latency, compaction progress.
final class ServeMetrics: NBDObserver, ServePipelineObserver, @unchecked Sendable {
    private let requests: [NBDCommand: Counter]
    private let bytes: [NBDCommand: Counter]
    private let latency: [NBDCommand: Metrics.Timer]
    private let errors: [NBDCommand: Counter]
    private let inflightGauge = Gauge(label: "rewind_nbd_inflight_requests")
    private let connectionsGauge = Gauge(label: "rewind_nbd_connections")
    private let journalRecords = Counter(label: "rewind_journal_records_total")
    private let journalBytes = Counter(label: "rewind_journal_payload_bytes_total")
    private let lastSeq = Gauge(label: "rewind_journal_last_seq")
    private let flushLatency = Metrics.Timer(label: "rewind_flush_duration_seconds")
    let compactions = Counter(label: "rewind_compactions_total")
    let compactedBlocks = Counter(label: "rewind_compaction_blocks_written_total")
    let horizon = Gauge(label: "rewind_journal_horizon_seq")
    let journalPayload = Gauge(label: "rewind_journal_payload_bytes")
    /// Compactions a full journal forced (`--on-full=compact`).
    private let journalFullCompactions = Counter(label: "rewind_journal_full_compactions_total")
    /// Points in use by exports and `NAME@POINT` connections (`Pin`), and the oldest of them
    /// (-1: none): no compaction folds past it.
    let pins = Gauge(label: "rewind_pins")
    let oldestPin = Gauge(label: "rewind_pin_oldest_seq")
    /// 1 once a failed journal append, source write or sync has fenced the volume (writes fail).
    private let fencedGauge = Gauge(label: "rewind_volume_fenced")
    private let state = NIOLockedValueBox((inflight: 0, connections: 0))
    /// Syncs the serve pipeline made, by kind (`ServePipeline.SyncKind`).
    private let syncs: [ServePipeline.SyncKind: Counter] = Dictionary(uniqueKeysWithValues: ServePipeline.SyncKind.allCases.map {
        ($0, Counter(label: "rewind_syncs_total", dimensions: [("kind", $0.rawValue)]))
    })
    /// Where a fence is logged (set before the pipeline starts).
    var logger: Logger?

    init() {
        var r: [NBDCommand: Counter] = [:], b: [NBDCommand: Counter] = [:], l: [NBDCommand: Metrics.Timer] = [:]
        var e: [NBDCommand: Counter] = [:]
        for c in NBDCommand.allCases {
            e[c] = Counter(label: "rewind_nbd_request_errors_total", dimensions: [("command", c.name)])
            r[c] = Counter(label: "rewind_nbd_requests_total", dimensions: [("command", c.name)])
            b[c] = Counter(label: "rewind_nbd_bytes_total", dimensions: [("command", c.name)])
            l[c] = Metrics.Timer(label: "rewind_nbd_request_duration_seconds", dimensions: [("command", c.name)])
        }
        requests = r; bytes = b; latency = l; errors = e
        fencedGauge.record(0)
    }

    func fenced(_ why: String) {
        fencedGauge.record(1)
        logger?.critical("volume fenced, every further write fails with EIO: \(why)")
    }

    func madeRoom(_ report: CompactionReport, after error: String) {
        journalFullCompactions.increment()
        compactions.increment()
        compactedBlocks.increment(by: Int64(report.blocksWritten))
        horizon.record(Int64(report.toHorizon))
        logger?.warning("journal full (\(error)): gave up the oldest history to make room, folding seq:\(report.fromHorizon + 1)...seq:\(report.toHorizon) (\(report.recordsRemoved) records, \(report.bytesFolded) bytes of payload) into the base")
    }

    func synced(_ kind: ServePipeline.SyncKind, nanoseconds: UInt64) {
        syncs[kind]?.increment()
        if kind == .flush { flushLatency.recordNanoseconds(Int64(nanoseconds)) }
    }

    func requestStarted(_ command: NBDCommand) {
        let n = state.withLockedValue { $0.inflight += 1; return $0.inflight }
        inflightGauge.record(n)
    }

    func requestFinished(_ command: NBDCommand, bytes n: UInt64, nanoseconds: UInt64, error: NBDErrno?) {
        let n2 = state.withLockedValue { $0.inflight = max(0, $0.inflight - 1); return $0.inflight }
        inflightGauge.record(n2)
        requests[command]?.increment()
        if error != nil {
            errors[command]?.increment()
        } else {
            bytes[command]?.increment(by: Int64(n))
            latency[command]?.recordNanoseconds(Int64(nanoseconds))
        }
    }

    func connectionOpened() { connectionsGauge.record(state.withLockedValue { $0.connections += 1; return $0.connections }) }
    func connectionClosed() { connectionsGauge.record(state.withLockedValue { $0.connections -= 1; return $0.connections }) }

    func journalAppended(records: Int, bytes: Int, lastSeq seq: UInt64) {
        journalRecords.increment(by: Int64(records))
        journalBytes.increment(by: Int64(bytes))
        lastSeq.record(Int64(seq))
    }
}
