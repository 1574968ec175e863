import Foundation
import Logging
import NIOCore
import NIOEmbedded
import NIOPosix
import NIOTestUtils
import Testing
@testable import RewindNBD

/// The NBD client (tap's upstream connection): URIs, the reply decoder, the handshake, and
/// requests against this project's own server and against real peers (nbdkit, qemu-nbd).
@Suite struct NBDClientTests {
    @Test func urisParseAsQemuAndNbdkitWriteThem() throws {
        let cases: [(String, NBDURI.Transport, String, Bool)] = [
            ("nbd://example.org/vol", .tcp(host: "example.org", port: 10809), "vol", false),
            ("nbd://10.0.0.2:10810", .tcp(host: "10.0.0.2", port: 10810), "", false),
            ("nbd://[::1]:7000/a%20b", .tcp(host: "::1", port: 7000), "a b", false),
            ("nbds://h/x", .tcp(host: "h", port: 10809), "x", true),
            ("nbd+unix:///disk?socket=/run/nbd.sock", .unix(path: "/run/nbd.sock"), "disk", false),
            ("nbd+unix://?socket=%2Ftmp%2Fs", .unix(path: "/tmp/s"), "", false),
            ("nbds+unix:///?socket=/s", .unix(path: "/s"), "", true),
        ]
        for (text, transport, name, tls) in cases {
            let u = try NBDURI(text)
            #expect(u.transport == transport && u.exportName == name && u.tls == tls, "\(text)")
        }
        let bad: [(String, String)] = [
            ("/dev/nbd0", "/dev/nbd0: not an NBD URI (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)"),
            ("http://h/x", "http://h/x: the scheme http is not one of nbd, nbds, nbd+unix, nbds+unix"),
            ("nbd:///x", "nbd:///x: it names no host"),
            ("nbd://h:0/x", "nbd://h:0/x: its port is not a number from 1 to 65535"),
            ("nbd://h:99999", "nbd://h:99999: its port is not a number from 1 to 65535"),
            ("nbd://[::1/x", "nbd://[::1/x: its IPv6 address has no closing ]"),
            ("nbd://h/%zz", "nbd://h/%zz: its export name has a bad %-escape"),
            ("nbd+unix:///x", "nbd+unix:///x: it names no socket (…?socket=PATH)"),
            ("nbd+unix://h/x?socket=/s", "nbd+unix://h/x?socket=/s: an nbd+unix URI names no host (nbd+unix:///EXPORT?socket=PATH)"),
            ("nbd://h/x?socket=/s", "nbd://h/x?socket=/s: socket= belongs to nbd+unix:// URIs"),
        ]
        for (text, message) in bad {
            #expect(throws: NBDURIError(text, String(message.dropFirst(text.count + 2)))) { try NBDURI(text) }
        }
    }

    /// The reply decoder, byte by byte and whole (SwiftNIO's verifier), including a simple
    /// READ reply whose length only the client knows.
    @Test func theReplyDecoderDecodesEveryWayTheBytesArrive() throws {
        func simple(_ cookie: UInt64, _ error: UInt32, _ data: [UInt8] = []) -> ByteBuffer {
            var b = ByteBuffer(); b.writeSimpleReply(cookie: cookie, error: error); b.writeBytes(data); return b
        }
        func chunk(_ cookie: UInt64, _ type: NBDChunkType, done: Bool, _ payload: [UInt8]) -> ByteBuffer {
            var b = ByteBuffer(); b.writeChunkHeader(cookie: cookie, type: type, done: done, length: payload.count); b.writeBytes(payload); return b
        }
        let data = (0..<300).map { UInt8(truncatingIfNeeded: $0 * 7) }
        let offsetData = [UInt8](repeating: 0, count: 7) + [9] + data
        let pairs: [(ByteBuffer, [NBDReply])] = [
            (simple(1, 0), [.simple(cookie: 1, error: 0, data: nil)]),
            (simple(7, 0, data), [.simple(cookie: 7, error: 0, data: ByteBuffer(bytes: data))]),
            (simple(7, 5), [.simple(cookie: 7, error: 5, data: nil)]),
            (chunk(3, .offsetData, done: false, offsetData) , [.chunk(NBDReplyChunk(cookie: 3, done: false, type: 1, payload: ByteBuffer(bytes: offsetData)))]),
            (chunk(3, .none, done: true, []), [.chunk(NBDReplyChunk(cookie: 3, done: true, type: 0, payload: ByteBuffer()))]),
        ]
        try ByteToMessageDecoderVerifier.verifyDecoder(inputOutputPairs: pairs) {
            NBDReplyDecoder(readLength: { $0 == 7 ? 300 : nil })
        }
    }

