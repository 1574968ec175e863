import NIOCore
import RewindCore

/// One frame of the replication link (docs/formats.md, "Replication link"): length-prefixed,
/// typed, versioned and checksummed, so a corrupted byte anywhere is found and the link reset.
///
/// ```
/// 0   4  length: bytes after this field (header rest + body + checksum), big-endian
/// 4   1  version (LinkFrame.version)
/// 5   1  type (LinkFrame.Kind)
/// 6   2  flags (0; reserved)
/// 8   n  body
/// 8+n 8  XXH3-64 of bytes 4..<8+n (version, type, flags, body), little-endian
/// ```
public struct LinkFrame: Sendable, Equatable {
    public enum Kind: UInt8, Sendable, CaseIterable {
        /// Sender → receiver, first: who and what is offered (`LinkHello`).
        case hello = 1
        /// Receiver → sender: accepted, and the seq it holds durably (resume from after it).
        case welcome = 2
        /// Either way: refused, with a reason (UTF-8); the link closes after it.
        case refuse = 3
        /// Sender → receiver: a batch of journal records.
        case records = 4
        /// Receiver → sender: every record up to this seq is durable here.
        case ack = 5
        /// Either way, when idle: the peer is alive.
        case keepalive = 6
        /// Receiver → sender, instead of `welcome`: no mirror here yet; seed one.
        case needSeed = 7
        /// Sender → receiver: a seed follows (`LinkSeedBegin`): the volume as of the horizon.
        case seedBegin = 8
        /// Sender → receiver: base data at an offset (`LinkSeedData`); holes are not sent.
        case seedData = 9
        /// Sender → receiver: the seed is complete (bytes sent); the receiver acks the horizon.
        case seedEnd = 10
        /// Client → receiver, first on an inspection connection (`LinkInspect`): compare, do not
        /// stream; the receiver's applier never sees it.
        case inspect = 11
        /// Receiver → client: the point it compares at and its tree's root (`LinkInspectReady`).
        case inspectReady = 12
        /// Client → receiver: the children of these nodes of one level, please (`LinkTreeQuery`).
        case treeQuery = 13
        /// Receiver → client: those children's hashes, in order (`LinkTreeAnswer`).
        case treeAnswer = 14
        /// Sender → receiver: a catch-up follows (`LinkCatchUpBegin`): the blocks the records
        /// it lacks changed, as of the sender's horizon, applied as one point.
        case catchUpBegin = 15
        /// Sender → receiver: data blocks of the catch-up, in run order.
        case catchUpData = 16
        /// Sender → receiver: the catch-up is complete (its checksum); the receiver acks its seq.
        case catchUpEnd = 17
        /// Sender → receiver, while seeding a stale copy: this range reads as zeros.
        case seedZero = 18
    }

    public static let version: UInt8 = 1
    /// Header after the length field, and the checksum: what a frame adds to its body.
    public static let overheadBytes = 4 + 4 + 8
    /// Largest body: a batch of records up to 64 MiB of payload, with room for their headers.
    public static let maxBodyBytes = (64 << 20) + (1 << 20)

    public var kind: Kind
    public var body: ByteBuffer

    public init(_ kind: Kind, body: ByteBuffer = ByteBuffer()) {
        self.kind = kind
        self.body = body
    }
}

/// Why bytes from a peer are not a frame. The link is reset on any of them.
public enum LinkFrameError: Error, Equatable, CustomStringConvertible {
    case tooLong(UInt32)
    case tooShort(UInt32)
    case unknownVersion(UInt8)
    case unknownKind(UInt8)
    case flagsSet(UInt16)
    case checksumMismatch(expected: UInt64, found: UInt64)

