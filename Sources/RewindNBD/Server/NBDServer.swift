import Glibc
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

/// Why a Unix socket path cannot be listened on; each message starts with the address, `unix:PATH`.
public enum ListenError: Error, CustomStringConvertible, Equatable {
    /// A server answers on the path: binding there would take its clients.
    case socketInUse(path: String)
    /// Something other than a socket is at the path; it is not ours to remove.
    case notASocket(path: String)
    /// `sockaddr_un` holds at most `UnixSocketPath.pathBytesMax` bytes of path.
    case pathTooLong(path: String, bytes: Int)
    case system(path: String, call: String, errno: Int32)

    public var description: String {
        switch self {
        case let .socketInUse(path): "unix:\(path): another server is listening on this socket"
        case let .notASocket(path): "unix:\(path): exists and is not a socket"
        case let .pathTooLong(path, bytes):
            "unix:\(path): the path is \(bytes) bytes, more than the \(UnixSocketPath.pathBytesMax) a Unix socket path may have"
        case let .system(path, call, errno): "unix:\(path): \(call): \(String(cString: strerror(errno)))"
        }
    }
}

/// A Unix socket this process bound, and the file `bind` created for it (`st_dev`, `st_ino`
/// and `st_ctim`, taken right after), so stopping removes the path only while it is still that
/// socket. The change time is there because file systems reuse a freed inode number at once
/// (ext4 gave a socket re-created at one path the same number here): a server whose path was
/// removed and bound again by another would otherwise remove the other's. A `chmod` of the
/// socket changes it too; the path is then left at stop, and the next start removes it as a
/// dead server's.
struct BoundUnixSocket: Sendable, Equatable {
    let path: String
    let device: UInt64
    let inode: UInt64
    let changeSeconds: Int64
    let changeNanoseconds: Int64

    init(path: String, _ st: stat) {
        self.path = path
        device = UInt64(st.st_dev)
        inode = UInt64(st.st_ino)
        changeSeconds = Int64(st.st_ctim.tv_sec)
        changeNanoseconds = Int64(st.st_ctim.tv_nsec)
    }
}

/// Claiming, binding and removing a Unix socket path without taking it from a live server.
///
/// NIO's `bind(unixDomainSocketPath:cleanupExistingSocketFile: true)` unlinks whatever socket
/// is at the path, a live server's included, and its channel unlinks the path again when it
/// closes — by then perhaps another server's socket. So the listener binds its own socket and
/// hands it to NIO (`withBoundSocket`, which never unlinks), and the path is:
/// - free when nothing is there, or a socket nobody answers on (`connect` → ECONNREFUSED: a
///   server that died without removing it), which is then removed;
/// - refused when `connect` succeeds (or the backlog is full: EAGAIN), or when it is not a socket;
/// - removed at stop only while `lstat` still shows the socket this process bound
///   (`BoundUnixSocket`).
/// Two servers starting at the same instant on one stale path can still race between the
/// probe and the unlink; one of them then fails to bind (EADDRINUSE) or loses its path.
enum UnixSocketPath {
    /// `sun_path` is 108 bytes, one of them the terminating NUL.
    static let pathBytesMax = MemoryLayout.size(ofValue: sockaddr_un().sun_path) - 1

    /// Make `path` free to bind: nothing there, or a dead server's socket, which is removed.
    static func claim(_ path: String) throws {
        var st = stat()
        guard lstat(path, &st) == 0 else {
            let e = errno
            if e == ENOENT { return }
            throw ListenError.system(path: path, call: "lstat", errno: e)
        }
        guard (st.st_mode & S_IFMT) == S_IFSOCK else { throw ListenError.notASocket(path: path) }
        var addr = try address(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0)
        guard fd >= 0 else { throw ListenError.system(path: path, call: "socket", errno: errno) }
        defer { Glibc.close(fd) }
        var r: Int32
        repeat {
            r = withUnsafePointer(to: &addr) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
        } while r != 0 && errno == EINTR
        if r == 0 { throw ListenError.socketInUse(path: path) }
        switch errno {
        case EAGAIN, EINPROGRESS: throw ListenError.socketInUse(path: path)  // listening, its backlog full
        case ENOENT: return  // removed meanwhile
        case ECONNREFUSED:
            // Nobody listens: remove it, unless it was replaced since the lstat.
            var now = stat()
            guard lstat(path, &now) == 0 else { return }
            guard now.st_dev == st.st_dev, now.st_ino == st.st_ino else { throw ListenError.socketInUse(path: path) }
            guard unlink(path) == 0 || errno == ENOENT else { throw ListenError.system(path: path, call: "unlink", errno: errno) }
        case let e: throw ListenError.system(path: path, call: "connect", errno: e)
        }
    }

