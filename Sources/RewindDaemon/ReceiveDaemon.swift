import Foundation
import Logging
import Metrics
import NIOCore
import NIOPosix
import Prometheus
import RewindCore
import RewindNBD
import RewindLink
import ServiceLifecycle

/// What `rewind receive` is told.
public struct ReceiveOptions: Sendable {
    public var mirror: String
    public var host: String
    public var port: Int
    /// The units allowed to stream to this one (`--peer-id`).
    public var peerIDs: [String]
    /// Where this unit forwards what it receives (cascade, fan-out).
    public var replicateTo: [LinkPeer] = []
    public var home: String?
    /// The replica's own retention (`--keep-age`, `--keep-size`), as serve's.
    public var keepAgeNanoseconds: UInt64?
    public var keepBytes: UInt64?
    /// Records kept for a forwarded peer that is behind, at most (`--peer-keep-size`).
    public var peerKeepBytes: UInt64?
    public var peerMinFreeBytes: UInt64?
    /// `--rejoin`: MIRROR is a former origin's, rejoining as a receiver of the new origin.
    public var rejoin = false
    /// `--seed-from IMAGE`: an earlier copy of the volume the first seed starts from.
    public var seedFrom: String?
    public var logLevel = "info"
    /// Serve Prometheus metrics here (`--metrics`).
    public var metrics: ListenAddress?
    public var json = false

    public init(mirror: String, host: String, port: Int, peerIDs: [String]) {
        self.mirror = mirror
        self.host = host
        self.port = port
        self.peerIDs = peerIDs
    }
}

/// `rewind receive`: a remote unit. Listens for its peers' streams (`LinkReceiver`), keeps
/// MIRROR — created on first contact, seeded over the link — and forwards it to its own
/// peers (`--replicate-to`) once it exists. Runs until SIGTERM/SIGINT.
public enum ReceiveDaemon {
    public static func run(_ o: ReceiveOptions) async throws {
        DaemonSupport.bootstrapLogging(level: o.logLevel)
        let logger = Logger(label: "rewind.receive")
        let registry = DaemonSupport.bootstrapMetrics(o.metrics != nil)
        let (identity, home) = try Replication.context(home: o.home)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        let forwarding = Forwarding(peers: o.replicateTo, identity: identity, group: group, logger: logger, keepBytes: o.peerKeepBytes, minFreeBytes: o.peerMinFreeBytes)
        let receiver = try LinkReceiver(path: o.mirror, allowed: Set(o.peerIDs), identity: identity, group: group,
                                        logger: logger, forwards: !o.replicateTo.isEmpty, rejoin: o.rejoin, staleCopy: o.seedFrom) { mirror in forwarding.start(mirror) }
        let address: SocketAddress
        do {
            address = try await receiver.start(host: o.host, port: o.port)
        } catch {
            await receiver.stop()
            try? await group.shutdownGracefully()
            throw RewindError.invalidArgument("cannot listen on \(o.host):\(o.port): \(error)")
        }
        var metricsChannel: Channel?
        if let m = o.metrics, let registry {
            do {
                metricsChannel = try await startMetricsServer(m, registry: registry, group: group)
            } catch {
                await receiver.stop()
                throw RewindError.invalidArgument("cannot serve metrics on \(m): \(error)")
            }
        }
        let bound = "\(address.ipAddress ?? o.host):\(address.port ?? o.port)"
        if o.json {
            printLine(#"{"listen":"\#(bound)","id":"\#(identity.id)","home":"\#(jsonEscaped(home))","mirror":"\#(jsonEscaped(o.mirror))"}"#)
        } else {
            printLine("rewind: receiving into \(o.mirror) on \(bound) as \(identity.id)\n  from: \(o.peerIDs.joined(separator: ", "))")
        }
        let service = ReceiveService(receiver: receiver, forwarding: forwarding, keepAgeNanoseconds: o.keepAgeNanoseconds,
                                     keepBytes: o.keepBytes, logger: logger)
        let group2 = ServiceGroup(configuration: .init(services: [.init(service: service)],
                                                       gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group2.run()
        try? await metricsChannel?.close()
        try? await group.shutdownGracefully()
        let last = (try? receiver.mirror?.meta().lastSeq).flatMap { $0 }
        logger.info("stopped; \(o.mirror) holds seq:\(last.map(String.init) ?? "none")")
    }

    static func printLine(_ s: String) {
        FileHandle.standardOutput.write(Data((s + "\n").utf8))
    }

    static func jsonEscaped(_ s: String) -> String {
        s.replacingOccurrences(of: "\\", with: "\\\\").replacingOccurrences(of: "\"", with: "\\\"")
    }
}

/// The receiver's own senders, started once its mirror exists.
final class Forwarding: @unchecked Sendable {
    let peers: [LinkPeer]
    let identity: UnitIdentity
    let group: EventLoopGroup
    let logger: Logger
    private let lock = NSLock()
    private var replication: Replication?
    let keepBytes: UInt64?
    let minFreeBytes: UInt64?

    init(peers: [LinkPeer], identity: UnitIdentity, group: EventLoopGroup, logger: Logger, keepBytes: UInt64? = nil,
         minFreeBytes: UInt64? = nil) {
        self.keepBytes = keepBytes
        self.minFreeBytes = minFreeBytes
        self.peers = peers
        self.identity = identity
        self.group = group
        self.logger = logger
    }

    func start(_ mirror: Mirror) {
        guard !peers.isEmpty else { return }
        lock.withLock {
            guard replication == nil else { return }
            do {
                let r = try Replication(mirror: mirror, peers: peers, identity: identity, group: group, logger: logger, keepBytes: keepBytes,
                                        minFreeBytes: minFreeBytes)
                r.start()
                replication = r
            } catch {
                logger.error("cannot forward to \(peers.map(\.description).joined(separator: ", ")): \(error)")
            }
        }
    }

    func report(_ gauges: inout [String: Replication.PeerGauges]) {
        let r = lock.withLock { replication }
        r?.report(&gauges)
    }

    func stop() {
        let r = lock.withLock { replication }
        r?.stop()
    }
}

struct ReceiveService: Service {
    let receiver: LinkReceiver
    let forwarding: Forwarding
    let keepAgeNanoseconds: UInt64?
    let keepBytes: UInt64?
    let logger: Logger

    func run() async throws {
        var gauges: [String: Replication.PeerGauges] = [:]
        var tick = 0
        let newest = Gauge(label: "rewind_replica_newest_seq")
        let horizon = Gauge(label: "rewind_replica_oldest_seq")
        while !Task.isShuttingDownGracefully {
            forwarding.report(&gauges)
            if let m = try? receiver.mirror?.meta() {
                newest.record(Int64(m.lastSeq))
                horizon.record(Int64(m.oldestPoint))
            }
            tick += 1
            // Every 10 s: the replica's own retention (it stops at its own peers and pins).
            if tick % 10 == 0, keepAgeNanoseconds != nil || keepBytes != nil, let m = receiver.mirror {
                do {
                    if let r = try m.compact(keepAgeNanoseconds: keepAgeNanoseconds, keepBytes: keepBytes) {
                        logger.info("retention: compacted to seq:\(r.toHorizon) (\(r.recordsRemoved) records folded)")
                    }
                } catch {
                    logger.warning("retention: \(error)")
                }
            }
            try? await cancelWhenGracefulShutdown { try await Task.sleep(nanoseconds: 1_000_000_000) }
        }
        logger.info("shutting down")
        forwarding.stop()
        await receiver.stop()
    }
}
