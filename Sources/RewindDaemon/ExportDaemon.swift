import Foundation
import Logging
import NIOCore
import NIOPosix
import RewindCore
import RewindNBD
import ServiceLifecycle

/// What `rewind export` was asked for.
public struct ExportOptions: Sendable {
    public var mirror: String
    public var point: Point
    public var listen: [ListenAddress] = []
    /// Default: the mirror directory's name without `.rewind` (SOURCE's name for `serve`'s default mirror).
    public var export: String?
    public var overlay: String?
    public var maxConnections = 128
    public var logLevel = "info"
    public var json = false

    public init(mirror: String, point: Point) {
        self.mirror = mirror
        self.point = point
    }

    var exportName: String {
        if let export { return export }
        let name = URL(fileURLWithPath: mirror).lastPathComponent
        return name.hasSuffix(".rewind") && name.count > 7 ? String(name.dropLast(7)) : name
    }
}

/// `rewind export`: serve one point of a mirror over NBD at once, without copying — read-only,
/// or writable into an overlay — beside a `serve` of the same mirror or without one. The point
/// is pinned for the process's life (`Pin`); `NAME@POINT` reaches other points read-only.
public enum ExportDaemon {
    public static func run(_ options: ExportOptions) async throws {
        DaemonSupport.bootstrapLogging(level: options.logLevel)
        let logger = Logger(label: "rewind.export")
        let addresses = try DaemonSupport.listenAddresses(options.listen)
        let mirror = try Mirror.open(at: options.mirror)
        if let damage = mirror.logDamage { logger.warning("\(damage)") }
        // A running server's newest durable records are in the index before the point resolves.
        let catchUp: @Sendable () -> Void = {
            do { _ = try ControlSocket.askDurable(mirror, timeoutSeconds: 10) } catch {
                logger.warning("could not reach the server of \(mirror.path): \(error); using the index as committed")
            }
        }
        catchUp()
        let name = options.exportName
        let reader = try PointReader(mirror: mirror, point: options.point,
                                     holder: "rewind export \(name) --at \(options.point)\(options.overlay.map { " --overlay \($0)" } ?? "")")
        defer { reader.close() }
        let overlay = try options.overlay.map { try Overlay(path: $0, mirror: mirror, seq: reader.seq) }
        let pool = NIOThreadPool(numberOfThreads: 4)
        pool.start()
        let group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, System.coreCount))
        let volume = PointVolume(reader: reader, overlay: overlay, pool: pool, logger: logger)
        let description = "\(name) as of seq:\(reader.seq)\(overlay.map { " with overlay \($0.path)" } ?? " (read-only)")"
        let primary = NBDExport(name: name, description: description, target: volume)
        let catalog = PointCatalog(primary: primary, mirror: mirror, pool: pool, logger: logger, catchUp: catchUp)
        let server = NBDServer(catalog: catalog, group: group, maxConnections: options.maxConnections, logger: logger)
        let bound: [String]
        do {
            bound = try await server.start(addresses)
        } catch {
            try? await pool.shutdownGracefully()
            try? await group.shutdownGracefully()
            if let e = error as? ListenError { throw RewindError.invalidArgument(e.description) }
            throw RewindError.invalidArgument("cannot listen on \(addresses.map(\.description).joined(separator: ", ")): \(error)")
        }
        announce(options, name: name, seq: reader.seq, mirror: mirror, overlay: overlay, bound: bound)
        let service = ExportService(server: server, overlay: overlay, logger: logger)
        let services = ServiceGroup(configuration: .init(services: [.init(service: service)],
                                                         gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await services.run()
        try? await pool.shutdownGracefully()
        try? await group.shutdownGracefully()
        logger.info("stopped; seq:\(reader.seq) released")
    }

    static func announce(_ options: ExportOptions, name: String, seq: UInt64, mirror: Mirror, overlay: Overlay?, bound: [String]) {
        let first = bound.first ?? ""
        let uri = first.hasPrefix("unix:") ? "nbd+unix:///\(name)?socket=\(first.dropFirst(5))" : "nbd://\(first)/\(name)"
        if options.json {
            let payload: [String: Any] = ["mirror": mirror.path, "export": name, "seq": seq, "listening": bound, "uri": uri,
                                          "size": mirror.volumeSize, "writable": overlay != nil,
                                          "overlay": overlay?.path ?? NSNull()]
            if let data = try? JSONSerialization.data(withJSONObject: payload, options: [.sortedKeys, .withoutEscapingSlashes]) {
                FileHandle.standardOutput.write(data + Data("\n".utf8))
            }
        } else {
            var text = "rewind: exporting \(mirror.path) at seq:\(seq) (\(mirror.volumeSize) bytes), "
            text += overlay.map { "writable into the overlay \($0.path)\n" } ?? "read-only\n"
            for b in bound { text += "  listening on \(b)\n" }
            text += "  connect with: nbdinfo '\(uri)'\n"
            FileHandle.standardOutput.write(Data(text.utf8))
        }
    }
}

/// Runs until SIGTERM/SIGINT, then stops accepting, drains the connections and makes the
/// overlay durable.
struct ExportService: Service {
    let server: NBDServer
    let overlay: Overlay?
    let logger: Logger

    func run() async throws {
        try? await gracefulShutdown()
        logger.info("shutting down: draining connections")
        await server.shutdown()
        do { try overlay?.sync() } catch { logger.error("overlay sync failed: \(error)") }
    }
}
