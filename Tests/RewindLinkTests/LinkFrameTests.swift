import NIOCore
import NIOEmbedded
import NIOTestUtils
import RewindCore
import Testing
@testable import RewindLink

@Suite struct LinkFrameTests {
    static let frames: [LinkFrame] = [
        LinkHello(volumeUUID: Array(1...16), volumeSize: 1 << 30, blockSize: 4096, generation: 3, lastSeq: 1_000_000).frame,
        LinkSeq(.welcome, seq: 42).frame,
        LinkSeq(.ack, seq: 43).frame,
        LinkRefusal("unknown identity 0123abcd").frame,
        LinkFrame(.keepalive),
        LinkFrame(.records, body: ByteBuffer(bytes: (0..<70_000).map { UInt8(truncatingIfNeeded: $0 &* 31) })),
    ]

    static func encoded(_ frames: [LinkFrame]) -> ByteBuffer {
        var b = ByteBuffer()
        for f in frames { b.writeLinkFrame(f) }
        return b
    }

    /// The layout of docs/formats.md, byte for byte, for a keep-alive.
    @Test func aKeepaliveIsSixteenBytesAsDocumented() {
        var b = ByteBuffer()
        b.writeLinkFrame(LinkFrame(.keepalive))
        let bytes = b.readBytes(length: b.readableBytes) ?? []
        #expect(bytes.count == 16)
        #expect(Array(bytes[0..<8]) == [0, 0, 0, 12, 1, 6, 0, 0])
        let sum = [UInt8](bytes[4..<8]).withUnsafeBytes { xxh3($0) }
        #expect(Array(bytes[8..<16]) == (0..<8).map { UInt8(truncatingIfNeeded: sum >> (8 * $0)) })
    }

    /// NIO's own check of a decoder: whole, byte by byte, and in random pieces, the same frames.
    @Test func theDecoderPassesNIOsVerifier() throws {
        // Byte by byte costs the verifier time in the square of a frame's size: small ones.
        let small = Self.frames.filter { $0.body.readableBytes < 4096 } + [LinkFrame(.records, body: ByteBuffer(bytes: Array(repeating: 7, count: 3000)))]
        let cases = small.map { f -> (ByteBuffer, [LinkFrame]) in (Self.encoded([f]), [f]) }
        try ByteToMessageDecoderVerifier.verifyDecoder(inputOutputPairs: cases) { LinkFrameDecoder() }
    }

    @Test func messagesRoundTrip() throws {
        var b = Self.encoded(Self.frames)
        var out: [LinkFrame] = []
        while let f = try b.readLinkFrame() { out.append(f) }
        #expect(out == Self.frames)
        #expect(try LinkHello(out[0]) == LinkHello(volumeUUID: Array(1...16), volumeSize: 1 << 30, blockSize: 4096, generation: 3, lastSeq: 1_000_000))
        #expect(try LinkSeq(out[1]) == LinkSeq(.welcome, seq: 42))
        #expect(try LinkRefusal(out[3]).reason == "unknown identity 0123abcd")
    }

    /// Every single-bit flip of an encoded frame is refused — by the length check, or the
    /// checksum (a flip in the length makes the frame end elsewhere: the checksum then covers
    /// other bytes, or more are awaited) — never decoded as another frame.
    @Test func everyBitFlipIsFound() throws {
        let original = Self.encoded([LinkSeq(.ack, seq: 0x0102_0304_0506_0708).frame])
        let bytes = original.getBytes(at: 0, length: original.readableBytes) ?? []
        for i in 0..<bytes.count * 8 {
            var damaged = bytes
            damaged[i / 8] ^= 1 << (i % 8)
            var b = ByteBuffer(bytes: damaged)
            do {
                if let f = try b.readLinkFrame() { Issue.record("bit \(i): decoded as \(f.kind)") }
            } catch is LinkFrameError {}
        }
    }

