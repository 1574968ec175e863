import NIOCore

/// What a client sends, as typed messages: its flags, each option with its data whole, each
/// request with a WRITE's payload whole. The server's decoder; `NBDConnectionHandler` sets
/// `phase` as the handshake (`NBDServerHandshake`) moves on, since only the server's answer to
/// NBD_OPT_GO says whether options or requests follow.
///
/// - A WRITE's payload is copied once, from the buffers the socket's reads filled straight into
///   the array the volume takes (not into an accumulation buffer first): a large WRITE arrives
///   over many reads, and each is consumed as it comes.
/// - Bounded: an option's data over `NBD.maxOptionBytes` and a WRITE's payload over
///   `NBD.maxPayloadBytes` are read and discarded, never held (`oversizedOption`; a request
///   with a nil payload, which validation refuses).
/// - A bad magic throws: the stream cannot be resynchronised.
public struct NBDServerFramer {
    public enum Phase: Equatable, Sendable {
        case clientFlags
        case options
        case transmission
    }

    public enum Message: Equatable {
        case clientFlags(UInt32)
        case option(UInt32, data: ByteBuffer)
        /// An option whose data was longer than `NBD.maxOptionBytes`: discarded.
        case oversizedOption(UInt32)
        /// A request; a WRITE's payload whole, nil when it was over `NBD.maxPayloadBytes`
        /// (discarded) or the request is not a WRITE.
        case request(NBDRequestHeader, payload: [UInt8]?)
    }

    public var phase: Phase
    private enum Partial {
        case none
        case discardOption(UInt32, remaining: UInt64)
        /// Filling `payload` for this header (kept outside the enum: filled in place).
        case payload(NBDRequestHeader)
        case discardPayload(NBDRequestHeader, remaining: UInt64)
    }
    private var partial = Partial.none
    private var payload: [UInt8] = []
    private var payloadFilled = 0

    public init(phase: Phase = .clientFlags) { self.phase = phase }

    /// The next whole message at the front of `input` (consumed), or nil until more bytes come.
    public mutating func next(_ input: inout ByteBuffer) throws -> Message? {
        while true {
            switch partial {
            case let .discardOption(option, remaining):
                let n = min(UInt64(input.readableBytes), remaining)
                input.moveReaderIndex(forwardBy: Int(n))
                guard n == remaining else { partial = .discardOption(option, remaining: remaining - n); return nil }
                partial = .none
                return .oversizedOption(option)
            case let .discardPayload(header, remaining):
                let n = min(UInt64(input.readableBytes), remaining)
                input.moveReaderIndex(forwardBy: Int(n))
                guard n == remaining else { partial = .discardPayload(header, remaining: remaining - n); return nil }
                partial = .none
                return .request(header, payload: nil)
            case let .payload(header):
                let n = min(input.readableBytes, payload.count - payloadFilled)
                if n > 0 {
                    input.readWithUnsafeReadableBytes { src in
                        payload.withUnsafeMutableBytes { dst in
                            UnsafeMutableRawBufferPointer(rebasing: dst[payloadFilled..<payloadFilled + n])
                                .copyMemory(from: UnsafeRawBufferPointer(rebasing: src[0..<n]))
                        }
                        return n
                    }
                    payloadFilled += n
                }
                guard payloadFilled == payload.count else { return nil }
                partial = .none
                let data = payload
                payload = []
                return .request(header, payload: data)
            case .none:
                return try nextWhole(&input)
            }
        }
    }

    private mutating func nextWhole(_ input: inout ByteBuffer) throws -> Message? {
        switch phase {
        case .clientFlags:
            guard let flags: UInt32 = input.readInteger() else { return nil }
            phase = .options  // options always follow
            return .clientFlags(flags)
        case .options:
            var peek = input
            guard let header = try NBDOptionHeader.read(from: &peek) else { return nil }
            if header.length > UInt32(NBD.maxOptionBytes) {
                input = peek
                partial = .discardOption(header.option, remaining: UInt64(header.length))
                return try next(&input)
            }
            guard let data = peek.readSlice(length: Int(header.length)) else { return nil }
            input = peek
            return .option(header.option, data: data)
        case .transmission:
            var peek = input
            guard let header = try NBDRequestHeader.read(from: &peek) else { return nil }
            input = peek
            guard header.hasPayload else { return .request(header, payload: nil) }
            if Int(header.length) > NBD.maxPayloadBytes {
                partial = .discardPayload(header, remaining: UInt64(header.length))
            } else {
                payload = [UInt8](unsafeUninitializedCapacity: Int(header.length)) { _, n in n = Int(header.length) }
                payloadFilled = 0
                partial = .payload(header)
            }
            return try next(&input)
        }
    }
}

/// The framer as a SwiftNIO decoder, in one phase (for `ByteToMessageDecoderVerifier`).
extension NBDServerFramer: ByteToMessageDecoder {
    public typealias InboundOut = Message

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let message = try next(&buffer) else { return .needMoreData }
        context.fireChannelRead(NIOAny(message))
        return .continue
    }

    public mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        try decode(context: context, buffer: &buffer)
    }
}
