import Foundation
import RewindCore
import RewindLink
import RewindNBD
import TOMLKit

/// Everything `rewind serve` is told, from the command line and/or a config file.
///
/// The config file (`--config FILE`) is TOML (https://toml.io/en/v1.0.0): top-level keys only,
/// named as the long options (kebab-case), each at most once:
/// ```
/// # /etc/rewind/vol0.toml
/// source = "/srv/vol0.img"
/// mirror = "/srv/vol0.img.rewind"
/// listen = ["127.0.0.1:10809", "unix:/run/rewind/vol0.sock"]   # a string or an array of strings
/// keep-age = "7d"            # DURATION
/// keep-size = "10G"          # SIZE, or an integer number of bytes
/// size = "20G"               # SIZE, or an integer number of bytes
/// block-size = 4096
/// max-connections = 128
/// log-level = "info"
/// metrics = "127.0.0.1:9810"
/// export = "vol0"
/// description = "the first volume"
/// retention-interval = "10s" # DURATION
/// accept-damage = false
/// on-full = "compact"        # or "fail"
/// replicate-to = ["ID@backup1:7310"]  # a string or an array of strings (`rewind id` of each peer)
/// home = "/var/lib/rewind"   # this unit's key pair (`rewind id --home`)
/// ack = "async"              # or "sync": FLUSH/FUA wait for the first peer
/// sync-timeout = "5s"        # DURATION a sync FLUSH waits before degrading to async ("0s": forever)
/// peer-keep-size = "20G"     # SIZE of records kept for a peer that is behind; past it, its changed blocks
/// peer-min-free = "10G"      # SIZE: below this much free space on the journal's file system, the same
/// ```
/// `readConfig` checks every value before `serve` creates or opens anything. Its errors name
/// the place: `FILE:LINE:COLUMN: <the TOML parser's message>` for a syntax error (a duplicate
/// key among them), `FILE:LINE: unknown key "K" (known: ...)`, and `FILE:LINE: K: why` for a
/// value of the wrong type or an invalid one. Relative paths are taken from the working
/// directory, as on the command line. Options given on the command line win over the file.
public struct ServeOptions: Sendable {
    public var source: String
    public var mirror: String?
    public var size: UInt64?
    public var listen: [ListenAddress] = []
    public var export: String?
    public var description: String?
    public var blockSize: Int = Mirror.defaultBlockSize
    public var keepAgeNanoseconds: UInt64?
    public var keepBytes: UInt64?
    public var metrics: ListenAddress?
    public var logLevel: String = "info"
    public var maxConnections: Int = 128
    /// Seconds between retention passes.
    public var retentionIntervalSeconds: Double = 10
    /// Print one JSON line with the bound addresses once listening (for scripts).
    public var json = false
    /// Serve even when earlier payload in the mirror's log is missing or damaged; the points
    /// that need it stay unreadable.
    public var acceptDamage = false
    /// When the journal's file system is full: give up the oldest history, or fence.
    public var onFull: ServePipeline.FullPolicy = .compact
    /// Peers the journal is streamed to (`--replicate-to ID@HOST:PORT`).
    public var replicateTo: [LinkPeer] = []
    /// This unit's home: its key pair (`--home`; `UnitIdentity.homeDirectory`).
    public var home: String?
    /// `--ack sync`: FLUSH and FUA replies wait for the first peer (`SyncGate`).
    public var ackSync = false
    /// How long a sync FLUSH waits for the peer before the link degrades to async (0: forever).
    public var syncTimeoutSeconds: Double = 5
    /// Records kept for a peer that is behind, at most (payload bytes); past it, retention
    /// folds them and the peer keeps the blocks they changed (`PeerDirty`). nil: no bound.
    public var peerKeepBytes: UInt64?
    /// Below this much free space on the journal's file system, peers hold no records.
    public var peerMinFreeBytes: UInt64?

    /// `rewind tap`: the upstream's NBD URI (`upstream` in a tap's config file).
    public var upstream: String?
    /// `rewind tap --check`: what the start compares with the upstream.
    public var check: TapDaemon.Check = .auto

    public init(source: String) { self.source = source }