    @Test func badFramesAreNamed() throws {
        func error(_ bytes: [UInt8]) -> String {
            var b = ByteBuffer(bytes: bytes)
            do { _ = try b.readLinkFrame(); return "no error" } catch { return "\(error)" }
        }
        #expect(error([0xFF, 0xFF, 0xFF, 0xFF]) == "a frame of 4294967295 bytes, more than the \(LinkFrame.maxBodyBytes + 12) allowed")
        #expect(error([0, 0, 0, 3, 1, 2, 3]) == "a frame of 3 bytes, shorter than its header and checksum")
        // Well-formed except for one field each (checksums recomputed so only that field is wrong).
        func frame(version: UInt8 = 1, kind: UInt8 = 6, flags: UInt16 = 0) -> [UInt8] {
            var inner = [version, kind, UInt8(flags >> 8), UInt8(flags & 0xFF)]
            let sum = inner.withUnsafeBytes { xxh3($0) }
            inner += (0..<8).map { UInt8(truncatingIfNeeded: sum >> (8 * $0)) }
            return [0, 0, 0, 12] + inner
        }
        #expect(error(frame(version: 2)) == "frame version 2, this rewind speaks version 1")
        #expect(error(frame(kind: 99)) == "unknown frame type 99")
        #expect(error(frame(flags: 0x10)) == "frame flags 0x10 set, none are defined")
        #expect(error(Array(frame().dropLast())) == "no error")  // incomplete: more bytes awaited
        #expect(throws: LinkMessageError.malformed(.hello, bytes: 3)) { try LinkHello(LinkFrame(.hello, body: ByteBuffer(bytes: [1, 2, 3]))) }
        #expect(throws: LinkMessageError.unexpected(.ack, expected: .hello)) { try LinkHello(LinkSeq(.ack, seq: 1).frame) }
        #expect(throws: LinkMessageError.malformed(.refuse, bytes: 1)) { try LinkRefusal(LinkFrame(.refuse, body: ByteBuffer(bytes: [0xFF]))) }
    }

    /// The messages of inspection, catch-up and seeding a stale copy round-trip, and every
    /// cut or padded body, and random bodies, are refused as malformed — never a crash, never a
    /// message read from part of one.
    @Test func issue19MessagesRoundTripAndRefuseBadBodies() throws {
        let inspect = LinkInspect(volumeUUID: Array(1...16), volumeSize: 1 << 30, blockSize: 4096)
        let ready = LinkInspectReady(seq: 77, root: 0xDEAD_BEEF)
        let query = LinkTreeQuery(level: 3, parents: [0, 5, 1 << 40])
        let answer = LinkTreeAnswer(hashes: [1, 2, 3, UInt64.max])
        let begin = LinkCatchUpBegin(from: 10, seq: 99, timestamp: 123, runs: [CatchUpRun(0..<4), CatchUpRun(9..<1 << 30, zero: true)])
        #expect(try LinkInspect(inspect.frame) == inspect)
        #expect(try LinkInspectReady(ready.frame) == ready)
        #expect(try LinkTreeQuery(query.frame) == query)
        #expect(try LinkTreeAnswer(answer.frame) == answer)
        #expect(try LinkCatchUpBegin(begin.frame) == begin)
        #expect(try LinkCatchUpData.decodeEnd(LinkCatchUpData.endFrame(checksum: 42)) == 42)
        #expect(try LinkSeedData.decodeZero(LinkSeedData.zeroFrame(offset: 4096, length: 8192)) == (4096, 8192))
        let decoders: [(LinkFrame, (LinkFrame) throws -> Void)] = [
            (inspect.frame, { _ = try LinkInspect($0) }), (ready.frame, { _ = try LinkInspectReady($0) }),
            (query.frame, { _ = try LinkTreeQuery($0) }), (begin.frame, { _ = try LinkCatchUpBegin($0) }),
            (LinkCatchUpData.endFrame(checksum: 1), { _ = try LinkCatchUpData.decodeEnd($0) }),
            (LinkSeedData.zeroFrame(offset: 0, length: 1), { _ = try LinkSeedData.decodeZero($0) }),
        ]
        for (frame, decode) in decoders {
            let body = frame.body.getBytes(at: frame.body.readerIndex, length: frame.body.readableBytes) ?? []
            for cut in [body.count - 1, body.count + 1, 0] where cut >= 0 {
                var b = ByteBuffer(bytes: Array(body.prefix(cut)))
                if cut > body.count { b.writeInteger(UInt8(0)) }
                do {
                    try decode(LinkFrame(frame.kind, body: b))
                    Issue.record("\(frame.kind): a body of \(cut) bytes decoded")
                } catch let e as LinkMessageError {
                    #expect(e == .malformed(frame.kind, bytes: b.readableBytes))
                }
            }
        }
        // A tree answer is any multiple of 8 bytes up to its limit; a query names at most 4096 nodes.
        #expect(throws: LinkMessageError.self) { _ = try LinkTreeAnswer(LinkFrame(.treeAnswer, body: ByteBuffer(bytes: [1, 2, 3]))) }
        #expect(throws: LinkMessageError.self) { _ = try LinkTreeQuery(LinkTreeQuery(level: 1, parents: Array(0...4096)).frame) }
        var state: UInt64 = 0x1234_5678_9ABC_DEF1
        for _ in 0..<2000 {
            state ^= state << 13; state ^= state >> 7; state ^= state << 17
            let n = Int(state % 80)
            let bytes = (0..<n).map { _ in state ^= state << 13; state ^= state >> 7; state ^= state << 17; return UInt8(truncatingIfNeeded: state) }
            for (frame, decode) in decoders { try? decode(LinkFrame(frame.kind, body: ByteBuffer(bytes: bytes))) }
        }
    }

