import NIOCore

/// A transmission-phase reply as a client reads it (`NBDReplyDecoder`).
public enum NBDReply: Equatable, Sendable {
    /// A simple reply: `error` 0 for success; a successful READ's data follows it on the wire.
    case simple(cookie: UInt64, error: UInt32, data: ByteBuffer?)
    /// One chunk of a structured reply.
    case chunk(NBDReplyChunk)

    public var cookie: UInt64 {
        switch self {
        case let .simple(cookie, _, _): cookie
        case let .chunk(c): c.cookie
        }
    }
}

/// A structured reply chunk: 20-byte header (u32 magic, u16 flags, u16 type, u64 cookie,
/// u32 length), then `length` bytes of payload.
public struct NBDReplyChunk: Equatable, Sendable {
    public var cookie: UInt64
    /// NBD_REPLY_FLAG_DONE: the last chunk of this cookie's reply.
    public var done: Bool
    public var type: UInt16
    public var payload: ByteBuffer

    public init(cookie: UInt64, done: Bool, type: UInt16, payload: ByteBuffer) {
        self.cookie = cookie
        self.done = done
        self.type = type
        self.payload = payload
    }

    static let headerSize = 20
    /// NBD_REPLY_TYPE_ERROR and the other error types have bit 15 set.
    public var isError: Bool { type & 0x8000 != 0 }
}

/// Faults in what a server sent that end the connection.
public enum NBDReplyError: Error, Equatable, CustomStringConvertible {
    case badMagic(UInt32)
    case chunkTooLong(cookie: UInt64, length: UInt32)

    public var description: String {
        switch self {
        case let .badMagic(m): "a reply with bad magic 0x\(String(m, radix: 16))"
        case let .chunkTooLong(cookie, length): "a reply chunk of \(length) bytes for cookie \(cookie), more than \(NBDReplyDecoder.maxChunkBytes) allowed"
        }
    }
}

/// Decodes a server's transmission-phase byte stream into `NBDReply`s. A simple reply to a
/// READ carries the data without saying how long it is: `readLength(cookie)` gives the length
/// of the READ in flight under that cookie (nil: that cookie is no READ), as only the client
/// knows. Chunks are bounded (`maxChunkBytes`), so a lying server cannot make it buffer
/// without end.
public struct NBDReplyDecoder: ByteToMessageDecoder {
    public typealias InboundOut = NBDReply

    /// A READ's data plus its offset, and some room for the longest error message.
    public static let maxChunkBytes = NBD.maxPayloadBytes + 64 * 1024

    let readLength: (UInt64) -> Int?

    public init(readLength: @escaping (UInt64) -> Int?) {
        self.readLength = readLength
    }

    public mutating func decode(context: ChannelHandlerContext, buffer: inout ByteBuffer) throws -> DecodingState {
        guard let reply = try Self.next(from: &buffer, readLength: readLength) else { return .needMoreData }
        context.fireChannelRead(wrapInboundOut(reply))
        return .continue
    }

    public mutating func decodeLast(context: ChannelHandlerContext, buffer: inout ByteBuffer, seenEOF: Bool) throws -> DecodingState {
        while let reply = try Self.next(from: &buffer, readLength: readLength) {
            context.fireChannelRead(wrapInboundOut(reply))
        }
        return .needMoreData
    }

    /// The next whole reply at the front of `buffer` (consumed), or nil until more arrives.
    static func next(from buffer: inout ByteBuffer, readLength: (UInt64) -> Int?) throws -> NBDReply? {
        let at = buffer.readerIndex
        guard let magic: UInt32 = buffer.getInteger(at: at) else { return nil }
        switch magic {
        case NBD.simpleReplyMagic:
            guard buffer.readableBytes >= 16, let error: UInt32 = buffer.getInteger(at: at + 4),
                  let cookie: UInt64 = buffer.getInteger(at: at + 8) else { return nil }
            if error == 0, let n = readLength(cookie) {
                guard buffer.readableBytes >= 16 + n else { return nil }
                buffer.moveReaderIndex(forwardBy: 16)
                return .simple(cookie: cookie, error: 0, data: buffer.readSlice(length: n))
            }
            buffer.moveReaderIndex(forwardBy: 16)
            return .simple(cookie: cookie, error: error, data: nil)
        case NBD.structuredReplyMagic:
            guard buffer.readableBytes >= NBDReplyChunk.headerSize, let flags: UInt16 = buffer.getInteger(at: at + 4),
                  let type: UInt16 = buffer.getInteger(at: at + 6), let cookie: UInt64 = buffer.getInteger(at: at + 8),
                  let length: UInt32 = buffer.getInteger(at: at + 16) else { return nil }
            guard Int(length) <= maxChunkBytes else { throw NBDReplyError.chunkTooLong(cookie: cookie, length: length) }
            guard buffer.readableBytes >= NBDReplyChunk.headerSize + Int(length) else { return nil }
            buffer.moveReaderIndex(forwardBy: NBDReplyChunk.headerSize)
            guard let payload = buffer.readSlice(length: Int(length)) else { return nil }
            return .chunk(NBDReplyChunk(cookie: cookie, done: flags & 1 != 0, type: type, payload: payload))
        default:
            throw NBDReplyError.badMagic(magic)
        }
    }
}

extension ByteBuffer {
    /// A transmission request (28-byte header, then a WRITE's payload): what a client sends.
    public mutating func writeNBDRequest(_ h: NBDRequestHeader, payload: ByteBuffer? = nil) {
        writeInteger(NBD.requestMagic)
        writeInteger(h.flags)
        writeInteger(h.type)
        writeInteger(h.cookie)
        writeInteger(h.offset)
        writeInteger(h.length)
        if var payload { writeBuffer(&payload) }
    }
}
