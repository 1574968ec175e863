import NIOCore

/// A transmission-phase request header (28 bytes):
/// ```
/// 0  u32 magic 0x25609513   8  u64 cookie
/// 4  u16 flags              16 u64 offset
/// 6  u16 type               24 u32 length
/// ```
/// followed by `length` payload bytes for NBD_CMD_WRITE.
public struct NBDRequestHeader: Sendable, Equatable {
    public static let size = 28
    public var flags: UInt16
    public var type: UInt16
    public var cookie: UInt64
    public var offset: UInt64
    public var length: UInt32

    /// Parse from the front of `buffer`; nil if fewer than 28 bytes are there.
    /// Throws `badMagic` when the magic is wrong: the stream cannot be resynchronised.
    static func read(from buffer: inout ByteBuffer) throws -> NBDRequestHeader? {
        guard buffer.readableBytes >= size, let magic: UInt32 = buffer.readInteger() else { return nil }
        guard magic == NBD.requestMagic else { throw NBDProtocolError.badRequestMagic(magic) }
        guard let flags: UInt16 = buffer.readInteger(), let type: UInt16 = buffer.readInteger(),
              let cookie: UInt64 = buffer.readInteger(), let offset: UInt64 = buffer.readInteger(),
              let length: UInt32 = buffer.readInteger() else { return nil }
        return NBDRequestHeader(flags: flags, type: type, cookie: cookie, offset: offset, length: length)
    }

    /// Does this request carry a payload on the wire? Only WRITE does (a refused WRITE's
    /// payload must still be read and discarded).
    var hasPayload: Bool { type == NBDCommand.write.rawValue }
}

/// Faults that end a connection: the peer broke the protocol so badly that no reply can be sent.
public enum NBDProtocolError: Error, CustomStringConvertible {
    case badRequestMagic(UInt32)
    case badOptionMagic(UInt64)
    case unknownClientFlags(UInt32)
    case tooManyOptions
    case handshakeTimeout
    case abort

    public var description: String {
        switch self {
        case let .badRequestMagic(m): "bad request magic 0x\(String(m, radix: 16))"
        case let .badOptionMagic(m): "bad option magic 0x\(String(m, radix: 16))"
        case let .unknownClientFlags(f): "unknown client flags 0x\(String(f, radix: 16))"
        case .tooManyOptions: "more than \(NBD.maxOptions) options"
        case .handshakeTimeout: "handshake deadline passed"
        case .abort: "client aborted"
        }
    }
}

/// What a validated request asks for. The layers below never see a malformed request:
/// `validate` (nbdkit's `validate_request`, done once at the edge) turns every fault into
/// the errno the NBD spec names.
public enum NBDValidatedCommand: Sendable {
    case read(offset: UInt64, length: UInt32, df: Bool)
    case write(offset: UInt64, fua: Bool)
    case writeZeroes(offset: UInt64, length: UInt32, fua: Bool, noHole: Bool, fastZero: Bool)
    case trim(offset: UInt64, length: UInt32, fua: Bool)
    case flush
    case cache(offset: UInt64, length: UInt32)
    case blockStatus(offset: UInt64, length: UInt32, reqOne: Bool)
    case disconnect
}

struct NBDValidationContext {
    var size: UInt64
    var readOnly: Bool
    var structuredReplies: Bool
    var metaContextNegotiated: Bool
}

/// Check one request: command known, flags allowed for it, range inside the export without
/// overflow, size within limits. Returns the wire errno to answer with on failure.
func validate(_ h: NBDRequestHeader, _ ctx: NBDValidationContext) -> Result<NBDValidatedCommand, NBDErrno> {
    guard let command = NBDCommand(rawValue: h.type) else { return .failure(.inval) }
    let flags = NBDCommandFlags(rawValue: h.flags)
    let known: NBDCommandFlags = [.fua, .noHole, .df, .reqOne, .fastZero]
    guard known.isSuperset(of: flags) else { return .failure(.inval) }
    // FUA is valid on every command (SEND_FUA is advertised); the others belong to one each.
    var allowed: NBDCommandFlags = [.fua]
    switch command {
    case .read: if ctx.structuredReplies { allowed.insert(.df) }
    case .writeZeroes: allowed.formUnion([.noHole, .fastZero])
    case .blockStatus: allowed.insert(.reqOne)
    default: break
    }
    guard allowed.isSuperset(of: flags) else { return .failure(.inval) }
    let isWrite = command == .write || command == .writeZeroes || command == .trim
    if isWrite && ctx.readOnly { return .failure(.perm) }
    // Over the advertised maximum block size: a protocol violation whatever the range.
    if (command == .read || command == .write) && Int(h.length) > NBD.maxPayloadBytes { return .failure(.inval) }
    switch command {
    case .flush, .disconnect:
        guard h.offset == 0 && h.length == 0 else { return .failure(.inval) }
    default:
        let length = UInt64(h.length)
        guard h.offset <= ctx.size, length <= ctx.size - h.offset else { return .failure(isWrite ? .nospc : .inval) }
    }
    let fua = flags.contains(.fua)
    switch command {
    case .read:
        return .success(.read(offset: h.offset, length: h.length, df: flags.contains(.df)))
    case .write:
        return .success(.write(offset: h.offset, fua: fua))
    case .writeZeroes:
        return .success(.writeZeroes(offset: h.offset, length: h.length, fua: fua, noHole: flags.contains(.noHole),
                                     fastZero: flags.contains(.fastZero)))
    case .trim: return .success(.trim(offset: h.offset, length: h.length, fua: fua))
    case .flush: return .success(.flush)
    case .cache: return .success(.cache(offset: h.offset, length: h.length))
    case .blockStatus:
        guard ctx.metaContextNegotiated else { return .failure(.inval) }
        guard h.length > 0 else { return .failure(.inval) }
        return .success(.blockStatus(offset: h.offset, length: h.length, reqOne: flags.contains(.reqOne)))
    case .disconnect: return .success(.disconnect)
    }
}