    public static let configKeys: Set<String> = ["source", "mirror", "size", "listen", "export", "description", "block-size",
                                                 "keep-age", "keep-size", "metrics", "log-level", "max-connections",
                                                 "retention-interval", "accept-damage", "on-full", "replicate-to", "home", "ack", "sync-timeout", "peer-keep-size", "peer-min-free", "upstream", "check"]
    /// The daemons that read a config file, and the keys each knows: `serve` has no upstream,
    /// `tap` no source file.
    public enum Command: String, Sendable {
        case serve, tap
        public var keys: Set<String> {
            switch self {
            case .serve: configKeys.subtracting(["upstream", "check"])
            case .tap: configKeys.subtracting(["source", "size"])
            }
        }
    }

    /// `--ack`: true for sync, nil when neither.
    public static func parseAck(_ text: String) -> Bool? {
        switch text {
        case "async": false
        case "sync": true
        default: nil
        }
    }

    /// The levels `--log-level` and `log-level` take (swift-log's, by name).
    public static let logLevels: Set<String> = ["trace", "debug", "info", "notice", "warning", "error", "critical"]

    /// The most bytes a config file may hold. A real one is a few hundred bytes; the limit
    /// stops `--config /dev/zero`, or a disk image given by mistake, from being read to its end.
    public static let configBytesMax = 1 << 20

    /// Refuse a block size a new mirror cannot take (the rule of `Mirror.create`), so that a bad
    /// one stops `serve` before it creates the source (whose size must be a multiple of it).
    public static func checkBlockSize(_ n: Int) throws {
        guard n >= 512, n <= 1 << 20, n & (n - 1) == 0 else {
            throw RewindError.invalidArgument("invalid block size \(n): use a power of two from 512 to 1M (e.g. 4096)")
        }
    }

    /// Refuse a connection limit below one: the server would refuse every client.
    public static func checkMaxConnections(_ n: Int) throws {
        guard n > 0 else { throw RewindError.invalidArgument("invalid max-connections \(n): use a positive number") }
    }

    /// Read the TOML config file at `path` and check every value, also those the command line
    /// overrides. Nothing is created, opened for writing or changed: a bad file stops `serve`
    /// before it touches the disk.
    ///
    /// Throws `RewindError.invalidArgument`, one line:
    /// - `cannot read config file FILE: <strerror>`, `config file FILE is larger than 1 MiB`
    /// - `FILE:LINE:COLUMN: not UTF-8 text`, `FILE:LINE:COLUMN: a NUL byte is not allowed in TOML`
    /// - `FILE:LINE:COLUMN: <the TOML parser's message>`: a syntax error, a duplicate key
    /// - `FILE:LINE: a string holds a NUL character (\u0000)`
    /// - `FILE:LINE: unknown key "K" (known: ...)`, also for a `[table]`
    /// - `FILE:LINE: K: expected ...` (a value of the wrong type), `FILE:LINE: K: invalid ...`
    ///
    /// TOMLKit gives values without their place in the file, so a key's LINE comes from
    /// `TOMLKeyLines`, a scan of the text; a key it cannot place (a quoted key written with
    /// escapes) is reported as `FILE: K: ...`.
    public static func readConfig(_ path: String, for command: Command = .serve) throws -> ServeConfig {
        let bytes = try readConfigBytes(path)
        if let offset = firstInvalidUTF8(bytes) {
            throw RewindError.invalidArgument("\(path):\(position(of: offset, in: bytes)): not UTF-8 text")
        }
        // TOMLKit hands the text to toml++ as a C string, which a NUL byte would end early.
        if let offset = bytes.firstIndex(of: 0) {
            throw RewindError.invalidArgument("\(path):\(position(of: offset, in: bytes)): a NUL byte is not allowed in TOML")
        }
        let table: TOMLTable
        do {
            table = try TOMLTable(string: String(decoding: bytes, as: Unicode.UTF8.self))
        } catch let e as TOMLParseError {
            throw RewindError.invalidArgument("\(path):\(e.source.begin.line):\(e.source.begin.column): \(e.description)")
        }
        let lines = TOMLKeyLines(bytes)
        // Before the keys are read: TOMLKit returns strings, keys too, through C strings, so a
        // NUL would shorten a path silently, and a key holding one would not be found again by
        // the lookup TOMLKit's table iterator force-unwraps.
        if let line = lines.nulEscapeLine {
            throw RewindError.invalidArgument("\(path):\(line): a string holds a NUL character (\\u0000)")
        }
        var entries: [(key: String, value: any TOMLValueConvertible)] = []
        for (key, value) in table { entries.append((key, value)) }
        // In file order, so that the error reported is the first in the file.
        entries.sort { (lines.line(of: $0.key) ?? Int.max, $0.key) < (lines.line(of: $1.key) ?? Int.max, $1.key) }
        var values = ServeOptions(source: "")
        var keys: Set<String> = []
        for (key, value) in entries {
            let place = lines.line(of: key).map { "\(path):\($0)" } ?? path
            var known = command.keys.contains(key)
            do {
                if known { known = try values.take(configKey: key, value) }
            } catch let e as ConfigValueError {
                throw RewindError.invalidArgument("\(place): \(key): \(e.why)")
            }
            guard known else {
                throw RewindError.invalidArgument("\(place): unknown key \"\(key)\" (known: \(command.keys.sorted().joined(separator: ", ")))")
            }
            keys.insert(key)
        }
        return ServeConfig(path: path, values: values, keys: keys)
    }

