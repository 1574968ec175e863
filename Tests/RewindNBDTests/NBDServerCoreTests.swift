import Foundation
import NIOCore
import NIOTestUtils
import Testing
@testable import RewindNBD

/// The server's protocol core without a channel: `NBDServerFramer` under SwiftNIO's
/// `ByteToMessageDecoderVerifier` (every message delivered whole, byte by byte and in random
/// pieces), and `NBDServerHandshake`'s answers to option sequences.
@Suite struct NBDServerCoreTests {
    static func option(_ option: UInt32, _ data: [UInt8]) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeInteger(NBD.ihaveopt)
        b.writeInteger(option)
        b.writeInteger(UInt32(data.count))
        b.writeBytes(data)
        return b
    }

    static func request(_ type: NBDCommand, cookie: UInt64, offset: UInt64 = 0, length: UInt32, payload: [UInt8] = [], flags: UInt16 = 0) -> ByteBuffer {
        var b = ByteBuffer()
        b.writeInteger(NBD.requestMagic)
        b.writeInteger(flags)
        b.writeInteger(type.rawValue)
        b.writeInteger(cookie)
        b.writeInteger(offset)
        b.writeInteger(length)
        b.writeBytes(payload)
        return b
    }

    static func header(_ type: NBDCommand, cookie: UInt64, offset: UInt64 = 0, length: UInt32, flags: UInt16 = 0) -> NBDRequestHeader {
        NBDRequestHeader(flags: flags, type: type.rawValue, cookie: cookie, offset: offset, length: length)
    }

    @Test func optionsDecodeWholeHoweverTheyArrive() throws {
        let go: [UInt8] = [0, 0, 0, 3] + Array("vol".utf8) + [0, 0]
        let pairs: [(ByteBuffer, [NBDServerFramer.Message])] = [
            (Self.option(NBDOption.structuredReply.rawValue, []), [.option(NBDOption.structuredReply.rawValue, data: ByteBuffer())]),
            (Self.option(NBDOption.go.rawValue, go), [.option(NBDOption.go.rawValue, data: ByteBuffer(bytes: go))]),
            (Self.option(99, Array(repeating: 7, count: 100)), [.option(99, data: ByteBuffer(bytes: Array(repeating: 7, count: 100)))]),
        ]
        try ByteToMessageDecoderVerifier.verifyDecoder(inputOutputPairs: pairs) { NBDServerFramer(phase: .options) }
    }

    @Test func requestsDecodeWithTheirPayloadsWhole() throws {
        let data = (0..<70_000).map { UInt8(truncatingIfNeeded: $0 &* 31) }
        let pairs: [(ByteBuffer, [NBDServerFramer.Message])] = [
            (Self.request(.read, cookie: 1, offset: 4096, length: 512), [.request(Self.header(.read, cookie: 1, offset: 4096, length: 512), payload: nil)]),
            (Self.request(.write, cookie: 2, offset: 8192, length: UInt32(data.count), payload: data),
             [.request(Self.header(.write, cookie: 2, offset: 8192, length: UInt32(data.count)), payload: data)]),
            (Self.request(.write, cookie: 3, length: 0), [.request(Self.header(.write, cookie: 3, length: 0), payload: [])]),
            (Self.request(.flush, cookie: 4, length: 0), [.request(Self.header(.flush, cookie: 4, length: 0), payload: nil)]),
            (Self.request(.write, cookie: 5, offset: 1, length: 3, payload: [9, 8, 7], flags: 1),
             [.request(Self.header(.write, cookie: 5, offset: 1, length: 3, flags: 1), payload: [9, 8, 7])]),
        ]
        try ByteToMessageDecoderVerifier.verifyDecoder(inputOutputPairs: pairs) { NBDServerFramer(phase: .transmission) }
    }

    /// Oversized option data and a WRITE over the maximum payload are discarded as they
    /// arrive, never held: the framer keeps no more than what one read brought.
    @Test func oversizedInputIsDiscardedNotHeld() throws {
        var framer = NBDServerFramer(phase: .options)
        var b = ByteBuffer()
        b.writeInteger(NBD.ihaveopt)
        b.writeInteger(UInt32(5))
        b.writeInteger(UInt32(NBD.maxOptionBytes + 1))
        #expect(try framer.next(&b) == nil)
        var total = 0
        var result: NBDServerFramer.Message?
        while result == nil {
            var piece = ByteBuffer(repeating: 1, count: 65536)
            total += 65536
            result = try framer.next(&piece)
            #expect(piece.readableBytes == max(0, total - NBD.maxOptionBytes - 1))
        }
        #expect(result == .oversizedOption(5))

        var writer = NBDServerFramer(phase: .transmission)
        var w = Self.request(.write, cookie: 9, length: UInt32(NBD.maxPayloadBytes + 1))
        #expect(try writer.next(&w) == nil)
        var got: NBDServerFramer.Message?
        var sent = 0
        while got == nil {
            var piece = ByteBuffer(repeating: 2, count: 1 << 20)
            sent += 1 << 20
            got = try writer.next(&piece)
        }
        #expect(got == .request(Self.header(.write, cookie: 9, length: UInt32(NBD.maxPayloadBytes + 1)), payload: nil))
        #expect(sent >= NBD.maxPayloadBytes + 1)
    }

    @Test func badMagicsThrow() throws {
        var framer = NBDServerFramer(phase: .transmission)
        var b = ByteBuffer(repeating: 0xee, count: 28)
        #expect(throws: NBDProtocolError.self) { _ = try framer.next(&b) }
        var options = NBDServerFramer(phase: .options)
        var o = ByteBuffer(repeating: 0xee, count: 16)
        #expect(throws: NBDProtocolError.self) { _ = try options.next(&o) }
    }

    /// The handshake's answers: structured replies once, base:allocation after them, an
    /// unknown export refused by name with the export left open for the right one, GO entering
    /// transmission with the export chosen, ABORT closing; too many options throw.
    @Test func handshakeAnswersOptionSequences() throws {
        let target = MemoryTarget(size: 1 << 20)
        var hs = NBDServerHandshake(catalog: SingleExportCatalog(NBDExport(name: "vol", description: "d", target: target)))
        try hs.clientFlags(NBD.clientFixedNewstyle | NBD.clientNoZeroes)
        #expect(hs.noZeroes)
        #expect(throws: NBDProtocolError.self) { var h2 = hs; try h2.clientFlags(1 << 7) }

        func replies(_ actions: [NBDServerHandshake.Action]) -> [(UInt32, UInt32)] {
            actions.compactMap { a -> (UInt32, UInt32)? in
                guard case var .send(b) = a, let _: UInt64 = b.readInteger(), let o: UInt32 = b.readInteger(), let t: UInt32 = b.readInteger() else { return nil }
                return (o, t)
            }
        }
        let sr = NBDOption.structuredReply.rawValue
        #expect(replies(try hs.option(sr, data: ByteBuffer())).map(\.1) == [NBDOptionReply.ack.rawValue])
        #expect(hs.structuredReplies)
        #expect(replies(try hs.option(sr, data: ByteBuffer())).map(\.1) == [NBDOptionReply.errInvalid.rawValue])
        var meta = ByteBuffer()
        meta.writeInteger(UInt32(3)); meta.writeString("vol"); meta.writeInteger(UInt32(1))
        meta.writeInteger(UInt32(15)); meta.writeString("base:allocation")
        #expect(replies(try hs.option(NBDOption.setMetaContext.rawValue, data: meta)).map(\.1)
                == [NBDOptionReply.metaContext.rawValue, NBDOptionReply.ack.rawValue])
        #expect(hs.metaContextSelected)
        var nope = ByteBuffer(); nope.writeInteger(UInt32(4)); nope.writeString("nope"); nope.writeInteger(UInt16(0))
        let refused = try hs.option(NBDOption.go.rawValue, data: nope)
        #expect(replies(refused).map(\.1) == [NBDOptionReply.errUnknown.rawValue])
        var go = ByteBuffer(); go.writeInteger(UInt32(3)); go.writeString("vol"); go.writeInteger(UInt16(0))
        let chosen = try hs.option(NBDOption.go.rawValue, data: go)
        #expect(replies(chosen).map(\.1) == [NBDOptionReply.info.rawValue, NBDOptionReply.info.rawValue, NBDOptionReply.ack.rawValue])
        guard case let .enterTransmission(export) = chosen.last else { Issue.record("GO did not enter transmission"); return }
        #expect(export.name == "vol")

        var aborting = NBDServerHandshake(catalog: SingleExportCatalog(NBDExport(name: "vol", description: "d", target: target)))
        let abort = try aborting.option(NBDOption.abort.rawValue, data: ByteBuffer())
        guard case .close = abort.last else { Issue.record("ABORT did not close"); return }
        var many = NBDServerHandshake(catalog: SingleExportCatalog(NBDExport(name: "vol", description: "d", target: target)))
        for _ in 0..<NBD.maxOptions { _ = try many.option(999, data: ByteBuffer()) }
        #expect(throws: NBDProtocolError.self) { _ = try many.option(999, data: ByteBuffer()) }
    }

    /// The transmission machine: requests go while there is room (requests, payload bytes, the
    /// server-wide budget) and wait in order otherwise; an invalid one is refused; after DISC
    /// nothing more is served and the close comes once nothing is in flight.
    @Test func transmissionLetsRequestsGoWhileThereIsRoom() {
        var t = NBDTransmission(context: NBDValidationContext(size: 1 << 20, readOnly: false, structuredReplies: true, metaContextNegotiated: false),
                                maxInflight: 3, maxInflightBytes: 8192)
        func id(_ a: NBDTransmission.Action?) -> String {
            switch a {
            case let .dispatch(h, _, _, bytes)?: "go \(h.cookie) \(bytes)"
            case let .refuse(h, e)?: "refuse \(h.cookie) \(e)"
            case .close?: "close"
            case nil: "nil"
            }
        }
        for c in 1...3 { t.received(Self.header(.read, cookie: UInt64(c), length: 4096), payload: nil) }
        #expect(id(t.next(budgetExhausted: false)) == "go 1 4096")
        #expect(id(t.next(budgetExhausted: false)) == "go 2 4096")
        #expect(id(t.next(budgetExhausted: false)) == "nil")  // 8 KiB of payload in flight
        #expect(t.isSaturated(budgetExhausted: false))
        #expect(id(t.completed(payloadBytes: 4096)) == "nil")
        #expect(id(t.next(budgetExhausted: true)) == "nil")  // the server-wide budget
        #expect(id(t.next(budgetExhausted: false)) == "go 3 4096")
        t.received(Self.header(.read, cookie: 4, offset: 1 << 20, length: 1), payload: nil)
        t.received(Self.header(.flush, cookie: 5, length: 0), payload: nil)
        t.received(Self.header(.trim, cookie: 6, length: 1 << 20), payload: nil)
        #expect(id(t.next(budgetExhausted: false)) == "nil")  // 8 KiB in flight again: even a refusal waits its turn
        #expect(id(t.completed(payloadBytes: 4096)) == "nil")
        #expect(id(t.next(budgetExhausted: false)) == "refuse 4 inval")  // past the end
        #expect(id(t.next(budgetExhausted: false)) == "go 5 0")
        #expect(id(t.next(budgetExhausted: false)) == "go 6 0")
        #expect(id(t.next(budgetExhausted: false)) == "nil")  // nothing waits
        t.received(Self.header(.disconnect, cookie: 7, length: 0), payload: nil)
        t.received(Self.header(.read, cookie: 8, length: 512), payload: nil)
        #expect(id(t.next(budgetExhausted: false)) == "nil")  // three in flight: DISC waits its turn
        #expect(id(t.completed(payloadBytes: 4096)) == "nil")
        #expect(id(t.next(budgetExhausted: false)) == "nil")  // DISC taken; 8 is never served
        t.received(Self.header(.read, cookie: 9, length: 512), payload: nil)
        #expect(id(t.next(budgetExhausted: false)) == "nil")
        #expect(id(t.completed(payloadBytes: 0)) == "nil")
        #expect(id(t.completed(payloadBytes: 0)) == "close")
        #expect(t.inflight == 0 && t.inflightBytes == 0)
    }
}