    @Test func aLyingServerIsRefusedNotBuffered() throws {
        var b = ByteBuffer()
        b.writeInteger(UInt32(0xdead_beef))
        b.writeRepeatingByte(0, count: 20)
        #expect(throws: NBDReplyError.badMagic(0xdead_beef)) { _ = try NBDReplyDecoder.next(from: &b, readLength: { _ in nil }) }
        var long = ByteBuffer()
        long.writeChunkHeader(cookie: 4, type: .offsetData, done: true, length: NBDReplyDecoder.maxChunkBytes + 1)
        #expect(throws: NBDReplyError.chunkTooLong(cookie: 4, length: UInt32(NBDReplyDecoder.maxChunkBytes + 1))) {
            _ = try NBDReplyDecoder.next(from: &long, readLength: { _ in nil })
        }
    }

    /// The handshake against this project's server, driven by `NBDConnectionHandler`'s own
    /// bytes, then every request kind over a Unix socket.
    @Test func requestsAgainstRewindsOwnServer() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("nbd-client-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let target = MemoryTarget(size: 1 << 20)
        let server = NBDServer(catalog: SingleExportCatalog(NBDExport(name: "vol", description: "test", target: target)), group: group,
                               logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }))
        _ = try await server.start([.unix(path: dir + "/s")])
        let client = try await NBDClient.connect(try NBDURI("nbd+unix:///vol?socket=\(dir)/s"), group: group).get()
        #expect(client.info.size == 1 << 20)
        #expect(client.info.structuredReplies && client.info.baseAllocationID != nil)
        #expect(client.info.flags.contains(.sendFlush) && client.info.flags.contains(.sendTrim) && !client.info.flags.contains(.readOnly))
        #expect(client.info.blockSizes?.minimum == 1 && client.info.blockSizes?.maximum == UInt32(NBD.maxPayloadBytes))
        let pattern = (0..<8192).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 5) }
        // Many in flight at once, answered by cookie.
        try await EventLoopFuture.andAllSucceed((0..<16).map { i in
            client.write(offset: UInt64(i) * 8192, data: ByteBuffer(bytes: pattern), fua: i % 2 == 0)
        }, on: group.next()).get()
        for i in [0, 7, 15] {
            #expect(Array(buffer: try await client.read(offset: UInt64(i) * 8192, length: 8192).get()) == pattern)
        }
        try await client.writeZeroes(offset: 100, length: 50).get()
        try await client.trim(offset: 8192, length: 4096).get()
        try await client.flush().get()
        try await client.cache(offset: 0, length: 4096).get()
        let head = Array(buffer: try await client.read(offset: 0, length: 200).get())
        #expect(head == Array(pattern[0..<100]) + [UInt8](repeating: 0, count: 50) + Array(pattern[150..<200]))
        #expect(Array(target.bytes[8192..<12288]) == [UInt8](repeating: 0, count: 4096))
        #expect(try await client.blockStatus(offset: 0, length: 65536).get() == [AllocationExtent(length: 65536, flags: [])])
        // Out of range: the server's errno comes back, and the connection goes on.
        await #expect(throws: NBDClientError.server(errno: NBDErrno.nospc.rawValue, message: "")) {
            try await client.write(offset: (1 << 20) - 10, data: ByteBuffer(bytes: pattern)).get()
        }
        await #expect(throws: NBDClientError.server(errno: NBDErrno.inval.rawValue, message: "invalid request")) {
            _ = try await client.read(offset: 1 << 20, length: 4096).get()
        }
        #expect(Array(buffer: try await client.read(offset: 0, length: 100).get()) == Array(pattern[0..<100]))
        try await client.close().get()
        // An export that is not there: the server's own words.
        await #expect(throws: NBDHandshakeError.self) {
            _ = try await NBDClient.connect(try NBDURI("nbd+unix:///other?socket=\(dir)/s"), group: group).get()
        }
        await server.shutdown(graceSeconds: 1)
        try await group.shutdownGracefully()
    }
}

