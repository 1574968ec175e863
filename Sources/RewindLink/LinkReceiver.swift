import Foundation
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import NIOSSL
import NIOTLS
import RewindCore

/// A unit's receiving end (`rewind receive`): accepts, over mutual TLS, streams of one volume
/// from the units whose IDs it was given, into one mirror — seeded over the link when it does
/// not exist yet. Each connection's frames go, in order, to one applier thread that owns the
/// mirror's writer: a hello is admitted (`LinkAdmission`) before anything is written, records
/// are checked and appended under the origin's seqs, and every batch is made durable before
/// its ack. A newer connection replaces an older one; frames of a replaced connection are
/// dropped, so a resumed stream never appends a record twice.
public final class LinkReceiver: @unchecked Sendable {
    let path: String
    let allowed: Set<String>
    let context: NIOSSLContext
    let group: EventLoopGroup
    let logger: Logger
    let applier: LinkApplier
    private var serverChannel: Channel?

    /// `onMirror`: called (on the applier thread) once the mirror exists — at start, or when a
    /// seed completes — to start what forwards it (`--replicate-to`).
    /// `forwards`: the mirror is streamed on (`--replicate-to`), so its log stays in the page
    /// cache for the senders that read it back.
    public init(path: String, allowed: Set<String>, identity: UnitIdentity, group: EventLoopGroup, logger: Logger,
                forwards: Bool = false, rejoin: Bool = false, staleCopy: String? = nil,
                onMirror: @escaping @Sendable (Mirror) -> Void) throws {
        self.path = path
        self.allowed = allowed
        self.context = try LinkTLS.serverContext(identity)
        self.group = group
        self.logger = logger
        applier = try LinkApplier(path: path, logOutOfCache: !forwards, rejoin: rejoin, staleCopy: staleCopy, logger: logger, onMirror: onMirror)
    }

    /// Listen on `host:port`; returns the bound address.
    public func start(host: String, port: Int) async throws -> SocketAddress {
        applier.start()
        let context = self.context, allowed = self.allowed, applier = self.applier, logger = self.logger
        let channel = try await ServerBootstrap(group: group)
            .serverChannelOption(.backlog, value: 64)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let seen = PresentedIdentity()
                    let connection = LinkConnection(channel: channel, seen: seen)
                    applier.register(connection)
                    try channel.pipeline.syncOperations.addHandlers([
                        NIOSSLServerHandler(context: context, customVerificationCallback: LinkTLS.verifier(allowed: allowed, seen: seen)),
                        IdleStateHandler(readTimeout: .seconds(Int64(LinkTiming.silenceSeconds))),
                        ByteToMessageHandler(LinkFrameDecoder()),
                        MessageToByteHandler(LinkFrameEncoder()),
                        LinkReceiverHandler(connection: connection, applier: applier, logger: logger),
                    ])
                }
            }
            .bind(host: host, port: port).get()
        serverChannel = channel
        guard let address = channel.localAddress else { throw LinkError("no local address after binding \(host):\(port)") }
        return address
    }

    /// Stop accepting, close every connection and finish the batch being applied.
    public func stop() async {
        try? await serverChannel?.close()
        applier.stop()
    }

    /// The mirror, once it exists.
    public var mirror: Mirror? { applier.currentMirror }
}

/// One accepted connection.
final class LinkConnection: @unchecked Sendable {
    let channel: Channel
    let seen: PresentedIdentity
    let remote: String
    private let lock = NIOLock()
    private var _hello = false
    private var _inspector: LinkInspector?

    init(channel: Channel, seen: PresentedIdentity) {
        self.channel = channel
        self.seen = seen
        remote = channel.remoteAddress.map { "\($0.ipAddress ?? "?"):\($0.port ?? 0)" } ?? "?"
    }

    var peerID: String { if case let .some(.some(id)) = seen.id { id } else { "?" } }
    var shortPeer: String { "\(peerID.prefix(16))… (\(remote))" }
    var sawHello: Bool {
        get { lock.withLock { _hello } }
        set { lock.withLock { _hello = newValue } }
    }

    /// Set when the connection opened with `inspect`: its frames go there, not to the applier.
    var inspector: LinkInspector? {
        get { lock.withLock { _inspector } }
        set { lock.withLock { _inspector = newValue } }
    }

    /// Send `refuse` with `why`, then close.
    func refuse(_ why: String) {
        channel.writeAndFlush(LinkRefusal(why).frame).whenComplete { [channel] _ in channel.close(promise: nil) }
    }
}

/// A connection's frames to the applier; keep-alives answered here.
final class LinkReceiverHandler: ChannelInboundHandler {
    typealias InboundIn = LinkFrame
    typealias OutboundOut = LinkFrame
    let connection: LinkConnection
    let applier: LinkApplier
    let logger: Logger

    init(connection: LinkConnection, applier: LinkApplier, logger: Logger) {
        self.connection = connection
        self.applier = applier
        self.logger = logger
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        let frame = unwrapInboundIn(data)
        if frame.kind == .keepalive {
            context.writeAndFlush(wrapOutboundOut(LinkFrame(.keepalive)), promise: nil)
            return
        }
        if let inspector = connection.inspector {
            inspector.inbox.push(frame)
            return
        }
        if !connection.sawHello && frame.kind == .inspect {
            // A comparison (`rewind verify --peer`), not a stream: answered beside the applier.
            let inspector = LinkInspector(connection: connection, mirror: { [applier] in applier.currentMirror }, logger: logger)
            connection.inspector = inspector
            inspector.inbox.push(frame)
            inspector.start()
            return
        }
        if !connection.sawHello {
            guard frame.kind == .hello else {
                logger.error("link from \(connection.shortPeer): refused: a \(frame.kind) frame before hello")
                connection.refuse("a \(frame.kind) frame before hello")
                return
            }
            connection.sawHello = true
        } else if frame.kind == .hello {
            logger.error("link from \(connection.shortPeer): refused: a second hello")
            connection.refuse("a second hello on one connection")
            return
        }
        applier.enqueue(.frame(connection, frame))
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? TLSUserEvent, case .handshakeCompleted = e {
            logger.info("link from \(connection.shortPeer): connected")
        }
        if let e = event as? IdleStateHandler.IdleStateEvent, e == .read {
            logger.warning("link from \(connection.shortPeer): nothing heard for \(LinkTiming.silenceSeconds) s; closing")
            context.close(promise: nil)
        }
        context.fireUserInboundEventTriggered(event)
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        if connection.sawHello {
            logger.warning("link from \(connection.shortPeer): \(LinkError.describe(error, seen: connection.seen, expected: nil)); closing")
        } else {
            // Refused before anything was written: a stranger, a wrong identity, garbage. A
            // sender retrying every few seconds gets one line a minute, not one per attempt.
            let why = LinkError.describe(error, seen: connection.seen, expected: nil)
            let host = connection.remote.split(separator: ":").dropLast().joined(separator: ":")
            if applier.shouldLog(refusal: host + " " + why) {
                logger.error("refused a link from \(connection.remote): \(why)")
            } else {
                logger.debug("refused a link from \(connection.remote): \(why)")
            }
        }
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        connection.inspector?.inbox.close("the connection closed")
        applier.enqueue(.closed(connection))
        context.fireChannelInactive()
    }
}