    /// Take the file's values, each only where the command line left the option unset
    /// (`setOnCommandLine` holds the config key names of the options the command line gave).
    public mutating func apply(config: ServeConfig, setOnCommandLine: Set<String>) {
        let c = config.values
        func fromFile(_ key: String) -> Bool { config.keys.contains(key) && !setOnCommandLine.contains(key) }
        if fromFile("mirror") { mirror = c.mirror }
        if fromFile("size") { size = c.size }
        if fromFile("listen") { listen = c.listen }
        if fromFile("export") { export = c.export }
        if fromFile("description") { description = c.description }
        if fromFile("block-size") { blockSize = c.blockSize }
        if fromFile("keep-age") { keepAgeNanoseconds = c.keepAgeNanoseconds }
        if fromFile("keep-size") { keepBytes = c.keepBytes }
        if fromFile("metrics") { metrics = c.metrics }
        if fromFile("log-level") { logLevel = c.logLevel }
        if fromFile("max-connections") { maxConnections = c.maxConnections }
        if fromFile("retention-interval") { retentionIntervalSeconds = c.retentionIntervalSeconds }
        if fromFile("accept-damage") { acceptDamage = c.acceptDamage }
        if fromFile("on-full") { onFull = c.onFull }
        if fromFile("replicate-to") { replicateTo = c.replicateTo }
        if fromFile("home") { home = c.home }
        if fromFile("ack") { ackSync = c.ackSync }
        if fromFile("sync-timeout") { syncTimeoutSeconds = c.syncTimeoutSeconds }
        if fromFile("peer-keep-size") { peerKeepBytes = c.peerKeepBytes }
        if fromFile("peer-min-free") { peerMinFreeBytes = c.peerMinFreeBytes }
        if fromFile("check") { check = c.check }
    }

    /// Set the option a config key names from its value, checked; false when no option has
    /// that name. Keep in step with `configKeys` and `apply`.
    private mutating func take(configKey key: String, _ value: any TOMLValueConvertible) throws -> Bool {
        switch key {
        case "source": source = try ConfigValue.path(value)
        case "upstream": upstream = try ConfigValue.string(value)
        case "check":
            let text = try ConfigValue.string(value)
            guard let c = TapDaemon.Check(rawValue: text) else { throw ConfigValueError("invalid check \"\(text)\" (use auto, full or none)") }
            check = c
        case "mirror": mirror = try ConfigValue.path(value)
        case "size": size = try ConfigValue.size(value)
        case "listen": listen = try ConfigValue.addresses(value)
        case "export": export = try ConfigValue.string(value)
        case "description": description = try ConfigValue.string(value)
        case "block-size":
            let n = try ConfigValue.integer(value)
            try ConfigValue.checked { try Self.checkBlockSize(n) }
            blockSize = n
        case "keep-age": keepAgeNanoseconds = try ConfigValue.duration(value)
        case "keep-size": keepBytes = try ConfigValue.size(value)
        case "metrics": metrics = try ConfigValue.address(ConfigValue.string(value), defaultPort: 9810)
        case "log-level":
            let level = try ConfigValue.string(value)
            guard Self.logLevels.contains(level) else { throw ConfigValueError("invalid log level \"\(level)\"") }
            logLevel = level
        case "max-connections":
            let n = try ConfigValue.integer(value)
            try ConfigValue.checked { try Self.checkMaxConnections(n) }
            maxConnections = n
        case "retention-interval": retentionIntervalSeconds = try Double(ConfigValue.duration(value)) / 1e9
        case "accept-damage": acceptDamage = try ConfigValue.bool(value)
        case "on-full":
            let text = try ConfigValue.string(value)
            guard let policy = ServePipeline.FullPolicy(rawValue: text) else {
                throw ConfigValueError("invalid policy \"\(text)\" (use compact or fail)")
            }
            onFull = policy
        case "replicate-to":
            var texts: [String] = []
            if let s = value.string { texts = [s] } else if let array = value.array {
                for element in array {
                    guard let s = element.string else { throw ConfigValueError("expected a string or an array of strings") }
                    texts.append(s)
                }
            }
            guard !texts.isEmpty else { throw ConfigValueError("expected a string or an array of strings") }
            replicateTo = try texts.map { t in do { return try LinkPeer(parsing: t) } catch { throw ConfigValueError("\(error)") } }
        case "home": home = try ConfigValue.path(value)
        case "ack":
            let text = try ConfigValue.string(value)
            guard let sync = Self.parseAck(text) else { throw ConfigValueError("invalid value \"\(text)\" (use async or sync)") }
            ackSync = sync
        case "sync-timeout": syncTimeoutSeconds = try Double(ConfigValue.duration(value)) / 1e9
        case "peer-keep-size": peerKeepBytes = try ConfigValue.size(value)
        case "peer-min-free": peerMinFreeBytes = try ConfigValue.size(value)
        default: return false
        }
        return true
    }