    /// Random bytes never crash the decoder nor make it buffer past its limit.
    @Test func randomBytesNeverCrash() {
        var state: UInt64 = 0x9E37_79B9_7F4A_7C15
        for _ in 0..<2000 {
            state ^= state << 13; state ^= state >> 7; state ^= state << 17
            let n = Int(state % 64)
            var b = ByteBuffer(bytes: (0..<n).map { _ in state ^= state << 13; state ^= state >> 7; state ^= state << 17; return UInt8(truncatingIfNeeded: state) })
            _ = try? b.readLinkFrame()
        }
    }
}

@Suite struct LinkAdmissionTests {
    let uuid = Array(UInt8(0x10)...UInt8(0x1F))
    var local: LinkVolume { LinkVolume(uuid: uuid, size: 1 << 30, blockSize: 4096, generation: 2, durableSeq: 500) }
    func hello(uuid: [UInt8]? = nil, size: UInt64 = 1 << 30, blockSize: UInt32 = 4096, generation: UInt64 = 2, lastSeq: UInt64 = 900) -> LinkHello {
        LinkHello(volumeUUID: uuid ?? self.uuid, volumeSize: size, blockSize: blockSize, generation: generation, lastSeq: lastSeq)
    }
    func refusal(_ frame: LinkFrame) -> String? { (try? LinkRefusal(frame))?.reason }

    @Test func theSameVolumeResumesAfterTheDurableSeq() throws {
        #expect(try LinkSeq(LinkAdmission.answer(hello(), local: local)) == LinkSeq(.welcome, seq: 500))
        var promoted = hello(generation: 3, lastSeq: 900)
        promoted.generationStart = 500
        #expect(try LinkSeq(LinkAdmission.answer(promoted, local: local)) == LinkSeq(.welcome, seq: 500))
        promoted.generationStart = 499
        #expect(refusal(LinkAdmission.answer(promoted, local: local))
                == "the sender's generation 3 continues from seq:499, and this mirror holds records after it (to seq:500) from generation 2: they have diverged; move this mirror aside and let it be seeded again")
        #expect(LinkAdmission.answer(hello(), local: nil) == LinkFrame(.needSeed))
    }

    @Test func everyMismatchIsRefusedWithItsReason() {
        #expect(refusal(LinkAdmission.answer(hello(uuid: Array(repeating: 0xAB, count: 16)), local: local))
                == "the sender offers volume abababab-abab-abab-abab-abababababab, this mirror holds 10111213-1415-1617-1819-1a1b1c1d1e1f")
        #expect(refusal(LinkAdmission.answer(hello(size: 1 << 20), local: local))
                == "the sender's volume is 1048576 bytes in blocks of 4096, this mirror's 1073741824 in blocks of 4096")
        #expect(refusal(LinkAdmission.answer(hello(blockSize: 512), local: local))
                == "the sender's volume is 1073741824 bytes in blocks of 512, this mirror's 1073741824 in blocks of 4096")
        #expect(refusal(LinkAdmission.answer(hello(generation: 1), local: local))
                == "the sender is at generation 1, this mirror at 2: it is a former origin (a failover happened since); make it a receiver of the new origin")
        #expect(refusal(LinkAdmission.answer(hello(lastSeq: 499), local: local))
                == "the sender's journal ends at seq:499, before this mirror's seq:500: they have diverged")
    }
}
