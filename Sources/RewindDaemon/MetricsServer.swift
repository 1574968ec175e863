import Logging
import NIOCore
import NIOHTTP1
import NIOPosix
import Prometheus
import RewindNBD

/// Serves `GET /metrics` in the Prometheus text format on `--metrics ADDR`.
final class MetricsHTTPHandler: ChannelInboundHandler, Sendable {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart
    let registry: PrometheusCollectorRegistry

    init(registry: PrometheusCollectorRegistry) { self.registry = registry }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard case .head(let head) = unwrapInboundIn(data) else { return }
        let found = head.uri == "/metrics" || head.uri.hasPrefix("/metrics?")
        var body = context.channel.allocator.buffer(capacity: 4096)
        if found { body.writeBytes(registry.emitToBuffer()) } else { body.writeString("not found: try /metrics\n") }
        var headers = HTTPHeaders()
        headers.add(name: "Content-Type", value: found ? "text/plain; version=0.0.4" : "text/plain")
        headers.add(name: "Content-Length", value: String(body.readableBytes))
        headers.add(name: "Connection", value: "close")
        context.write(wrapOutboundOut(.head(HTTPResponseHead(version: head.version, status: found ? .ok : .notFound, headers: headers))), promise: nil)
        context.write(wrapOutboundOut(.body(.byteBuffer(body))), promise: nil)
        let channel = context.channel  // Sendable, unlike the context, for the completion
        context.writeAndFlush(wrapOutboundOut(.end(nil))).whenComplete { _ in channel.close(promise: nil) }
    }
}

/// Bind the metrics endpoint; returns the listening channel.
func startMetricsServer(_ address: ListenAddress, registry: PrometheusCollectorRegistry, group: EventLoopGroup) async throws -> Channel {
    let bootstrap = ServerBootstrap(group: group)
        .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
        .childChannelInitializer { channel in
            channel.pipeline.configureHTTPServerPipeline().flatMap {
                channel.pipeline.addHandler(MetricsHTTPHandler(registry: registry))
            }
        }
    switch address {
    case let .tcp(host, port): return try await bootstrap.bind(host: host, port: port).get()
    case let .unix(path): return try await bootstrap.bind(unixDomainSocketPath: path, cleanupExistingSocketFile: true).get()
    }
}
