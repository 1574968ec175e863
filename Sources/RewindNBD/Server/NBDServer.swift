import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// Where to listen: `HOST:PORT` for TCP, `unix:PATH` for a Unix socket (CLI.md's ADDR).
public enum ListenAddress: Sendable, CustomStringConvertible, Equatable {
    case tcp(host: String, port: Int)
    case unix(path: String)

    public init(parsing text: String, defaultPort: Int = NBD.defaultPort) throws {
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst(5))
            guard !path.isEmpty else { throw ListenAddressError.invalid(text) }
            self = .unix(path: path)
            return
        }
        var host = text, portText = String(defaultPort)
        if text.hasPrefix("[") , let close = text.firstIndex(of: "]") {  // [::1]:10809
            host = String(text[text.index(after: text.startIndex)..<close])
            let rest = text[text.index(after: close)...]
            if rest.hasPrefix(":") { portText = String(rest.dropFirst()) } else if !rest.isEmpty { throw ListenAddressError.invalid(text) }
        } else if let colon = text.lastIndex(of: ":") {
            host = String(text[..<colon]); portText = String(text[text.index(after: colon)...])
        }
        guard !host.isEmpty, let port = Int(portText), (0...65535).contains(port) else { throw ListenAddressError.invalid(text) }
        self = .tcp(host: host, port: port)
    }

    public var description: String {
        switch self {
        case let .tcp(host, port): host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
        case let .unix(path): "unix:\(path)"
        }
    }
}

public enum ListenAddressError: Error, CustomStringConvertible {
    case invalid(String)
    public var description: String {
        switch self { case let .invalid(t): "invalid address \"\(t)\": use HOST:PORT or unix:PATH" }
    }
}

/// Refuses connections beyond a limit, so idle or hostile clients cannot exhaust the server.
final class ConnectionLimiter: ChannelInboundHandler, Sendable {
    typealias InboundIn = Channel
    let maxConnections: Int
    let open = NIOLockedValueBox(0)
    let logger: Logger

    init(maxConnections: Int, logger: Logger) { self.maxConnections = maxConnections; self.logger = logger }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let child = unwrapInboundIn(data)
        let admitted = open.withLockedValue { n -> Bool in
            guard n < maxConnections else { return false }
            n += 1
            return true
        }
        guard admitted else {
            logger.warning("refusing a connection: \(maxConnections) are open already")
            child.close(promise: nil)
            return
        }
        child.closeFuture.whenComplete { [open] _ in open.withLockedValue { $0 -= 1 } }
        context.fireChannelRead(data)
    }
}

/// The NBD server: one export on any number of listeners.
public final class NBDServer: Sendable {
    public let export: NBDExport
    let group: EventLoopGroup
    let logger: Logger
    let observer: (any NBDObserver)?
    let maxConnections: Int
    /// Payload in flight across all connections (each connection also bounds its own).
    let budget = InflightBudget(limit: NBDConnectionHandler.maxInflightBytes)
    private let listeners = NIOLockedValueBox<[Channel]>([])
    private let connections = NIOLockedValueBox<[ObjectIdentifier: Channel]>([:])

    public init(export: NBDExport, group: EventLoopGroup, maxConnections: Int = 128, observer: (any NBDObserver)? = nil,
                logger: Logger) {
        self.export = export
        self.group = group
        self.maxConnections = maxConnections
        self.observer = observer
        self.logger = logger
    }

    /// Bind every address; returns the bound addresses (port 0 becomes the real port).
    public func start(_ addresses: [ListenAddress]) async throws -> [String] {
        let limiter = ConnectionLimiter(maxConnections: maxConnections, logger: logger)
        var bound: [String] = []
        for address in addresses {
            let bootstrap = ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: 256)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .serverChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(limiter) }
                }
                .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
                .childChannelOption(.maxMessagesPerRead, value: 16)
                .childChannelInitializer { [export, observer, logger, connections, budget] channel in
                    let id = ObjectIdentifier(channel)
                    connections.withLockedValue { $0[id] = channel }
                    channel.closeFuture.whenComplete { _ in _ = connections.withLockedValue { $0.removeValue(forKey: id) } }
                    var connLogger = logger
                    connLogger[metadataKey: "peer"] = "\(channel.remoteAddress?.description ?? "unix")"
                    return channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(
                            NBDConnectionHandler(export: export, observer: observer, logger: connLogger, budget: budget))
                    }
                }
            let channel: Channel
            switch address {
            case let .tcp(host, port):
                channel = try await bootstrap.bind(host: host, port: port).get()
            case let .unix(path):
                channel = try await bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).get()
            }
            listeners.withLockedValue { $0.append(channel) }
            switch address {
            case .tcp(let host, _): bound.append(ListenAddress.tcp(host: host, port: channel.localAddress?.port ?? 0).description)
            case .unix: bound.append(address.description)
            }
        }
        return bound
    }

    /// Stop accepting, then close every connection once its in-flight requests are answered
    /// (each handler finishes what it dispatched; closing the channel flushes the replies).
    public func shutdown(graceSeconds: Int64 = 10) async {
        let servers = listeners.withLockedValue { l -> [Channel] in let c = l; l.removeAll(); return c }
        for s in servers { try? await s.close() }
        let open = connections.withLockedValue { Array($0.values) }
        for c in open {
            c.eventLoop.execute { c.close(mode: .input, promise: nil) }
        }
        let deadline = NIODeadline.now() + .seconds(graceSeconds)
        while !connections.withLockedValue({ $0.isEmpty }) && NIODeadline.now() < deadline {
            try? await Task.sleep(nanoseconds: 20_000_000)
        }
        for c in connections.withLockedValue({ Array($0.values) }) { try? await c.close() }
    }
}