/// The client against the NBD servers users run: nbdkit (structured replies, holes,
/// base:allocation; its error filter), qemu-nbd, and nbd-server (simple replies only). Each
/// is started on a socket of its own and stopped after. Without the program the test
/// records an issue under CI (which installs them) and is skipped elsewhere.
@Suite(.serialized) struct NBDClientPeerTests {
    final class Peer {
        let process = Process()
        let uri: NBDURI
        let dir: String

        /// `arguments(dir)`: the command line, given the peer's own directory.
        init(_ arguments: (String) throws -> [String], uri: (String) -> String) throws {
            dir = try NBDClientPeerTests.directory()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            process.arguments = try arguments(dir)
            process.standardOutput = FileHandle.nullDevice
            process.standardError = FileHandle(forWritingAtPath: "/dev/null")
            self.uri = try NBDURI(uri(dir))
            try process.run()
        }

        /// A connection, once the server answers (up to 10 s).
        func connect(_ group: EventLoopGroup) async throws -> NBDClient {
            var last: Error?
            for _ in 0..<100 {
                do { return try await NBDClient.connect(uri, group: group).get() } catch { last = error }
                try await Task.sleep(nanoseconds: 100_000_000)
            }
            throw last ?? NBDClientError.closed("never answered")
        }

        /// SIGKILL, and wait until it is gone (polled: `waitUntilExit` can hang inside an async
        /// test). Not SIGTERM: a child spawned from a test thread inherits its signal mask,
        /// where SIGTERM may be blocked. The peers hold nothing worth a clean exit.
        func stop() {
            let pid = process.processIdentifier
            func gone() -> Bool {
                var status: Int32 = 0
                let r = waitpid(pid, &status, WNOHANG)
                return r == pid || (r < 0 && errno == ECHILD)
            }
            kill(pid, SIGKILL)
            for _ in 0..<200 where !gone() { usleep(10_000) }
            try? FileManager.default.removeItem(atPath: dir)
        }
    }

    static func available(_ program: String) -> Bool {
        if FileManager.default.isExecutableFile(atPath: "/usr/bin/\(program)") || FileManager.default.isExecutableFile(atPath: "/usr/sbin/\(program)") { return true }
        if ProcessInfo.processInfo.environment["CI"] == "true" { Issue.record("\(program) is not installed (scripts/install-deps.sh test)") }
        return false
    }

