import ArgumentParser
import Foundation
import RewindCore
import RewindDaemon
import RewindLink

/// Run a command body; engine errors become one line on stderr and exit status 1.
func reporting(_ body: () throws -> Void) throws {
    do { try body() } catch { throw exitCode(for: error) }
}

func reportingAsync(_ body: () async throws -> Void) async throws {
    do { try await body() } catch { throw exitCode(for: error) }
}

/// Engine errors: one line on stderr, exit 1. Anything else (argument errors) goes on to
/// ArgumentParser, which prints usage.
private func exitCode(for error: Error) -> Error {
    guard let message = engineMessage(error) else { return error }
    printError(message)
    return ExitCode(1)
}

/// The line to print for an error of the engine's (RewindError, LMDBError), or nil.
func engineMessage(_ error: Error) -> String? {
    switch error {
    case let e as RewindError: return e.description
    case let e as LMDBError: return e.description
    default: return nil
    }
}

/// Open a mirror for a command; a damaged log tail found on the way is said on stderr.
func openMirror(_ path: String, recover: Bool = false) throws -> Mirror {
    let m = try Mirror.open(at: path, recover: recover)
    if let damage = m.logDamage { printWarning("\(damage)") }
    return m
}

/// Open a mirror and, when a server owns it, have that server bring the index up to its
/// durable point first (`ControlSocket`): what the command reads then holds every record a
/// completed FLUSH made durable. Returns the server's answer (nil: no server runs).
func openMirrorCaughtUp(_ path: String) throws -> (Mirror, ControlSocket.DurablePoint?) {
    let m = try openMirror(path)
    do {
        return (m, try ControlSocket.askDurable(m))
    } catch {
        printWarning("\(engineMessage(error) ?? "\(error)"); reading the index as committed (up to a second behind the server)")
        return (m, nil)
    }
}

func printError(_ message: String) {
    FileHandle.standardError.write(Data("rewind: error: \(message)\n".utf8))
}

func printWarning(_ message: String) {
    FileHandle.standardError.write(Data("rewind: warning: \(message)\n".utf8))
}

/// One JSON object per line (JSON Lines), keys sorted so output is stable.
func printJSON<T: Encodable>(_ value: T) {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
    if let data = try? encoder.encode(value), let text = String(data: data, encoding: .utf8) {
        print(text)
    }
}

func parsePoint(_ text: String) throws -> Point {
    do { return try Point(parsing: text) } catch let e as RewindError { throw ValidationError(e.description) }
}

func parseSize(_ text: String) throws -> UInt64 {
    do { return try Parse.size(text) } catch let e as RewindError { throw ValidationError(e.description) }
}

func parseDuration(_ text: String) throws -> UInt64 {
    do { return try Parse.duration(text) } catch let e as RewindError { throw ValidationError(e.description) }
}

/// Human-readable binary size: `4.0 GiB`.
func humanBytes(_ n: UInt64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"]
    var v = Double(n), i = 0
    while v >= 1024 && i < units.count - 1 { v /= 1024; i += 1 }
    return i == 0 ? "\(n) B" : String(format: "%.1f %@", v, units[i])
}

/// `--log-level`, checked against the levels swift-log knows.
func checkedLogLevel(_ level: String) throws -> String {
    guard ServeOptions.logLevels.contains(level) else { throw ValidationError("invalid log level \"\(level)\"") }
    return level
}

/// `--replicate-to` values: `ID@HOST:PORT` each.
func parsePeers(_ texts: [String]) throws -> [LinkPeer] {
    try texts.map { text in
        do { return try LinkPeer(parsing: text) } catch { throw ValidationError("\(error)") }
    }
}

/// `--from` / `--against`: an NBD URI (nbd://, nbd+unix://) is read from its server; anything
/// else is an image file.
func volumeSource(_ text: String) throws -> any VolumeSource {
    text.contains("://") ? try NBDVolumeSource(uri: text) : try BlockFile(path: text, mode: .readOnly)
}