    /// The file's bytes, at most `configBytesMax`.
    private static func readConfigBytes(_ path: String) throws -> [UInt8] {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else {
            let err = errno
            throw RewindError.invalidArgument("cannot read config file \(path): \(String(cString: strerror(err)))")
        }
        defer { close(fd) }
        var bytes: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 * 1024)
        while bytes.count <= configBytesMax {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n == 0 { break }
            guard n > 0 else {
                let err = errno
                if err == EINTR { continue }
                throw RewindError.invalidArgument("cannot read config file \(path): \(String(cString: strerror(err)))")
            }
            bytes.append(contentsOf: chunk[..<n])
        }
        guard bytes.count <= configBytesMax else {
            throw RewindError.invalidArgument("config file \(path) is larger than \(configBytesMax >> 20) MiB")
        }
        return bytes
    }

    /// The offset of the first byte that does not start valid UTF-8; nil when all of it is.
    static func firstInvalidUTF8(_ bytes: [UInt8]) -> Int? {
        var iterator = bytes.makeIterator()
        var codec = Unicode.UTF8()
        var offset = 0
        while true {
            switch codec.decode(&iterator) {
            case let .scalarValue(scalar): offset += Unicode.UTF8.width(scalar)
            case .emptyInput: return nil
            case .error: return offset
            }
        }
    }

    /// `LINE:COLUMN` of a byte offset, both from 1, the column counted in Unicode scalars as
    /// the TOML parser counts it.
    static func position(of offset: Int, in bytes: [UInt8]) -> String {
        var line = 1, column = 1
        for byte in bytes[..<offset] {
            if byte == UInt8(ascii: "\n") {
                line += 1
                column = 1
            } else if byte & 0xC0 != 0x80 {  // not a UTF-8 continuation byte
                column += 1
            }
        }
        return "\(line):\(column)"
    }
}

/// A config file, read and checked by `ServeOptions.readConfig`.
public struct ServeConfig: Sendable {
    /// The file, as given.
    public let path: String
    /// The file's values over the defaults; only the options named in `keys` come from the file.
    public let values: ServeOptions
    /// The keys the file sets.
    public let keys: Set<String>

    /// SOURCE, when the file names it (`source = "..."`).
    public var source: String? { keys.contains("source") ? values.source : nil }
}

/// Why a config value was refused; `readConfig` puts the file, the line and the key in front.
private struct ConfigValueError: Error {
    let why: String
    init(_ why: String) { self.why = why }
}

/// A config value as each kind of option takes it; the errors say what was expected.
private enum ConfigValue {
    static func string(_ value: any TOMLValueConvertible) throws -> String {
        guard let s = value.string else { throw ConfigValueError("expected a string") }
        return s
    }

    /// A path: a string, not empty (an empty SOURCE or MIRROR names no file).
    static func path(_ value: any TOMLValueConvertible) throws -> String {
        let s = try string(value)
        guard !s.isEmpty else { throw ConfigValueError("expected a path, not an empty string") }
        return s
    }