    /// A listening socket bound at `path` (which `claim` made free), and what `bind` created there.
    static func bind(_ path: String, backlog: Int32) throws -> (fd: Int32, bound: BoundUnixSocket) {
        var addr = try address(path)
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw ListenError.system(path: path, call: "socket", errno: errno) }
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard r == 0 else {
            let e = errno
            Glibc.close(fd)
            // Someone bound it between the claim and here.
            if e == EADDRINUSE { throw ListenError.socketInUse(path: path) }
            throw ListenError.system(path: path, call: "bind", errno: e)
        }
        var st = stat()
        guard lstat(path, &st) == 0 else {
            let e = errno
            Glibc.close(fd)
            throw ListenError.system(path: path, call: "lstat", errno: e)
        }
        let bound = BoundUnixSocket(path: path, st)
        // Listen at once: until then a probe by another server starting would see ECONNREFUSED
        // and remove our socket as a dead one's.
        guard Glibc.listen(fd, backlog) == 0 else {
            let e = errno
            Glibc.close(fd)
            remove(bound)
            throw ListenError.system(path: path, call: "listen", errno: e)
        }
        return (fd, bound)
    }

    /// Unlink the path if it is still the socket this process bound; another's is left alone.
    static func remove(_ bound: BoundUnixSocket) {
        var st = stat()
        guard lstat(bound.path, &st) == 0, (st.st_mode & S_IFMT) == S_IFSOCK,
              BoundUnixSocket(path: bound.path, st) == bound else { return }
        unlink(bound.path)
    }

    static func address(_ path: String) throws -> sockaddr_un {
        let bytes = Array(path.utf8)
        guard bytes.count <= pathBytesMax else { throw ListenError.pathTooLong(path: path, bytes: bytes.count) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: bytes) }
        return addr
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

/// The NBD server: a catalog of exports on any number of listeners.
public final class NBDServer: Sendable {
    public let catalog: any NBDExportCatalog
    let group: EventLoopGroup
    let logger: Logger
    let observer: (any NBDObserver)?
    let maxConnections: Int
    /// Payload in flight across all connections (each connection also bounds its own).
    let budget = InflightBudget(limit: NBDConnectionHandler.maxInflightBytes)
    private let listeners = NIOLockedValueBox<[Channel]>([])
    /// Unix socket paths this server bound, removed when it stops (if still its own).
    private let unixSockets = NIOLockedValueBox<[BoundUnixSocket]>([])
    /// Pending connections per listener (`listen(2)`'s backlog).
    static let backlog: Int32 = 256
    private let connections = NIOLockedValueBox<[ObjectIdentifier: Channel]>([:])

    public convenience init(export: NBDExport, group: EventLoopGroup, maxConnections: Int = 128,
                            observer: (any NBDObserver)? = nil, logger: Logger) {
        self.init(catalog: SingleExportCatalog(export), group: group, maxConnections: maxConnections, observer: observer,
                  logger: logger)
    }

    public init(catalog: any NBDExportCatalog, group: EventLoopGroup, maxConnections: Int = 128,
                observer: (any NBDObserver)? = nil, logger: Logger) {
        self.catalog = catalog
        self.group = group
        self.maxConnections = maxConnections
        self.observer = observer
        self.logger = logger
    }

    /// Refuse before any work is done what `start` would refuse: a Unix socket path a live
    /// server answers on, or that holds something other than a socket. A dead server's socket
    /// is removed. Throws `ListenError`.
    public static func checkUnixSocketPaths(_ addresses: [ListenAddress]) throws {
        for case let .unix(path) in addresses { try UnixSocketPath.claim(path) }
    }

    /// Bind every address; returns the bound addresses (port 0 becomes the real port). A Unix
    /// socket path a live server answers on, or that is not a socket, throws `ListenError`
    /// (see `UnixSocketPath`). On any failure the listeners already bound are closed again.
    public func start(_ addresses: [ListenAddress]) async throws -> [String] {
        do {
            return try await bindAll(addresses)
        } catch {
            await closeListeners()
            throw error
        }
    }

    private func bindAll(_ addresses: [ListenAddress]) async throws -> [String] {
        let limiter = ConnectionLimiter(maxConnections: maxConnections, logger: logger)
        var bound: [String] = []
        for address in addresses {
            let bootstrap = ServerBootstrap(group: group)
                .serverChannelOption(.backlog, value: Self.backlog)
                .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
                .serverChannelInitializer { channel in
                    channel.eventLoop.makeCompletedFuture { try channel.pipeline.syncOperations.addHandler(limiter) }
                }
                .childChannelOption(.socketOption(.tcp_nodelay), value: 1)
                .childChannelOption(.maxMessagesPerRead, value: 16)
                .childChannelInitializer { [catalog, observer, logger, connections, budget] channel in
                    let id = ObjectIdentifier(channel)
                    connections.withLockedValue { $0[id] = channel }
                    channel.closeFuture.whenComplete { _ in _ = connections.withLockedValue { $0.removeValue(forKey: id) } }
                    var connLogger = logger
                    connLogger[metadataKey: "peer"] = "\(channel.remoteAddress?.description ?? "unix")"
                    return channel.eventLoop.makeCompletedFuture {
                        try channel.pipeline.syncOperations.addHandler(
                            NBDConnectionHandler(catalog: catalog, observer: observer, logger: connLogger, budget: budget))
                    }
                }
            let channel: Channel
            switch address {
            case let .tcp(host, port):
                channel = try await bootstrap.bind(host: host, port: port).get()
            case let .unix(path):
                // Our own socket, handed to NIO, which then never unlinks the path (see
                // `UnixSocketPath`). NIO listens on it again with its default backlog (128).
                try UnixSocketPath.claim(path)
                let (fd, socket) = try UnixSocketPath.bind(path, backlog: Self.backlog)
                unixSockets.withLockedValue { $0.append(socket) }
                channel = try await bootstrap.withBoundSocket(fd).get()
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
        await closeListeners()
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

    /// Stop accepting: close every listener, then remove the Unix socket paths this server
    /// bound, each only while it is still the socket bound here.
    private func closeListeners() async {
        let servers = listeners.withLockedValue { l -> [Channel] in let c = l; l.removeAll(); return c }
        for s in servers { try? await s.close() }
        let sockets = unixSockets.withLockedValue { u -> [BoundUnixSocket] in let c = u; u.removeAll(); return c }
        for socket in sockets { UnixSocketPath.remove(socket) }
    }
}
