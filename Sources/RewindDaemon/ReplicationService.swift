import Foundation
import Logging
import Metrics
import NIOCore
import RewindCore
import RewindLink
import ServiceLifecycle

/// The senders of one mirror (`--replicate-to`, on serve and receive): started with the
/// mirror, each on its own thread; every second their state goes to the metrics and the
/// peers table; stopped before the mirror closes.
final class Replication: @unchecked Sendable {
    let senders: [LinkSender]
    let mirror: Mirror

    /// The unit's identity is loaded (or created) here, so a bad `--home` stops the start.
    static func context(home: String?) throws -> (UnitIdentity, String) {
        let dir = UnitIdentity.homeDirectory(home)
        do {
            return (try UnitIdentity.loadOrCreate(home: dir), dir)
        } catch let e as IdentityError {
            throw RewindError.invalidArgument(e.description)
        }
    }

    init(mirror: Mirror, peers: [LinkPeer], identity: UnitIdentity, group: EventLoopGroup, logger: Logger,
         keepBytes: UInt64? = nil, minFreeBytes: UInt64? = nil) throws {
        self.mirror = mirror
        let tls = try LinkTLS.clientContext(identity)
        let senders = peers.map { LinkSender(mirror: mirror, peer: $0, context: tls, group: group, logger: logger, keepBytes: keepBytes,
                                           minFreeBytes: minFreeBytes) }
        self.senders = senders
        mirror.indexCommitted = { for s in senders { s.nudge() } }
    }

    func start() { senders.forEach { $0.start() } }
    func stop() { senders.forEach { $0.stop() } }

    /// Each peer's state and lag into the metrics.
    func report(_ gauges: inout [String: PeerGauges]) {
        for s in senders {
            let g = gauges[s.peer.id] ?? PeerGauges(peer: s.peer)
            gauges[s.peer.id] = g
            let st = s.status
            g.connected.record(st.connected ? 1 : 0)
            g.bytesSent.record(Int64(st.bytesSent))
            let dirty = try? mirror.peerDirty(s.peer.id)
            g.dirtyBlocks.record(Int64(dirty?.blocks.count ?? 0))
            g.dirtySetBytes.record(Int64(dirty?.blocks.encodedSize ?? 0))
            if let d = st.durableSeq, let lag = try? mirror.lag(after: d) {
                g.durable.record(Int64(d))
                g.lagRecords.record(Int64(lag.records))
                g.lagBytes.record(Int64(lag.bytes))
                g.lagSeconds.record(lag.seconds)
            }
        }
    }

    struct PeerGauges {
        let connected, durable, lagRecords, lagBytes, lagSeconds, bytesSent, dirtyBlocks, dirtySetBytes: Gauge
        init(peer: LinkPeer) {
            let d = [("peer", peer.id)]
            connected = Gauge(label: "rewind_peer_connected", dimensions: d)
            durable = Gauge(label: "rewind_peer_durable_seq", dimensions: d)
            lagRecords = Gauge(label: "rewind_peer_lag_records", dimensions: d)
            lagBytes = Gauge(label: "rewind_peer_lag_bytes", dimensions: d)
            lagSeconds = Gauge(label: "rewind_peer_lag_seconds", dimensions: d)
            bytesSent = Gauge(label: "rewind_peer_sent_bytes", dimensions: d)
            // Dirty-set mode (records it lacked were folded): the blocks to catch it up with.
            dirtyBlocks = Gauge(label: "rewind_peer_dirty_blocks", dimensions: d)
            dirtySetBytes = Gauge(label: "rewind_peer_dirty_set_bytes", dimensions: d)
        }
    }
}

/// Runs the senders for the service group's life.
struct ReplicationService: Service {
    let replication: Replication
    let gate: SyncGate?

    func run() async throws {
        replication.start()
        var gauges: [String: Replication.PeerGauges] = [:]
        let degraded = Gauge(label: "rewind_sync_degraded")
        while !Task.isShuttingDownGracefully {
            replication.report(&gauges)
            if let gate { degraded.record(gate.isDegraded ? 1 : 0) }
            try? await cancelWhenGracefulShutdown { try await Task.sleep(nanoseconds: 1_000_000_000) }
        }
        // Services stop in reverse order, so this stops before the server drains: the FLUSHes
        // it still answers then pass the stopped gate, never waiting for a stopping sender.
        gate?.stop()
        replication.stop()
    }
}
