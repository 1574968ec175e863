import ArgumentParser
import Glibc
import RewindCore
import RewindDaemon
import RewindLink
import RewindNBD

struct ReceiveCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "receive",
        abstract: "Receive a volume's journal from other units, over mutual TLS, into MIRROR (seeded over the link on first contact).",
        discussion: "Only units whose IDs are given with --peer-id may stream here. With --replicate-to, what arrives is forwarded further (cascade, fan-out).")

    @Argument(help: "The mirror directory (created on first contact).") var mirror: String
    @Option(help: "Listen on HOST:PORT.") var listen: String
    @Option(name: .customLong("peer-id"), help: "The ID (`rewind id`) of a unit allowed to stream here (repeatable).") var peerID: [String] = []
    @Option(name: .customLong("replicate-to"), help: "Forward to ID@HOST:PORT (repeatable).") var replicateTo: [String] = []
    @Option(help: "This unit's home directory (its key pair).") var home: String?
    @Option(help: "The replica's own retention: keep this much history (e.g. 30d).", transform: parseDuration) var keepAge: UInt64?
    @Option(help: "The replica's own retention: keep at most this much journal payload (e.g. 100G).", transform: parseSize) var keepSize: UInt64?
    @Option(name: .customLong("peer-keep-size"), help: "Keep at most this much journal payload for a --replicate-to peer that is behind (e.g. 20G); past it, that peer is later caught up from the blocks changed, as one point.", transform: parseSize)
    var peerKeepSize: UInt64?
    @Option(name: .customLong("peer-min-free"), help: "Below this much free space on the journal's file system, --replicate-to peers that are behind hold no records (caught up later from the blocks changed).", transform: parseSize)
    var peerMinFree: UInt64?
    @Flag(help: "MIRROR is a former origin's, rejoining after a failover as a receiver of the new origin: its records after the failover point (never replicated) are cut, and it converges by receiving only what differs.")
    var rejoin = false
    @Option(name: .customLong("seed-from"), help: "With no mirror yet: start from this earlier copy of the volume (yesterday's image, a backup); the seed then sends only the blocks that differ from it.")
    var seedFrom: String?
    @Option(help: "trace, debug, info, notice, warning, error or critical.") var logLevel: String?
    @Option(help: "Serve Prometheus metrics on HOST:PORT.") var metrics: String?
    @Flag(help: "Print the listening address and this unit's ID as one JSON line.") var json = false

    func run() async throws {
        try await reportingAsync {
            guard !peerID.isEmpty else { throw ValidationError("give at least one --peer-id (the ID `rewind id` prints on the sending unit)") }
            for id in peerID where !UnitIdentity.isValidID(id.lowercased()) {
                throw ValidationError("invalid --peer-id \"\(id)\": an ID is the 64 hex digits `rewind id` prints")
            }
            let address: ListenAddress
            do { address = try ListenAddress(parsing: listen, defaultPort: 7310) } catch let e as ListenAddressError { throw ValidationError(e.description) }
            guard case let .tcp(host, port) = address else { throw ValidationError("--listen takes HOST:PORT (the link runs over TCP)") }
            var o = ReceiveOptions(mirror: mirror, host: host, port: port, peerIDs: peerID.map { $0.lowercased() })
            o.replicateTo = try parsePeers(replicateTo)
            o.home = home
            o.keepAgeNanoseconds = keepAge
            o.keepBytes = keepSize
            o.peerKeepBytes = peerKeepSize
            o.peerMinFreeBytes = peerMinFree
            o.rejoin = rejoin
            if let seedFrom {
                guard access(seedFrom, R_OK) == 0 else { throw ValidationError("--seed-from \(seedFrom): no readable file there") }
                o.seedFrom = seedFrom
            }
            if let logLevel {
                o.logLevel = try checkedLogLevel(logLevel)
            }
            if let metrics {
                do { o.metrics = try ListenAddress(parsing: metrics, defaultPort: 9810) } catch let e as ListenAddressError { throw ValidationError(e.description) }
            }
            o.json = json
            try await ReceiveDaemon.run(o)
        }
    }
}
