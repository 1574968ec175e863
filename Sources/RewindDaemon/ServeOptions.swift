import Foundation
import RewindCore
import RewindNBD

/// Everything `rewind serve` is told, from the command line and/or a config file.
///
/// The config file (`--config FILE`) takes the same keys as the long options, one per line:
/// ```
/// # comment
/// listen = 127.0.0.1:10809
/// listen = unix:/run/rewind/vol0.sock
/// keep-age = 7d
/// ```
/// Options given on the command line win over the file.
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

    public init(source: String) { self.source = source }

    public static let configKeys: Set<String> = ["source", "mirror", "size", "listen", "export", "description", "block-size",
                                                 "keep-age", "keep-size", "metrics", "log-level", "max-connections",
                                                 "retention-interval"]

    /// Read `key = value` lines from `path` into a list, keeping repeats (listen).
    public static func readConfig(_ path: String) throws -> [(key: String, value: String)] {
        guard let text = try? String(contentsOfFile: path, encoding: .utf8) else {
            throw RewindError.invalidArgument("cannot read config file \(path)")
        }
        var out: [(String, String)] = []
        for (n, raw) in text.split(separator: "\n", omittingEmptySubsequences: false).enumerated() {
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.isEmpty || line.hasPrefix("#") { continue }
            guard let eq = line.firstIndex(of: "=") else {
                throw RewindError.invalidArgument("\(path):\(n + 1): expected key = value")
            }
            let key = line[..<eq].trimmingCharacters(in: .whitespaces)
            var value = line[line.index(after: eq)...].trimmingCharacters(in: .whitespaces)
            if value.count >= 2 && value.hasPrefix("\"") && value.hasSuffix("\"") { value = String(value.dropFirst().dropLast()) }
            guard configKeys.contains(key) else {
                throw RewindError.invalidArgument("\(path):\(n + 1): unknown key \"\(key)\" (known: \(configKeys.sorted().joined(separator: ", ")))")
            }
            out.append((key, value))
        }
        return out
    }

    /// Apply config entries, each only where the command line left the option unset.
    public mutating func apply(config: [(key: String, value: String)], setOnCommandLine: Set<String>) throws {
        var listens: [ListenAddress] = []
        for (key, value) in config where !setOnCommandLine.contains(key) {
            do {
                switch key {
                case "mirror": mirror = value
                case "size": size = try Parse.size(value)
                case "listen": listens.append(try ListenAddress(parsing: value))
                case "export": export = value
                case "description": description = value
                case "block-size":
                    guard let n = Int(value) else { throw RewindError.invalidArgument("invalid block size \"\(value)\"") }
                    blockSize = n
                case "keep-age": keepAgeNanoseconds = try Parse.duration(value)
                case "keep-size": keepBytes = try Parse.size(value)
                case "metrics": metrics = try ListenAddress(parsing: value, defaultPort: 9810)
                case "log-level": logLevel = value
                case "max-connections":
                    guard let n = Int(value), n > 0 else { throw RewindError.invalidArgument("invalid max-connections \"\(value)\"") }
                    maxConnections = n
                case "retention-interval": retentionIntervalSeconds = Double(try Parse.duration(value)) / 1e9
                default: break
                }
            } catch let e as ListenAddressError {
                throw RewindError.invalidArgument("config \(key): \(e.description)")
            }
        }
        if !listens.isEmpty { listen = listens }
    }
}
