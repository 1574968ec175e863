import Logging
import NIOCore
import NIOEmbedded
import Testing
@testable import RewindNBD

/// A target whose writes complete only when the test says so.
final class HeldWriteTarget: BlockTarget, @unchecked Sendable {
    let size: UInt64 = 1 << 20
    let readOnly = false
    let canFastZero = false
    var held: [EventLoopPromise<Void>] = []
    func read(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<[ReadExtent]> { loop.makeSucceededFuture([]) }
    func write(offset: UInt64, data: [UInt8], fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        let p = loop.makePromise(of: Void.self); held.append(p); return p.futureResult
    }
    func writeZeroes(offset: UInt64, length: UInt32, noHole: Bool, fastZero: Bool, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> { loop.makeSucceededVoidFuture() }
    func trim(offset: UInt64, length: UInt32, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> { loop.makeSucceededVoidFuture() }
    func flush(on loop: EventLoop) -> EventLoopFuture<Void> { loop.makeSucceededVoidFuture() }
    func cache(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<Void> { loop.makeSucceededVoidFuture() }
    func blockStatus(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<[AllocationExtent]> { loop.makeSucceededFuture([]) }
}

/// Counts the socket reads a handler lets through (it sits between the handler and the socket).
final class ReadCounter: ChannelOutboundHandler, @unchecked Sendable {
    typealias OutboundIn = ByteBuffer
    var reads = 0
    func read(context: ChannelHandlerContext) { reads += 1; context.read() }
}

@Suite struct InflightBudgetTests {
    func connection(_ target: BlockTarget, _ budget: InflightBudget) throws -> (EmbeddedChannel, ReadCounter) {
        let counter = ReadCounter()
        let handler = NBDConnectionHandler(export: NBDExport(name: "vol", description: "test", target: target), observer: nil,
                                           logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }), budget: budget)
        let channel = EmbeddedChannel()
        try channel.pipeline.syncOperations.addHandler(counter)
        try channel.pipeline.syncOperations.addHandler(handler)
        try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
        var b = ByteBuffer()
        b.writeInteger(UInt32(3))
        b.writeInteger(NBD.ihaveopt); b.writeInteger(UInt32(7)); b.writeInteger(UInt32(4 + 3 + 2))
        b.writeInteger(UInt32(3)); b.writeString("vol"); b.writeInteger(UInt16(0))
        try channel.writeInbound(b)
        _ = try drain(channel)
        return (channel, counter)
    }

    func write(_ channel: EmbeddedChannel, cookie: UInt64, bytes: Int) throws {
        var b = ByteBuffer()
        b.writeInteger(NBD.requestMagic); b.writeInteger(UInt16(0)); b.writeInteger(UInt16(1))
        b.writeInteger(cookie); b.writeInteger(UInt64(0)); b.writeInteger(UInt32(bytes))
        b.writeBytes([UInt8](repeating: 7, count: bytes))
        try channel.writeInbound(b)
    }

    /// Payload held by one connection stops the other from reading its socket until it is answered.
    @Test func oneConnectionsPayloadHoldsAnothersReads() throws {
        let budget = InflightBudget(limit: 8192)
        let target = HeldWriteTarget()
        let (a, _) = try connection(target, budget)
        let (b, bReads) = try connection(target, budget)

        try write(a, cookie: 1, bytes: 4096)
        try write(a, cookie: 2, bytes: 4096)
        #expect(budget.used == 8192 && budget.exhausted)
        let before = bReads.reads
        b.read()
        #expect(bReads.reads == before)  // held: the shared budget is spent

        target.held.removeFirst().succeed(())
        a.embeddedEventLoop.run()
        b.embeddedEventLoop.run()
        #expect(budget.used == 4096)
        #expect(bReads.reads == before + 1)  // woken by the other connection's reply
        target.held.removeFirst().succeed(())
        a.embeddedEventLoop.run()
        #expect(budget.used == 0)
        #expect(try drain(a).count == 2 * 16)  // both writes answered with simple replies
        _ = try a.finish(); _ = try b.finish()
    }
}
