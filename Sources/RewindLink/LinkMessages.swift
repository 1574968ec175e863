import NIOCore

/// The volume a sender offers, first on every connection: the receiver checks it against its
/// own mirror (same UUID, size and block size; a generation not older than its own) before it
/// writes anything, and answers `welcome` with the seq it holds durably — the sender resumes
/// after it, so a reconnect neither loses nor repeats a record.
public struct LinkHello: Sendable, Equatable {
    public var volumeUUID: [UInt8]
    public var volumeSize: UInt64
    public var blockSize: UInt32
    /// Raised by every failover (`promote`): an old origin's stream is refused.
    public var generation: UInt64
    /// The sender's newest seq: what it can offer.
    public var lastSeq: UInt64
    /// The seq its generation began at (the point a promote or rollback continued from): a
    /// receiver of an older generation holding records after it has diverged.
    public var generationStart: UInt64

    public static let bodyBytes = 16 + 8 + 4 + 8 + 8 + 8

    public init(volumeUUID: [UInt8], volumeSize: UInt64, blockSize: UInt32, generation: UInt64, lastSeq: UInt64,
                generationStart: UInt64 = 0) {
        self.volumeUUID = volumeUUID
        self.volumeSize = volumeSize
        self.blockSize = blockSize
        self.generation = generation
        self.lastSeq = lastSeq
        self.generationStart = generationStart
    }

    public var frame: LinkFrame {
        var b = ByteBuffer()
        b.writeBytes(volumeUUID.count == 16 ? volumeUUID : [UInt8](repeating: 0, count: 16))
        b.writeInteger(volumeSize)
        b.writeInteger(blockSize)
        b.writeInteger(generation)
        b.writeInteger(lastSeq)
        b.writeInteger(generationStart)
        return LinkFrame(.hello, body: b)
    }

    public init(_ frame: LinkFrame) throws {
        guard frame.kind == .hello else { throw LinkMessageError.unexpected(frame.kind, expected: .hello) }
        var b = frame.body
        guard b.readableBytes == Self.bodyBytes, let uuid = b.readBytes(length: 16), let size: UInt64 = b.readInteger(),
              let bs: UInt32 = b.readInteger(), let gen: UInt64 = b.readInteger(), let last: UInt64 = b.readInteger(),
              let start: UInt64 = b.readInteger() else {
            throw LinkMessageError.malformed(.hello, bytes: frame.body.readableBytes)
        }
        self.init(volumeUUID: uuid, volumeSize: size, blockSize: bs, generation: gen, lastSeq: last, generationStart: start)
    }
}

/// A frame that carries one seq: `welcome` (the receiver's durable seq) and `ack`.
public struct LinkSeq: Sendable, Equatable {
    public var kind: LinkFrame.Kind
    public var seq: UInt64

    public init(_ kind: LinkFrame.Kind, seq: UInt64) {
        self.kind = kind
        self.seq = seq
    }

    public var frame: LinkFrame {
        var b = ByteBuffer()
        b.writeInteger(seq)
        return LinkFrame(kind, body: b)
    }

    public init(_ frame: LinkFrame) throws {
        guard frame.kind == .welcome || frame.kind == .ack else { throw LinkMessageError.unexpected(frame.kind, expected: .ack) }
        var b = frame.body
        guard b.readableBytes == 8, let seq: UInt64 = b.readInteger() else {
            throw LinkMessageError.malformed(frame.kind, bytes: frame.body.readableBytes)
        }
        self.init(frame.kind, seq: seq)
    }
}

/// `refuse`: why the peer will not go on (its one log line), at most 1 KiB of UTF-8.
public struct LinkRefusal: Sendable, Equatable {
    public var reason: String
    public static let maxBytes = 1024

    public init(_ reason: String) { self.reason = reason }

    public var frame: LinkFrame {
        var b = ByteBuffer()
        b.writeBytes(reason.utf8.prefix(Self.maxBytes))
        return LinkFrame(.refuse, body: b)
    }

    public init(_ frame: LinkFrame) throws {
        guard frame.kind == .refuse else { throw LinkMessageError.unexpected(frame.kind, expected: .refuse) }
        var b = frame.body
        guard b.readableBytes <= Self.maxBytes, let bytes = b.readBytes(length: b.readableBytes),
              let text = String(validating: bytes, as: UTF8.self) else {
            throw LinkMessageError.malformed(.refuse, bytes: frame.body.readableBytes)
        }
        self.init(text)
    }
}

public enum LinkMessageError: Error, Equatable, CustomStringConvertible {
    case unexpected(LinkFrame.Kind, expected: LinkFrame.Kind)
    case malformed(LinkFrame.Kind, bytes: Int)

    public var description: String {
        switch self {
        case let .unexpected(kind, expected): "a \(kind) frame where a \(expected) frame was due"
        case let .malformed(kind, bytes): "a malformed \(kind) frame (\(bytes) bytes of body)"
        }
    }
}