    static func integer(_ value: any TOMLValueConvertible) throws -> Int {
        guard let n = value.int else { throw ConfigValueError("expected an integer") }
        return n
    }

    static func bool(_ value: any TOMLValueConvertible) throws -> Bool {
        guard let b = value.bool else { throw ConfigValueError("expected true or false") }
        return b
    }

    /// SIZE: a string such as "10G", or an integer number of bytes.
    static func size(_ value: any TOMLValueConvertible) throws -> UInt64 {
        if let n = value.int { return try checked { try Parse.size(String(n)) } }
        guard let s = value.string else {
            throw ConfigValueError("expected a size: a string such as \"10G\" or an integer number of bytes")
        }
        return try checked { try Parse.size(s) }
    }

    /// DURATION: a string such as "7d".
    static func duration(_ value: any TOMLValueConvertible) throws -> UInt64 {
        guard let s = value.string else { throw ConfigValueError("expected a duration: a string such as \"7d\"") }
        return try checked { try Parse.duration(s) }
    }

    static func address(_ text: String, defaultPort: Int = NBD.defaultPort) throws -> ListenAddress {
        do {
            return try ListenAddress(parsing: text, defaultPort: defaultPort)
        } catch let e as ListenAddressError {
            throw ConfigValueError(e.description)
        }
    }

    /// One ADDR, or an array of at least one.
    static func addresses(_ value: any TOMLValueConvertible) throws -> [ListenAddress] {
        if let s = value.string { return try [address(s)] }
        guard let array = value.array else { throw ConfigValueError("expected a string or an array of strings") }
        var out: [ListenAddress] = []
        for element in array {
            guard let s = element.string else { throw ConfigValueError("expected a string or an array of strings") }
            out.append(try address(s))
        }
        guard !out.isEmpty else { throw ConfigValueError("expected at least one address") }
        return out
    }

    /// Run one of RewindCore's checks; its message becomes the value's.
    static func checked<T>(_ body: () throws -> T) throws -> T {
        do {
            return try body()
        } catch let e as RewindError {
            throw ConfigValueError(e.description)
        }
    }
}

/// Where each top-level key of a TOML document is defined, found by a scan of its bytes:
/// TOMLKit gives values without their place in the file.
///
/// Not a second parser. It runs only on a document toml++ accepted, and follows just enough
/// of TOML (comments, the four kinds of string, brackets) that a line inside a multi-line
/// string, an array or an inline table is not taken for a key. A key is found written bare,
/// `"quoted"` (without escapes) or `'literal'`; plain, dotted (`key.sub = 1`) or as a table
/// header (`[key]`, `[[key.sub]]`). After the first header only headers define top-level keys.
/// The scan also notes the first `\u0000` escape in a basic string: TOMLKit returns strings
/// through C strings, which would end there, silently shortening a path.
struct TOMLKeyLines {
    private var lines: [String: Int] = [:]
    /// The line of the first basic string holding a `\u0000` (or `\U00000000`) escape.
    private(set) var nulEscapeLine: Int?

    /// The line `key` is defined on, from 1; nil when the scan did not find it.
    func line(of key: String) -> Int? { lines[key] }

