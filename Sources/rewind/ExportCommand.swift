import ArgumentParser
import RewindCore
import RewindDaemon
import RewindNBD

struct ExportCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export",
        abstract: "Serve the volume as of a point over NBD at once, without copying: read-only, or writable into an overlay.",
        discussion: """
            The point is pinned while the export runs: no compaction (a `serve`'s retention \
            included) folds past it; the pin goes when the export stops, or is killed. Other \
            points are reachable read-only as NAME@POINT. With --overlay, writes go to FILE \
            (created sparse if missing; an existing one must be this mirror's overlay at this \
            point) and the mirror is never written; `rewind restore --overlay FILE` turns it \
            into an image.
            """)

    @Argument(help: "The mirror directory.") var mirror: String
    @Option(help: "The point: seq:N, time:RFC3339, bookmark:NAME, latest or oldest.", transform: parsePoint) var at: Point
    @Flag(help: "Snap the point back to the newest FLUSH point at or before it.") var consistent = false
    @Option(help: "Listen on HOST:PORT or unix:PATH (repeatable; default 127.0.0.1:10809).") var listen: [String] = []
    @Option(help: "Export name (default: the mirror's name without .rewind); \"\" always works too.") var export: String?
    @Option(help: "Make the export writable: writes go to this overlay file, never to the mirror.") var overlay: String?
    @Option(help: "trace, debug, info, notice, warning, error or critical.") var logLevel: String?
    @Option(help: "Most NBD connections at once.") var maxConnections: Int?
    @Flag(help: "Print the listening addresses as one JSON line.") var json = false

    func run() async throws {
        try await reportingAsync {
            var o = ExportOptions(mirror: mirror, point: at.consistent(consistent))
            o.listen = try listen.map { text in
                do { return try ListenAddress(parsing: text) } catch let e as ListenAddressError { throw ValidationError(e.description) }
            }
            if let export {
                guard !export.contains("@") else { throw ValidationError("an export name cannot hold \"@\" (it separates NAME@POINT)") }
                o.export = export
            }
            o.overlay = overlay
            if let logLevel {
                o.logLevel = try checkedLogLevel(logLevel)
            }
            if let maxConnections {
                do { try ServeOptions.checkMaxConnections(maxConnections) } catch let e as RewindError { throw ValidationError(e.description) }
                o.maxConnections = maxConnections
            }
            o.json = json
            try await ExportDaemon.run(o)
        }
    }
}