    public var description: String {
        switch self {
        case let .tooLong(n): "a frame of \(n) bytes, more than the \(LinkFrame.maxBodyBytes + LinkFrame.overheadBytes - 4) allowed"
        case let .tooShort(n): "a frame of \(n) bytes, shorter than its header and checksum"
        case let .unknownVersion(v): "frame version \(v), this rewind speaks version \(LinkFrame.version)"
        case let .unknownKind(k): "unknown frame type \(k)"
        case let .flagsSet(f): "frame flags 0x\(String(f, radix: 16)) set, none are defined"
        case let .checksumMismatch(expected, found):
            "frame checksum mismatch (computed 0x\(String(expected, radix: 16)), carried 0x\(String(found, radix: 16))): damaged on the way"
        }
    }
}

extension ByteBuffer {
    /// Append `frame`, encoded.
    public mutating func writeLinkFrame(_ frame: LinkFrame) {
        writeInteger(UInt32(frame.body.readableBytes + LinkFrame.overheadBytes - 4))
        let start = writerIndex
        writeInteger(LinkFrame.version)
        writeInteger(frame.kind.rawValue)
        writeInteger(UInt16(0))
        var body = frame.body
        writeBuffer(&body)
        let sum = withUnsafeReadableBytes { raw in xxh3(UnsafeRawBufferPointer(rebasing: raw[(start - readerIndex)...])) }
        writeInteger(sum, endianness: .little)
    }

    /// The next whole frame, or nil when more bytes are needed. Throws on a bad frame; the
    /// length is checked before anything is buffered, so a hostile length costs nothing.
    public mutating func readLinkFrame() throws -> LinkFrame? {
        guard let length: UInt32 = getInteger(at: readerIndex) else { return nil }
        guard Int(length) <= LinkFrame.maxBodyBytes + LinkFrame.overheadBytes - 4 else { throw LinkFrameError.tooLong(length) }
        guard Int(length) >= LinkFrame.overheadBytes - 4 else { throw LinkFrameError.tooShort(length) }
        guard readableBytes >= 4 + Int(length) else { return nil }
        let start = readerIndex + 4, checked = Int(length) - 8
        let expected = withUnsafeReadableBytes { raw in xxh3(UnsafeRawBufferPointer(rebasing: raw[4..<4 + checked])) }
        let found: UInt64 = getInteger(at: start + checked, endianness: .little) ?? 0
        guard expected == found else { throw LinkFrameError.checksumMismatch(expected: expected, found: found) }
        let version: UInt8 = getInteger(at: start) ?? 0
        guard version == LinkFrame.version else { throw LinkFrameError.unknownVersion(version) }
        let rawKind: UInt8 = getInteger(at: start + 1) ?? 0
        guard let kind = LinkFrame.Kind(rawValue: rawKind) else { throw LinkFrameError.unknownKind(rawKind) }
        let flags: UInt16 = getInteger(at: start + 2) ?? 0
        guard flags == 0 else { throw LinkFrameError.flagsSet(flags) }
        let body = getSlice(at: start + 4, length: checked - 4) ?? ByteBuffer()
        moveReaderIndex(forwardBy: 4 + Int(length))
        return LinkFrame(kind, body: body)
    }
}

/// Frames out of a byte stream, for a NIO pipeline (`ByteToMessageHandler(LinkFrameDecoder())`).
public struct LinkFrameDecoder: NIOSingleStepByteToMessageDecoder {
    public typealias InboundOut = LinkFrame
    public init() {}
    public mutating func decode(buffer: inout ByteBuffer) throws -> LinkFrame? { try buffer.readLinkFrame() }
    public mutating func decodeLast(buffer: inout ByteBuffer, seenEOF: Bool) throws -> LinkFrame? { try decode(buffer: &buffer) }
}

/// Frames into bytes, for a NIO pipeline (`MessageToByteHandler(LinkFrameEncoder())`).
public struct LinkFrameEncoder: MessageToByteEncoder {
    public typealias OutboundIn = LinkFrame
    public init() {}
    public func encode(data: LinkFrame, out: inout ByteBuffer) throws { out.writeLinkFrame(data) }
}