    init(_ b: [UInt8]) {
        enum State { case normal, comment, basic, literal, multilineBasic, multilineLiteral }
        var state = State.normal
        var depth = 0  // brackets and braces open outside strings and comments
        var line = 1
        var sawHeader = false
        var atLineStart = true
        var i = b.starts(with: [0xEF, 0xBB, 0xBF]) ? 3 : 0  // a UTF-8 byte order mark, which TOML allows
        func at(_ pattern: String, _ j: Int) -> Bool {
            let p = Array(pattern.utf8)
            return j + p.count <= b.count && b[j..<(j + p.count)].elementsEqual(p)
        }
        while i < b.count {
            if atLineStart {
                atLineStart = false
                if state == .normal, depth == 0, let found = Self.definedKey(b, from: i), !sawHeader || found.isHeader {
                    if found.isHeader { sawHeader = true }
                    if lines[found.name] == nil { lines[found.name] = line }
                }
            }
            let c = b[i]
            if c == Self.newline {
                line += 1
                atLineStart = true
                if state == .comment || state == .basic || state == .literal { state = .normal }
                i += 1
                continue
            }
            switch state {
            case .comment:
                i += 1
            case .normal:
                switch c {
                case Self.hash:
                    state = .comment
                    i += 1
                case Self.quote:
                    if at("\"\"\"", i) { state = .multilineBasic; i += 3 } else { state = .basic; i += 1 }
                case Self.apostrophe:
                    if at("'''", i) { state = .multilineLiteral; i += 3 } else { state = .literal; i += 1 }
                case Self.openBracket, Self.openBrace:
                    depth += 1
                    i += 1
                case Self.closeBracket, Self.closeBrace:
                    depth = max(0, depth - 1)
                    i += 1
                default:
                    i += 1
                }
            case .basic, .multilineBasic:
                if c == Self.backslash {
                    if nulEscapeLine == nil, at("\\u0000", i) || at("\\U00000000", i) { nulEscapeLine = line }
                    // Skip the escaped character, but not the line break after a line-ending backslash.
                    i += (i + 1 < b.count && b[i + 1] != Self.newline) ? 2 : 1
                } else if state == .basic, c == Self.quote {
                    state = .normal
                    i += 1
                } else if state == .multilineBasic, at("\"\"\"", i) {
                    state = .normal
                    i = Self.pastClosing(b, i, quote: Self.quote)
                } else {
                    i += 1
                }
            case .literal:
                if c == Self.apostrophe { state = .normal }
                i += 1
            case .multilineLiteral:
                if at("'''", i) {
                    state = .normal
                    i = Self.pastClosing(b, i, quote: Self.apostrophe)
                } else {
                    i += 1
                }
            }
        }
    }

    private static let newline = UInt8(ascii: "\n"), space = UInt8(ascii: " "), tab = UInt8(ascii: "\t")
    private static let hash = UInt8(ascii: "#"), quote = UInt8(ascii: "\""), apostrophe = UInt8(ascii: "'")
    private static let backslash = UInt8(ascii: "\\"), dot = UInt8(ascii: "."), equals = UInt8(ascii: "=")
    private static let openBracket = UInt8(ascii: "["), closeBracket = UInt8(ascii: "]")
    private static let openBrace = UInt8(ascii: "{"), closeBrace = UInt8(ascii: "}")

    /// The offset past a multi-line string's closing delimiter at `i`, with the one or two
    /// quotes TOML lets the content end with just before it (`"""a""""` holds `a"`).
    private static func pastClosing(_ b: [UInt8], _ i: Int, quote: UInt8) -> Int {
        var j = i + 3
        while j < b.count, j < i + 5, b[j] == quote { j += 1 }
        return j
    }

    /// The first key segment the line starting at `start` defines (`key =`, `key.sub =`,
    /// `[key]`, `[[key.sub]]`), and whether it is a table header; nil for any other line.
    private static func definedKey(_ b: [UInt8], from start: Int) -> (name: String, isHeader: Bool)? {
        var i = start
        func skipBlanks() { while i < b.count, b[i] == space || b[i] == tab { i += 1 } }
        skipBlanks()
        var isHeader = false
        if i < b.count, b[i] == openBracket {
            isHeader = true
            i += 1
            if i < b.count, b[i] == openBracket { i += 1 }
            skipBlanks()
        }
        guard i < b.count else { return nil }
        var name: [UInt8] = []
        let first = b[i]
        if first == quote || first == apostrophe {
            i += 1
            while i < b.count, b[i] != first {
                // A quoted key ends on its line; one written with an escape is not placed.
                if b[i] == newline || (first == quote && b[i] == backslash) { return nil }
                name.append(b[i])
                i += 1
            }
            guard i < b.count else { return nil }
            i += 1
        } else {
            while i < b.count, isBareKeyByte(b[i]) {
                name.append(b[i])
                i += 1
            }
            guard !name.isEmpty else { return nil }
        }
        skipBlanks()
        guard i < b.count else { return nil }
        guard b[i] == dot || b[i] == (isHeader ? closeBracket : equals) else { return nil }
        return (String(decoding: name, as: Unicode.UTF8.self), isHeader)
    }

    /// TOML's bare key characters: `A-Z a-z 0-9 _ -`.
    private static func isBareKeyByte(_ c: UInt8) -> Bool {
        switch c {
        case UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "A")...UInt8(ascii: "Z"), UInt8(ascii: "0")...UInt8(ascii: "9"),
             UInt8(ascii: "_"), UInt8(ascii: "-"):
            return true
        default:
            return false
        }
    }
}