    static func directory() throws -> String {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("nbd-peer-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        return dir
    }

    static let size = 16 << 20

    /// Writes at scattered offsets (many in flight), reads them back, zeroes, trims, flushes,
    /// asks block status where offered, and reads a range never written as zeros.
    static func exercise(_ client: NBDClient, peer: String) async throws {
        #expect(client.info.size == UInt64(size), "\(peer)")
        let loop = client.channel.eventLoop
        var rng = SystemRandomNumberGenerator()
        var expected: [UInt64: [UInt8]] = [:]
        var writes: [EventLoopFuture<Void>] = []
        for i in 0..<32 {
            let offset = UInt64(i) * 65536 + UInt64.random(in: 0..<8, using: &rng) * 4096
            let bytes = (0..<(4096 * (1 + i % 4))).map { _ in UInt8.random(in: 0...255, using: &rng) }
            expected[offset] = bytes
            writes.append(client.write(offset: offset, data: ByteBuffer(bytes: bytes), fua: i % 5 == 0))
        }
        try await EventLoopFuture.andAllSucceed(writes, on: loop).get()
        for (offset, bytes) in expected {
            #expect(Array(buffer: try await client.read(offset: offset, length: UInt32(bytes.count)).get()) == bytes, "\(peer) at \(offset)")
        }
        // Never written: zeros (a hole chunk where the server says so).
        let hole = Array(buffer: try await client.read(offset: 8 << 20, length: 1 << 20).get())
        #expect(hole.count == 1 << 20 && hole.firstIndex { $0 != 0 } == nil, "\(peer): \(hole.count) bytes, the first not zero at \(String(describing: hole.firstIndex { $0 != 0 }))")
        let (first, bytes) = expected.min { $0.key < $1.key }!
        try await client.writeZeroes(offset: first + 100, length: 200).get()
        var want = bytes
        for i in 100..<300 { want[i] = 0 }
        #expect(Array(buffer: try await client.read(offset: first, length: UInt32(bytes.count)).get()) == want, "\(peer)")
        if client.info.flags.contains(.sendTrim) { try await client.trim(offset: 12 << 20, length: 1 << 20).get() }
        if client.info.flags.contains(.sendFlush) { try await client.flush().get() }
        if client.info.baseAllocationID != nil {
            let extents = try await client.blockStatus(offset: 8 << 20, length: 1 << 20).get()
            #expect(!extents.isEmpty && extents.allSatisfy { $0.length > 0 }, "\(peer): \(extents)")
            #expect(extents.first?.flags.contains(.zero) == true, "\(peer): a range never written reads as zeros: \(extents)")
        }
        try await client.close().get()
    }

    static func run(_ program: String, _ arguments: @escaping (String) throws -> [String], uri: @escaping (String) -> String,
                    _ body: (NBDClient) async throws -> Void) async throws {
        guard available(program) else { return }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let peer = try Peer({ try [program] + arguments($0) }, uri: uri)
        do {
            let client = try await peer.connect(group)
            try await body(client)
        } catch {
            peer.stop()
            try await group.shutdownGracefully()
            throw error
        }
        peer.stop()
        try await group.shutdownGracefully()
    }

    static func image(_ dir: String) throws -> String {
        let path = dir + "/disk.img"
        #expect(FileManager.default.createFile(atPath: path, contents: nil))
        let f = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        try f.truncate(atOffset: UInt64(size))
        try f.close()
        return path
    }

    @Test func nbdkit() async throws {
        try await Self.run("nbdkit", { ["-f", "--exit-with-parent", "-U", $0 + "/s", "memory", "\(Self.size)"] },
                           uri: { "nbd+unix:///?socket=\($0)/s" }) { client in
            #expect(client.info.structuredReplies && client.info.baseAllocationID != nil)
            try await Self.exercise(client, peer: "nbdkit")
        }
    }

    /// nbdkit's error filter fails every write: each comes back as the server's EIO, reads
    /// go on, and the connection stays up.
    @Test func nbdkitErrorFilter() async throws {
        try await Self.run("nbdkit", { ["-f", "--exit-with-parent", "-U", $0 + "/s", "--filter=error", "memory", "\(Self.size)",
                                        "error-pwrite=EIO", "error-pwrite-rate=100%"] },
                           uri: { "nbd+unix:///?socket=\($0)/s" }) { client in
            for i in 0..<4 {
                await #expect(throws: NBDClientError.server(errno: NBDErrno.io.rawValue, message: "")) {
                    try await client.write(offset: UInt64(i) * 4096, data: ByteBuffer(bytes: [UInt8](repeating: 1, count: 4096))).get()
                }
            }
            #expect(Array(buffer: try await client.read(offset: 0, length: 4096).get()) == [UInt8](repeating: 0, count: 4096))
            try await client.close().get()
        }
    }

    @Test func qemuNBD() async throws {
        try await Self.run("qemu-nbd", { ["-f", "raw", "-t", "-k", $0 + "/s", "-x", "vol", try Self.image($0)] },
                           uri: { "nbd+unix:///vol?socket=\($0)/s" }) { client in
            #expect(client.info.structuredReplies)
            try await Self.exercise(client, peer: "qemu-nbd")
        }
    }

