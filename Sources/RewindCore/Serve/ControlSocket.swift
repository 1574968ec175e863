import Foundation
import Glibc
import Synchronization

/// The running server's control socket, `MIRROR/control.sock`: how `bookmark`, `timeline`,
/// `restore` and `export` ask a live `serve` for its durable point, which the index they read
/// may not hold yet (the index thread commits up to a second behind the log).
///
/// One request per connection, one line each way:
/// ```
/// → durable
/// ← ok FLUSHED APPENDED        the newest FLUSH answered; the last record appended
/// ← error MESSAGE
/// ```
/// The server answers `durable` only once the index holds every record up to FLUSHED, so the
/// asker reads that point from the index like any other. Only the mirror's owner (it holds
/// `owner.lock`) listens, so a socket left by a dead server is removed and bound again. The
/// socket's permissions follow the mirror directory's. A mirror path too long for a Unix
/// socket (107 bytes) uses the abstract name `rewind-control-UUID` instead.
public enum ControlSocket {
    /// The socket's address and its length: a path's is the whole struct, an abstract
    /// name's exact (it has no terminating NUL).
    static func address(for mirror: Mirror) -> (sockaddr_un, socklen_t) {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let path = Array((mirror.path + "/control.sock").utf8)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        let abstract = path.count >= capacity
        let bytes = abstract ? [0] + Array("rewind-control-\(formatUUID(mirror.uuid))".utf8) : path
        withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: bytes) }
        let length = abstract ? MemoryLayout<sa_family_t>.size + bytes.count : MemoryLayout<sockaddr_un>.size
        return (addr, socklen_t(length))
    }

    /// What the server answered to `durable`.
    public struct DurablePoint: Sendable, Equatable {
        public var flushed: UInt64
        public var appended: UInt64
    }

    /// Ask the server that owns `mirror`, if one runs, for its durable point (the index then
    /// holds it). nil when no server listens. Throws when one listens but fails to answer.
    public static func askDurable(_ mirror: Mirror, timeoutSeconds: Int = 60) throws -> DurablePoint? {
        let (target, length) = address(for: mirror)
        var addr = target
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw RewindError.io(path: mirror.path + "/control.sock", operation: "socket", errno: errno) }
        defer { close(fd) }
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, length) }
        }
        guard r == 0 else { return nil }  // ENOENT, ECONNREFUSED: nobody serves the mirror
        var tv = timeval(tv_sec: timeoutSeconds, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        let request = Array("durable\n".utf8)
        guard send(fd, request, request.count, Int32(MSG_NOSIGNAL)) == request.count else {
            throw RewindError.invalidArgument("the server of \(mirror.path) closed its control socket")
        }
        let line = readLine(fd)
        let words = line.split(separator: " ")
        if words.first == "ok", words.count == 3, let f = UInt64(words[1]), let a = UInt64(words[2]) {
            return DurablePoint(flushed: f, appended: a)
        }
        if line.hasPrefix("error ") { throw RewindError.invalidArgument("the server of \(mirror.path): \(line.dropFirst(6))") }
        throw RewindError.invalidArgument("the server of \(mirror.path) gave no durable point (\(line.isEmpty ? "no answer" : "answer \"\(line.prefix(80))\""))")
    }

    /// One line (without its newline), at most 4 KiB, or what came before EOF or the timeout.
    static func readLine(_ fd: Int32) -> String {
        var bytes: [UInt8] = []
        var c: UInt8 = 0
        while bytes.count < 4096 {
            let n = recv(fd, &c, 1, 0)
            if n < 0 && errno == EINTR { continue }
            guard n == 1, c != 10 else { break }
            bytes.append(c)
        }
        return String(decoding: bytes, as: UTF8.self)
    }
}

/// The server side: a thread answering one request at a time (they are rare and short).
public final class ControlServer: @unchecked Sendable {
    private let fd: Int32
    private let path: String?
    private let answer: @Sendable (String) -> String
    private let stopping = Mutex(false)
    private var thread: Thread?

    /// Bind the control socket of `mirror`, whose `owner.lock` the caller holds. `answer`
    /// maps a request line to the reply line.
    public init(mirror: Mirror, answer: @escaping @Sendable (String) -> String) throws {
        let (target, length) = ControlSocket.address(for: mirror)
        var addr = target
        let abstract = withUnsafeBytes(of: addr.sun_path) { $0[0] == 0 }
        path = abstract ? nil : mirror.path + "/control.sock"
        if let path { unlink(path) }  // a dead server's: the owner lock says no live one listens
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { throw RewindError.io(path: mirror.path + "/control.sock", operation: "socket", errno: errno) }
        let r = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, length) }
        }
        guard r == 0, listen(fd, 16) == 0 else {
            let e = errno
            close(fd)
            throw RewindError.io(path: mirror.path + "/control.sock", operation: "bind", errno: e)
        }
        self.fd = fd
        self.answer = answer
        let thread = Thread { [self] in run() }
        thread.name = "rewind-control"
        self.thread = thread
        thread.start()
    }

    private func run() {
        while !stopping.withLock({ $0 }) {
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            guard poll(&p, 1, 200) > 0 else { continue }
            let client = accept(fd, nil, nil)
            guard client >= 0 else { continue }
            var tv = timeval(tv_sec: 2, tv_usec: 0)  // a silent client holds the others up this long at most
            setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            setsockopt(client, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            let reply = Array((answer(ControlSocket.readLine(client)) + "\n").utf8)
            _ = send(client, reply, reply.count, Int32(MSG_NOSIGNAL))
            close(client)
        }
    }

    /// Stop answering and remove the socket.
    public func stop() {
        let first = stopping.withLock { s -> Bool in defer { s = true }; return !s }
        guard first else { return }
        if let path { unlink(path) }
        while thread?.isFinished == false { usleep(10_000) }
        close(fd)
    }
}
