import Glibc
import NIOCore
import NIOPosix

/// A connection to an NBD server — tap's upstream, `verify --against` — speaking the same
/// protocol types as the server side (`NBDRequestHeader`, the reply encoders' layouts). The
/// handshake is `NBDClientHandshake`; then requests go out as they are made, many in flight,
/// each matched to its reply by cookie (`NBDClientHandler`). Whatever the server sends is
/// checked: a reply to no request, a chunk outside its READ, a bad magic close the connection
/// and fail every request in flight, as does the connection dropping.
public final class NBDClient: Sendable {
    public let info: NBDExportInfo
    public let uri: NBDURI
    let channel: Channel
    /// A flush of the channel is queued on its loop (`send`).
    private let flushQueued: NIOLoopBoundBox<Bool>

    init(info: NBDExportInfo, uri: NBDURI, channel: Channel) {
        self.info = info
        self.uri = uri
        self.channel = channel
        flushQueued = NIOLoopBoundBox(false, eventLoop: channel.eventLoop)
    }

    /// Makes the TLS client handler for an `nbds` URI (on the connection's loop). RewindNBD
    /// has no TLS library of its own: the caller brings one (RewindDaemon's `NBDClientTLS`).
    public typealias TLSHandlerFactory = @Sendable () throws -> any ChannelHandler

    /// Connect to `uri` and negotiate its export (at most `timeout` for both). An `nbds` URI
    /// needs `tls`: NBD_OPT_STARTTLS first, then the handshake over TLS.
    public static func connect(_ uri: NBDURI, group: EventLoopGroup, timeout: TimeAmount = .seconds(10),
                               tls: TLSHandlerFactory? = nil) -> EventLoopFuture<NBDClient> {
        let loop = group.next()
        guard !uri.tls || tls != nil else {
            return loop.makeFailedFuture(NBDClientError.unsupported("\(uri): TLS is not available here"))
        }
        let makeTLS = uri.tls ? tls : nil
        let ready = loop.makePromise(of: NBDExportInfo.self)
        let bootstrap = ClientBootstrap(group: loop)
            .connectTimeout(timeout)
            .channelOption(.socketOption(.so_keepalive), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(NBDClientHandshakeHandler(exportName: uri.exportName, ready: ready, makeTLS: makeTLS))
                }
            }
        let connected: EventLoopFuture<Channel>
        switch uri.transport {
        case let .tcp(host, port):
            connected = bootstrap.channelOption(.socketOption(.tcp_nodelay), value: 1).connect(host: host, port: port)
        case let .unix(path):
            connected = bootstrap.connect(unixDomainSocketPath: path)
        }
        let deadline = loop.scheduleTask(in: timeout) { ready.fail(NBDClientError.closed("no NBD handshake from \(uri) within \(timeout.nanoseconds / 1_000_000_000) s")) }
        connected.whenFailure { ready.fail($0) }  // no channel: the handshake never begins
        ready.futureResult.whenComplete { _ in deadline.cancel() }
        return connected.flatMap { channel in
            ready.futureResult.map { info in
                NBDClient(info: info, uri: uri, channel: channel)
            }.flatMapErrorThrowing { error in
                channel.close(promise: nil)
                throw error
            }
        }.flatMapErrorThrowing { error in
            if error is NBDHandshakeError || error is NBDClientError { throw error }
            let place = switch uri.transport {
            case let .tcp(host, port): host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
            case let .unix(path): "the socket \(path)"
            }
            throw NBDClientError.unreachable("cannot connect to \(place): \(Self.reason(error))")
        }
    }

    private func send(_ command: NBDCommand, flags: NBDCommandFlags = [], offset: UInt64 = 0, length: UInt32 = 0,
                      payload: ByteBuffer? = nil) -> EventLoopFuture<NBDClientResult> {
        let loop = channel.eventLoop
        let promise = loop.makePromise(of: NBDClientResult.self)
        let request = NBDClientRequest(command: command, flags: flags, offset: offset, length: length, payload: payload, promise: promise)
        if loop.inEventLoop { enqueue(request, promise) } else { loop.execute { self.enqueue(request, promise) } }
        return promise.futureResult
    }

    /// Write the request, and flush once for every request written in this turn of the loop:
    /// a burst of requests (a host's queue depth, read from one socket read) goes out in one
    /// `writev`, and the server wakes once for it.
    private func enqueue(_ request: NBDClientRequest, _ promise: EventLoopPromise<NBDClientResult>) {
        channel.write(request).cascadeFailure(to: promise)
        guard !flushQueued.value else { return }
        flushQueued.value = true
        channel.eventLoop.execute { [channel, flushQueued] in
            flushQueued.value = false
            channel.flush()
        }
    }

    /// `length` bytes at `offset`; holes come back as zeros.
    public func read(offset: UInt64, length: UInt32) -> EventLoopFuture<ByteBuffer> {
        send(.read, offset: offset, length: length).map { $0.data ?? ByteBuffer() }
    }

    public func write(offset: UInt64, data: ByteBuffer, fua: Bool = false) -> EventLoopFuture<Void> {
        send(.write, flags: fua ? .fua : [], offset: offset, length: UInt32(data.readableBytes), payload: data).map { _ in }
    }

    public func writeZeroes(offset: UInt64, length: UInt32, fua: Bool = false, noHole: Bool = false, fastZero: Bool = false) -> EventLoopFuture<Void> {
        var flags: NBDCommandFlags = fua ? .fua : []
        if noHole { flags.insert(.noHole) }
        if fastZero { flags.insert(.fastZero) }
        return send(.writeZeroes, flags: flags, offset: offset, length: length).map { _ in }
    }

    public func trim(offset: UInt64, length: UInt32, fua: Bool = false) -> EventLoopFuture<Void> {
        send(.trim, flags: fua ? .fua : [], offset: offset, length: length).map { _ in }
    }

    public func flush() -> EventLoopFuture<Void> { send(.flush).map { _ in } }

    public func cache(offset: UInt64, length: UInt32) -> EventLoopFuture<Void> {
        send(.cache, offset: offset, length: length).map { _ in }
    }

    /// `base:allocation` from `offset` (at most `length` bytes described; at least one extent).
    public func blockStatus(offset: UInt64, length: UInt32) -> EventLoopFuture<[AllocationExtent]> {
        guard info.baseAllocationID != nil else {
            return channel.eventLoop.makeFailedFuture(NBDClientError.unsupported("\(uri) offers no base:allocation"))
        }
        return send(.blockStatus, offset: offset, length: length).map { $0.extents }
    }

    /// The system's words for a failed connect (NIO wraps them).
    static func reason(_ error: Error) -> String {
        var e: Error = error
        if let c = e as? NIOConnectionError, let first = c.connectionErrors.first { e = first.error }
        if let io = e as? IOError { return String(cString: strerror(io.errnoCode)) }
        if e is ChannelError, case ChannelError.connectTimeout = e { return "no answer (timed out)" }
        return "\(e)"
    }

    /// NBD_CMD_DISC once the requests in flight are answered (later requests are refused),
    /// then close.
    public func close() -> EventLoopFuture<Void> {
        let request = NBDClientRequest(command: .disconnect, flags: [], offset: 0, length: 0, payload: nil, promise: nil)
        return channel.writeAndFlush(request).flatMap { self.channel.close() }.recover { _ in }
    }

    /// The loop the connection runs on (its futures complete there).
    public var eventLoop: EventLoop { channel.eventLoop }

    /// Completes when the connection closes, for whatever reason.
    public var closeFuture: EventLoopFuture<Void> { channel.closeFuture }
}

