import ArgumentParser
import RewindCore
import RewindDaemon
import RewindLink
import RewindNBD

/// The options `serve` and `tap` share: where they listen, the mirror, retention, metrics,
/// replication. Checked here; a config file's values fill in what the command line left unset.
struct DaemonOptionGroup: ParsableArguments {
    @Option(help: "The mirror directory (serve: default SOURCE.rewind, created from SOURCE; tap: default NAME.rewind, created from the upstream).") var mirror: String?
    @Option(help: "Listen on HOST:PORT or unix:PATH (repeatable; default 127.0.0.1:10809).") var listen: [String] = []
    @Option(help: "Export name (serve: SOURCE's file name; tap: the upstream's export name); \"\" always works too.") var export: String?
    @Option(help: "Block size for a new mirror.") var blockSize: Int?
    @Option(help: "Keep this much history; older records are folded into the base (e.g. 7d).", transform: parseDuration) var keepAge: UInt64?
    @Option(help: "Keep at most this much journal payload (e.g. 10G).", transform: parseSize) var keepSize: UInt64?
    @Option(help: "Serve Prometheus metrics on HOST:PORT.") var metrics: String?
    @Option(help: "trace, debug, info, notice, warning, error or critical.") var logLevel: String?
    @Option(help: "Most NBD connections at once.") var maxConnections: Int?
    @Option(help: "Read options from FILE (TOML: key = \"value\", keys named as the long options).") var config: String?
    @Flag(help: "Serve even when earlier payload in the mirror's log is missing or damaged (the points that need it stay unreadable).")
    var acceptDamage = false
    @Option(help: "When the journal's file system is full: compact (give up the oldest history to make room; the default) or fail (fence the volume: ENOSPC, then EIO).")
    var onFull: String?
    @Option(name: .customLong("replicate-to"), help: "Stream the journal to the unit ID@HOST:PORT (repeatable; ID from `rewind id` there).")
    var replicateTo: [String] = []
    @Option(help: "This unit's home directory: its key pair for --replicate-to.") var home: String?
    @Option(help: "async (the default): answer the host once the volume and the local journal have a write; sync: FLUSH and FUA also wait until the first --replicate-to peer holds it durably.")
    var ack: String?
    @Option(help: "How long a sync FLUSH waits for the peer before the link degrades to async until the peer catches up (e.g. 5s; 0s: wait forever).", transform: parseDuration)
    var syncTimeout: UInt64?
    @Option(name: .customLong("peer-keep-size"), help: "Keep at most this much journal payload for a --replicate-to peer that is behind (e.g. 20G); past it, retention folds those records and the peer is later caught up from the blocks they changed, as one point.", transform: parseSize)
    var peerKeepSize: UInt64?
    @Option(name: .customLong("peer-min-free"), help: "Below this much free space on the journal's file system (e.g. 10G), --replicate-to peers that are behind hold no records; retention folds them and they are caught up later from the blocks changed.", transform: parseSize)
    var peerMinFree: UInt64?
    @Flag(help: "Print the listening addresses as one JSON line.") var json = false

    /// The config file, read and every value in it checked first: a bad one stops here,
    /// before anything is created or opened. Only `command`'s keys are known.
    func readConfig(for command: ServeOptions.Command) throws -> ServeConfig? {
        try config.map { try ServeOptions.readConfig($0, for: command) }
    }

    /// Put the options given into `o`, noting each one's config key in `set`.
    func apply(to o: inout ServeOptions, set: inout Set<String>) throws {
        if let mirror { o.mirror = mirror; set.insert("mirror") }
        if !listen.isEmpty {
            o.listen = try listen.map { text in
                do { return try ListenAddress(parsing: text) } catch let e as ListenAddressError { throw ValidationError(e.description) }
            }
            set.insert("listen")
        }
        if let export { o.export = export; set.insert("export") }
        if let blockSize {
            do { try ServeOptions.checkBlockSize(blockSize) } catch let e as RewindError { throw ValidationError(e.description) }
            o.blockSize = blockSize
            set.insert("block-size")
        }
        if let keepAge { o.keepAgeNanoseconds = keepAge; set.insert("keep-age") }
        if let keepSize { o.keepBytes = keepSize; set.insert("keep-size") }
        if let metrics {
            do { o.metrics = try ListenAddress(parsing: metrics, defaultPort: 9810) } catch let e as ListenAddressError { throw ValidationError(e.description) }
            set.insert("metrics")
        }
        if let logLevel {
            o.logLevel = try checkedLogLevel(logLevel)
            set.insert("log-level")
        }
        if let maxConnections {
            do { try ServeOptions.checkMaxConnections(maxConnections) } catch let e as RewindError { throw ValidationError(e.description) }
            o.maxConnections = maxConnections
            set.insert("max-connections")
        }
        if acceptDamage { o.acceptDamage = true; set.insert("accept-damage") }
        if let onFull {
            guard let policy = ServePipeline.FullPolicy(rawValue: onFull) else {
                throw ValidationError("invalid --on-full \"\(onFull)\": use compact or fail")
            }
            o.onFull = policy
            set.insert("on-full")
        }
        if !replicateTo.isEmpty {
            o.replicateTo = try parsePeers(replicateTo)
            set.insert("replicate-to")
        }
        if let home { o.home = home; set.insert("home") }
        if let ack {
            guard let sync = ServeOptions.parseAck(ack) else { throw ValidationError("invalid --ack \"\(ack)\": use async or sync") }
            o.ackSync = sync
            set.insert("ack")
        }
        if let syncTimeout { o.syncTimeoutSeconds = Double(syncTimeout) / 1e9; set.insert("sync-timeout") }
        if let peerKeepSize { o.peerKeepBytes = peerKeepSize; set.insert("peer-keep-size") }
        if let peerMinFree { o.peerMinFreeBytes = peerMinFree; set.insert("peer-min-free") }
    }

    /// After the config file: what no combination allows.
    func finish(_ o: inout ServeOptions) throws {
        o.json = json
        if o.ackSync && o.replicateTo.isEmpty { throw ValidationError("--ack sync needs a peer to wait for: give --replicate-to ID@HOST:PORT") }
    }
}