    /// nbd-server 3.24 (Debian 12) has no structured replies: every READ's data comes in a
    /// simple reply whose length only the client knows.
    @Test func nbdServer() async throws {
        let port = Int.random(in: 20000...40000)
        try await Self.run("nbd-server", { dir in
            let conf = """
            [generic]
                listenaddr = 127.0.0.1
                port = \(port)
                user = \(ProcessInfo.processInfo.environment["USER"] ?? "root")
            [vol]
                exportname = \(try Self.image(dir))
            """
            try conf.write(toFile: dir + "/nbd.conf", atomically: true, encoding: .utf8)
            return ["-C", dir + "/nbd.conf", "-d"]
        }, uri: { _ in "nbd://127.0.0.1:\(port)/vol" }) { client in
            #expect(!client.info.structuredReplies)
            try await Self.exercise(client, peer: "nbd-server")
        }
    }
}

/// A server that breaks the protocol in transmission: the request it answered wrongly fails
/// (no promise is left waiting), every other request in flight fails, and the connection
/// closes. DISC waits for the requests in flight and nothing is sent after it.
@Suite struct NBDClientHostileServerTests {
    static let info = NBDExportInfo(size: 1 << 20, flags: [.hasFlags, .sendFlush], structuredReplies: true, baseAllocationID: 7, blockSizes: nil)

    static func channel(requestTimeout: TimeAmount = .seconds(60)) throws -> EmbeddedChannel {
        let table = NBDCookieTable()
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandlers([ByteToMessageHandler(NBDReplyDecoder(readLength: table.readLength)),
                                                          NBDClientHandler(table: table, info: info, requestTimeout: requestTimeout)])
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()  // active, as a real connection
        return channel
    }

    static func request(_ channel: EmbeddedChannel, _ command: NBDCommand, offset: UInt64 = 0, length: UInt32 = 0) throws -> EventLoopFuture<NBDClientResult> {
        let promise = channel.eventLoop.makePromise(of: NBDClientResult.self)
        try channel.writeOutbound(NBDClientRequest(command: command, flags: [], offset: offset, length: length, payload: nil, promise: promise))
        return promise.futureResult
    }

    static func chunk(_ cookie: UInt64, _ type: NBDChunkType, done: Bool, _ payload: [UInt8]) -> ByteBuffer {
        var b = ByteBuffer(); b.writeChunkHeader(cookie: cookie, type: type, done: done, length: payload.count); b.writeBytes(payload); return b
    }

