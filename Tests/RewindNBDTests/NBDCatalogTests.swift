import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOEmbedded
import Testing
@testable import RewindNBD

/// A target that counts its `detach()` calls (a point export releases its pin there).
final class DetachCounting: BlockTarget, @unchecked Sendable {
    let inner = MemoryTarget(size: 4096)
    let detached = NIOLockedValueBox(0)
    var size: UInt64 { inner.size }
    let readOnly = true
    let canFastZero = false
    func read(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<[ReadExtent]> { inner.read(offset: offset, length: length, on: loop) }
    func write(offset: UInt64, data: [UInt8], fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> { loop.makeFailedFuture(NBDErrno.perm) }
    func writeZeroes(offset: UInt64, length: UInt32, noHole: Bool, fastZero: Bool, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> { loop.makeFailedFuture(NBDErrno.perm) }
    func trim(offset: UInt64, length: UInt32, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> { loop.makeFailedFuture(NBDErrno.perm) }
    func flush(on loop: EventLoop) -> EventLoopFuture<Void> { loop.makeSucceededVoidFuture() }
    func cache(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<Void> { loop.makeSucceededVoidFuture() }
    func blockStatus(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<[AllocationExtent]> { inner.blockStatus(offset: offset, length: length, on: loop) }
    func detach() { detached.withLockedValue { $0 += 1 } }
}

/// "vol" and, for any `vol@X`, a new read-only target per lookup; "vol@bad" is unknown.
final class TestCatalog: NBDExportCatalog, @unchecked Sendable {
    let primary = NBDExport(name: "vol", description: "the volume", target: MemoryTarget(size: 4096))
    let opened = NIOLockedValueBox<[DetachCounting]>([])
    func lookup(_ name: String) -> NBDExportLookup {
        if primary.answers(to: name) { return .found(primary) }
        guard name.hasPrefix("vol@"), name != "vol@bad" else { return .unknown("\(name): no such point " + String(repeating: "x", count: 5000)) }
        let t = DetachCounting()
        opened.withLockedValue { $0.append(t) }
        return .found(NBDExport(name: name, description: "vol as of \(name.dropFirst(4))", target: t))
    }
    func list() -> [(name: String, description: String)] { [("vol", "the volume"), ("vol@bookmark:a", "vol as of seq:3")] }
}

@Suite struct NBDCatalogTests {
    func channel(_ catalog: TestCatalog) throws -> EmbeddedChannel {
        let handler = NBDConnectionHandler(catalog: catalog, observer: nil,
                                           logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }))
        let c = EmbeddedChannel(handler: handler)
        try c.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        _ = try drain(c)  // the greeting
        var b = ByteBuffer(); b.writeInteger(UInt32(3))
        try c.writeInbound(b)
        return c
    }

    func option(_ c: EmbeddedChannel, _ opt: UInt32, _ data: [UInt8]) throws -> [(type: UInt32, data: [UInt8])] {
        var b = ByteBuffer()
        b.writeInteger(NBD.ihaveopt); b.writeInteger(opt); b.writeInteger(UInt32(data.count)); b.writeBytes(data)
        try c.writeInbound(b)
        var out = ByteBuffer(); out.writeBytes(try drain(c))
        var replies: [(UInt32, [UInt8])] = []
        while out.readableBytes >= 20 {
            _ = out.readInteger(as: UInt64.self); _ = out.readInteger(as: UInt32.self)
            let type = out.readInteger(as: UInt32.self)!, n = Int(out.readInteger(as: UInt32.self)!)
            replies.append((type, out.readBytes(length: n)!))
        }
        return replies
    }

    func goData(_ name: String) -> [UInt8] {
        var b = ByteBuffer(); b.writeInteger(UInt32(name.utf8.count)); b.writeString(name); b.writeInteger(UInt16(0))
        return b.readBytes(length: b.readableBytes)!
    }

    @Test func listNamesEveryExportWithItsDescription() throws {
        let c = try channel(TestCatalog())
        let replies = try option(c, 3, [])
        #expect(replies.map(\.type) == [2, 2, 1])  // NBD_REP_SERVER, NBD_REP_SERVER, NBD_REP_ACK
        #expect(replies[0].data == [0, 0, 0, 3] + Array("vol".utf8) + Array("the volume".utf8))
        #expect(replies[1].data == [0, 0, 0, 14] + Array("vol@bookmark:a".utf8) + Array("vol as of seq:3".utf8))
    }

    @Test func anUnknownPointIsErrUnknownWithAMessageCutToOneKiB() throws {
        let c = try channel(TestCatalog())
        let replies = try option(c, 7, goData("vol@bad"))
        #expect(replies.count == 1)
        #expect(replies[0].type == 0x8000_0006)  // NBD_REP_ERR_UNKNOWN
        #expect(replies[0].data.count == NBD.optionErrorMessageBytesMax)
        #expect(String(decoding: replies[0].data, as: UTF8.self).hasPrefix("vol@bad: no such point xxx"))
        #expect(String(decoding: replies[0].data, as: UTF8.self).hasSuffix("…"))
    }

    @Test func aPointLookedUpOnceIsDetachedOnceWhetherChosenOrNot() throws {
        let catalog = TestCatalog()
        let c = try channel(catalog)
        // INFO then GO of one name: one lookup; INFO of another: detached when GO chooses the first.
        #expect(try option(c, 6, goData("vol@seq:1")).last?.type == 1)
        #expect(try option(c, 6, goData("vol@seq:2")).last?.type == 1)
        #expect(try option(c, 7, goData("vol@seq:1")).last?.type == 1)
        let opened = catalog.opened.withLockedValue { $0 }
        #expect(opened.count == 2)
        #expect(opened[0].detached.withLockedValue { $0 } == 0)  // chosen: held while connected
        #expect(opened[1].detached.withLockedValue { $0 } == 1)  // looked at, then let go
        // A write to the read-only point: EPERM from validation, before the target.
        var b = ByteBuffer(); b.writeRequest(1, 0, 4, cookie: 9, payload: [1, 2, 3, 4])
        try c.writeInbound(b)
        let reply = try drain(c)
        #expect(Array(reply.suffix(16)) == [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9])
        _ = try c.finish()
        #expect(opened[0].detached.withLockedValue { $0 } == 1)  // released at disconnect
        #expect(opened[1].detached.withLockedValue { $0 } == 1)
    }
}