public enum NBDClientError: Error, CustomStringConvertible, Equatable {
    /// The server answered the request with this NBD errno (and message, if it sent one).
    case server(errno: UInt32, message: String)
    /// The server broke the protocol: the connection is closed.
    case protocolViolation(String)
    case closed(String)
    case unreachable(String)
    case unsupported(String)

    public var description: String {
        switch self {
        case let .server(errno, message):
            let name = NBDErrno(rawValue: errno).map { "\($0)".uppercased() } ?? "errno \(errno)"
            return message.isEmpty ? "the server answered E\(name)" : "the server answered E\(name): \(message)"
        case let .protocolViolation(why): return "the server broke the NBD protocol: \(why)"
        case let .closed(why): return "the NBD connection closed: \(why)"
        case let .unreachable(why): return why
        case let .unsupported(why): return why
        }
    }

    /// The errno to pass on to a host (a broken or lost upstream is an I/O error).
    public var errno: NBDErrno {
        if case let .server(e, _) = self { return NBDErrno(rawValue: e) ?? .io }
        return .io
    }
}

/// A request on its way to the handler (which gives it a cookie).
struct NBDClientRequest {
    var command: NBDCommand
    var flags: NBDCommandFlags
    var offset: UInt64
    var length: UInt32
    var payload: ByteBuffer?
    var promise: EventLoopPromise<NBDClientResult>?
}

/// What a request's reply carried.
struct NBDClientResult: Sendable {
    var data: ByteBuffer?
    var extents: [AllocationExtent] = []
}