    static func be64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8(truncatingIfNeeded: v >> (56 - 8 * $0)) } }
    static func be32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: v >> (24 - 8 * $0)) } }

    /// Feed `replies`; the two requests in flight (cookies 1 and 2) must fail with `why`.
    static func refused(_ command: NBDCommand, length: UInt32, _ replies: [ByteBuffer], _ why: String,
                        sourceLocation: SourceLocation = #_sourceLocation) throws {
        let channel = try channel()
        let first = try request(channel, command, offset: 4096, length: length)
        let second = try request(channel, .flush)
        for r in replies { _ = try? channel.writeInbound(r) }
        for (name, f) in [("the faulty request", first), ("the other request", second)] {
            do {
                _ = try f.wait()
                Issue.record("\(name) succeeded", sourceLocation: sourceLocation)
            } catch {
                #expect("\(error)" == "the server broke the NBD protocol: \(why)", "\(name)", sourceLocation: sourceLocation)
            }
        }
        #expect(!channel.isActive, sourceLocation: sourceLocation)
    }

    @Test func protocolFaultsFailTheirRequestAndTheRest() throws {
        let half = [UInt8](repeating: 1, count: 2048)
        try Self.refused(.read, length: 4096, [Self.chunk(1, .offsetData, done: false, Self.be64(4096) + half),
                                               Self.chunk(1, .offsetData, done: true, Self.be64(4096) + half)],
                         "read chunks overlapping at 4096")
        try Self.refused(.read, length: 4096, [Self.chunk(1, .none, done: true, [])], "a READ of 4096 bytes answered with 0")
        try Self.refused(.read, length: 4096, [Self.chunk(1, .offsetData, done: true, Self.be64(8190) + half)],
                         "read data at 8190+2048, outside the READ of 4096+4096")
        try Self.refused(.blockStatus, length: 4096, [Self.chunk(1, .blockStatus, done: false, Self.be32(7) + Self.be32(4096) + Self.be32(0)),
                                                      Self.chunk(1, .blockStatus, done: true, Self.be32(7) + Self.be32(4096) + Self.be32(0))],
                         "a malformed or unexpected block status chunk")
        try Self.refused(.blockStatus, length: 4096, [Self.chunk(1, .blockStatus, done: true, Self.be32(7) + Self.be32(0) + Self.be32(0))],
                         "a block status extent of length 0")
        try Self.refused(.blockStatus, length: 4096, [Self.chunk(1, .none, done: true, [])], "a BLOCK_STATUS answered with no extent")
        var simple = ByteBuffer(); simple.writeSimpleReply(cookie: 1)
        try Self.refused(.read, length: 4096, [simple], "a simple reply without data to a READ of 4096 bytes (structured replies were negotiated)")
        var stranger = ByteBuffer(); stranger.writeSimpleReply(cookie: 99)
        try Self.refused(.read, length: 4096, [stranger], "a reply for cookie 99, which no request in flight has")
    }

    @Test func disconnectWaitsForTheRequestsInFlight() throws {
        let channel = try Self.channel()
        let flush = try Self.request(channel, .flush)
        _ = try channel.readOutbound(as: ByteBuffer.self)  // the FLUSH
        let disc = channel.eventLoop.makePromise(of: Void.self)
        // Not writeOutbound: it waits for the write, which the handler holds until the FLUSH is answered.
        channel.writeAndFlush(NBDClientRequest(command: .disconnect, flags: [], offset: 0, length: 0, payload: nil, promise: nil), promise: disc)
        #expect(try channel.readOutbound(as: ByteBuffer.self) == nil, "DISC went out with a FLUSH in flight")
        do {
            _ = try Self.request(channel, .flush).wait()
            Issue.record("a request after DISC was sent")
        } catch {
            #expect("\(error)" == "the NBD connection closed: the connection is being disconnected")
        }
        var reply = ByteBuffer(); reply.writeSimpleReply(cookie: 1)
        try channel.writeInbound(reply)
        _ = try flush.wait()
        var out = try #require(try channel.readOutbound(as: ByteBuffer.self))
        #expect(out.readableBytes == NBDRequestHeader.size)
        out.moveReaderIndex(forwardBy: 6)
        #expect(out.readInteger(as: UInt16.self) == NBDCommand.disconnect.rawValue)
        try disc.futureResult.wait()
    }

    /// A server that stops answering: past the request timeout every request in flight fails
    /// and the connection closes; one that answers in time is left alone.
    @Test func aSilentServerIsNotWaitedForForever() throws {
        let channel = try Self.channel(requestTimeout: .seconds(5))
        let answered = try Self.request(channel, .flush)
        channel.embeddedEventLoop.advanceTime(by: .seconds(3))
        var reply = ByteBuffer(); reply.writeSimpleReply(cookie: 1)
        try channel.writeInbound(reply)
        _ = try answered.wait()
        let silent = try Self.request(channel, .read, offset: 8192, length: 4096)
        channel.embeddedEventLoop.advanceTime(by: .seconds(4))
        #expect(channel.isActive)
        channel.embeddedEventLoop.advanceTime(by: .seconds(3))
        do {
            _ = try silent.wait()
            Issue.record("a READ nobody answered succeeded")
        } catch {
            #expect("\(error)" == "the NBD connection closed: no reply to read at 8192+4096 within 5 s")
        }
        #expect(!channel.isActive)
    }

    @Test func aQueryOfAnEqualsSignAloneIsNoCrash() throws {
        #expect(try NBDURI("nbd+unix:///x?socket=/s&=").transport == .unix(path: "/s"))
    }
}
