import Logging
import NIOCore
import NIOEmbedded
import Testing
@testable import RewindNBD

/// An in-memory export for driving the handler through EmbeddedChannel.
final class MemoryTarget: BlockTarget, @unchecked Sendable {
    var bytes: [UInt8]
    var size: UInt64 { UInt64(bytes.count) }
    let readOnly = false
    let canFastZero = true
    init(size: Int) { bytes = [UInt8](repeating: 0, count: size) }

    func read(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<[ReadExtent]> {
        var b = ByteBuffer(); b.writeBytes(bytes[Int(offset)..<Int(offset) + Int(length)])
        return loop.makeSucceededFuture(length == 0 ? [] : [.data(offset: offset, bytes: b)])
    }
    func write(offset: UInt64, data: [UInt8], fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        bytes.replaceSubrange(Int(offset)..<Int(offset) + data.count, with: data)
        return loop.makeSucceededVoidFuture()
    }
    func writeZeroes(offset: UInt64, length: UInt32, noHole: Bool, fastZero: Bool, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        for i in Int(offset)..<Int(offset) + Int(length) { bytes[i] = 0 }
        return loop.makeSucceededVoidFuture()
    }
    func trim(offset: UInt64, length: UInt32, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        writeZeroes(offset: offset, length: length, noHole: false, fastZero: false, fua: fua, on: loop)
    }
    func flush(on loop: EventLoop) -> EventLoopFuture<Void> { loop.makeSucceededVoidFuture() }
    func cache(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<Void> { loop.makeSucceededVoidFuture() }
    func blockStatus(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<[AllocationExtent]> {
        loop.makeSucceededFuture([AllocationExtent(length: length, flags: [])])
    }
}

func makeChannel(size: Int = 1 << 20) throws -> (EmbeddedChannel, MemoryTarget) {
    let target = MemoryTarget(size: size)
    let handler = NBDConnectionHandler(export: NBDExport(name: "vol", description: "test", target: target),
                                       observer: nil, logger: Logger(label: "test", factory: { _ in SwiftLogNoOpLogHandler() }))
    let channel = EmbeddedChannel(handler: handler)
    try channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
    return (channel, target)
}

func drain(_ channel: EmbeddedChannel) throws -> [UInt8] {
    var out: [UInt8] = []
    while var b = try channel.readOutbound(as: ByteBuffer.self) { out += b.readBytes(length: b.readableBytes)! }
    return out
}

extension ByteBuffer {
    /// An NBD request as a client sends it: header, then `payload`.
    mutating func writeRequest(_ type: UInt16, _ offset: UInt64, _ length: UInt32, cookie: UInt64, payload: [UInt8] = []) {
        writeInteger(NBD.requestMagic); writeInteger(UInt16(0)); writeInteger(type)
        writeInteger(cookie); writeInteger(offset); writeInteger(length); writeBytes(payload)
    }
}

/// A client's bytes: flags, STRUCTURED_REPLY, GO "vol", then a few requests.
func clientScript() -> [UInt8] {
    var b = ByteBuffer()
    b.writeInteger(UInt32(3))
    b.writeInteger(NBD.ihaveopt); b.writeInteger(UInt32(8)); b.writeInteger(UInt32(0))
    b.writeInteger(NBD.ihaveopt); b.writeInteger(UInt32(7)); b.writeInteger(UInt32(4 + 3 + 2))
    b.writeInteger(UInt32(3)); b.writeString("vol"); b.writeInteger(UInt16(0))
    b.writeRequest(1, 4096, 8, cookie: 1, payload: Array("rewind!!".utf8))
    b.writeRequest(0, 4096, 8, cookie: 2)
    b.writeRequest(0, 1 << 20, 1, cookie: 3)       // out of range: EINVAL in an ERROR chunk
    b.writeRequest(3, 0, 0, cookie: 4)
    return b.readBytes(length: b.readableBytes)!
}

@Suite struct NBDHandlerTests {
    /// Like NIO's ByteToMessageDecoderVerifier: the same bytes delivered all at once and one at
    /// a time give the same replies.
    @Test func bytewiseAndWholeDeliveryAnswerTheSame() throws {
        let script = clientScript()
        let (whole, t1) = try makeChannel()
        var b = ByteBuffer(); b.writeBytes(script)
        try whole.writeInbound(b)
        let a = try drain(whole)
        let (bytewise, t2) = try makeChannel()
        for byte in script { var one = ByteBuffer(); one.writeInteger(byte); try bytewise.writeInbound(one) }
        let c = try drain(bytewise)
        #expect(a == c)
        #expect(t1.bytes[4096..<4104] == t2.bytes[4096..<4104])
        #expect(Array(t1.bytes[4096..<4104]) == Array("rewind!!".utf8))
        // The read of cookie 2 came back as an OFFSET_DATA chunk carrying the written bytes.
        #expect(a.count > 18)
        let text = String(decoding: a, as: UTF8.self)
        #expect(text.contains("rewind!!"))
    }

    /// Large WRITEs whose payload arrives over many reads of random sizes — split anywhere,
    /// sharing a read with the next request's header — land byte for byte, and the replies
    /// equal those of one whole delivery.
    @Test(arguments: [1, 2, 3])
    func largeWritesSplitAnywhereLandExactly(seed: UInt64) throws {
        var state = seed &* 0x9E37_79B9_7F4A_7C15
        func next() -> UInt64 { state ^= state << 13; state ^= state >> 7; state ^= state << 17; return state }
        let big = (0..<(64 << 10) + 13).map { _ in UInt8(truncatingIfNeeded: next()) }
        let small = (0..<3000).map { _ in UInt8(truncatingIfNeeded: next()) }
        var b = ByteBuffer()
        b.writeBytes(clientScript().dropLast(28))  // the handshake and requests, without DISC
        b.writeRequest(1, 0, UInt32(big.count), cookie: 10, payload: big)
        b.writeRequest(1, 200_000, UInt32(small.count), cookie: 11, payload: small)
        b.writeRequest(0, 0, 16, cookie: 12)
        b.writeRequest(1, 100, 4, cookie: 13, payload: [1, 2, 3, 4])  // overwrites part of the big one
        b.writeRequest(3, 0, 0, cookie: 14)
        let script = b.readBytes(length: b.readableBytes)!

        let (whole, t1) = try makeChannel()
        var all = ByteBuffer(); all.writeBytes(script)
        try whole.writeInbound(all)
        let expected = try drain(whole)
        let (split, t2) = try makeChannel()
        var at = 0
        while at < script.count {
            let n = min(script.count - at, Int(next() % 9000) + 1)
            var piece = ByteBuffer(); piece.writeBytes(script[at..<at + n])
            try split.writeInbound(piece)
            at += n
        }
        // Compared as Bools: a failure should not print megabytes.
        let sameReplies = try drain(split) == expected
        #expect(sameReplies)
        var want = big
        want.replaceSubrange(100..<104, with: [1, 2, 3, 4])
        for t in [t1, t2] {
            let bigLanded = Array(t.bytes[0..<big.count]) == want, smallLanded = Array(t.bytes[200_000..<203_000]) == small
            #expect(bigLanded)
            #expect(smallLanded)
        }
    }

    /// Random bytes after a good handshake, and random handshakes: never a crash, never an
    /// unbounded buffer; the channel either answers or closes.
    @Test(arguments: 0..<4)
    func randomInputNeverCrashes(seed: Int) throws {
        var rng = SystemRandomNumberGenerator()
        _ = seed
        for round in 0..<300 {
            let (channel, _) = try makeChannel(size: 65536)
            var junk = ByteBuffer()
            if round % 2 == 0 {
                let script = clientScript()
                junk.writeBytes(script.prefix(Int.random(in: 0...script.count, using: &rng)))
            }
            for _ in 0..<Int.random(in: 1...400, using: &rng) {
                // Mostly structure-shaped noise: magic numbers, small lengths, random commands.
                switch Int.random(in: 0..<6, using: &rng) {
                case 0: junk.writeInteger(NBD.requestMagic)
                case 1: junk.writeInteger(NBD.ihaveopt)
                case 2: junk.writeInteger(UInt32.random(in: 0...64, using: &rng))
                case 3: junk.writeInteger(UInt16.random(in: 0...12, using: &rng))
                case 4: junk.writeInteger(UInt64.random(in: 0...70000, using: &rng))
                default: junk.writeInteger(UInt8.random(in: 0...255, using: &rng))
                }
            }
            do { try channel.writeInbound(junk) } catch {}
            _ = try? drain(channel)
            _ = try? channel.finish()
        }
    }

    @Test func optionParsersRejectOverrunsAndHugeCounts() {
        var b = ByteBuffer(); b.writeInteger(UInt32(0xFFFF_FFFF)); b.writeString("abc"); b.writeInteger(UInt16(0))
        #expect(NBDInfoRequest.parse(b) == nil)
        var m = ByteBuffer(); m.writeInteger(UInt32(0)); m.writeInteger(UInt32(0xFFFF_FFFF))
        #expect(NBDMetaContextRequest.parse(m) == nil)
        var ok = ByteBuffer(); ok.writeInteger(UInt32(3)); ok.writeString("vol"); ok.writeInteger(UInt16(1)); ok.writeInteger(UInt16(3))
        #expect(NBDInfoRequest.parse(ok) == NBDInfoRequest(name: "vol", infos: [3]))
    }

    @Test func validationNamesTheSpecErrno() {
        let ctx = NBDValidationContext(size: 1 << 20, readOnly: false, structuredReplies: false, metaContextNegotiated: false)
        func check(_ type: UInt16, _ flags: UInt16, _ offset: UInt64, _ length: UInt32) -> NBDErrno? {
            if case .failure(let e) = validate(NBDRequestHeader(flags: flags, type: type, cookie: 0, offset: offset, length: length), ctx) { return e }
            return nil
        }
        #expect(check(0, 0, UInt64.max, 1) == .inval)
        #expect(check(1, 0, UInt64.max, 1) == .nospc)
        #expect(check(6, 0, (1 << 20) - 1, 2) == .nospc)
        #expect(check(0, 1 << 2, 0, 1) == .inval)      // DF without structured replies
        #expect(check(0, 1 << 3, 0, 1) == .inval)      // REQ_ONE on READ
        #expect(check(6, 1 << 1, 0, 1) == nil)         // NO_HOLE on WRITE_ZEROES
        #expect(check(1, 1 << 4, 0, 0) == .inval)      // FAST_ZERO on WRITE
        #expect(check(3, 1, 0, 0) == nil)              // FUA on FLUSH is allowed
        #expect(check(3, 0, 1, 0) == .inval)
        #expect(check(9, 0, 0, 0) == .inval)
        #expect(check(7, 0, 0, 512) == .inval)         // BLOCK_STATUS without a context
        #expect(check(0, 0, 0, 33 << 20) == .inval)
        let ro = NBDValidationContext(size: 1 << 20, readOnly: true, structuredReplies: true, metaContextNegotiated: true)
        if case .failure(let e) = validate(NBDRequestHeader(flags: 0, type: 4, cookie: 0, offset: 0, length: 1), ro) {
            #expect(e == .perm)
        } else { Issue.record("TRIM accepted on a read-only export") }
    }
}
