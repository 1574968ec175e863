import NIOCore
import RewindCore

/// `records`: a batch of journal records in seq order.
///
/// ```
/// 0  4  count
/// then per record:
///  0  8  seq
///  8  8  timestamp (ns since 1970)
/// 16  1  kind (ChangeKind)
/// 17  1  flags (bit 0: FUA)
/// 18  2  0
/// 20  4  payload bytes
/// 24  8  offset
/// 32  8  length
/// 40  8  checksum (XXH3-64 over the payload's block XXH3-64s; 0 without payload)
/// 48  n  payload: the record's stored blocks
/// ```
/// Integers big-endian.
public enum LinkRecords {
    public static let recordHeaderBytes = 48

    public static func frame(_ records: [ReplicatedRecord]) -> LinkFrame {
        var b = ByteBuffer()
        b.reserveCapacity(4 + records.reduce(0) { $0 + recordHeaderBytes + $1.payload.count })
        b.writeInteger(UInt32(records.count))
        for r in records {
            b.writeInteger(r.seq)
            b.writeInteger(r.timestamp)
            b.writeInteger(r.kind.rawValue)
            b.writeInteger(UInt8(r.fua ? 1 : 0))
            b.writeInteger(UInt16(0))
            b.writeInteger(UInt32(r.payload.count))
            b.writeInteger(r.offset)
            b.writeInteger(r.length)
            b.writeInteger(r.checksum)
            b.writeBytes(r.payload)
        }
        return LinkFrame(.records, body: b)
    }

    /// The records of a `records` frame; their contents are checked when they are stored
    /// (`JournalWriter.appendReplicated`), their layout here.
    public static func decode(_ frame: LinkFrame) throws -> [ReplicatedRecord] {
        guard frame.kind == .records else { throw LinkMessageError.unexpected(frame.kind, expected: .records) }
        var b = frame.body
        let total = b.readableBytes
        guard let count: UInt32 = b.readInteger(), Int(count) <= b.readableBytes / recordHeaderBytes else {
            throw LinkMessageError.malformed(.records, bytes: total)
        }
        var out: [ReplicatedRecord] = []
        out.reserveCapacity(Int(count))
        for _ in 0..<count {
            guard let seq: UInt64 = b.readInteger(), let time: UInt64 = b.readInteger(), let k: UInt8 = b.readInteger(),
                  let flags: UInt8 = b.readInteger(), let pad: UInt16 = b.readInteger(), let n: UInt32 = b.readInteger(),
                  let offset: UInt64 = b.readInteger(), let length: UInt64 = b.readInteger(), let sum: UInt64 = b.readInteger(),
                  let kind = ChangeKind(rawValue: k), flags & ~1 == 0, pad == 0,
                  let payload = b.readBytes(length: Int(n)) else {
                throw LinkMessageError.malformed(.records, bytes: total)
            }
            out.append(ReplicatedRecord(seq: seq, timestamp: time, kind: kind, fua: flags & 1 != 0, offset: offset,
                                        length: length, checksum: sum, payload: payload))
        }
        guard b.readableBytes == 0 else { throw LinkMessageError.malformed(.records, bytes: total) }
        return out
    }
}

/// `seedBegin`: the seed's volume (`ReplicaSeed`).
///
/// ```
///  0 16 volume UUID      16 8 size        24 4 block size   28 8 generation
/// 36  8 horizon seq      44 8 its time    52 8 created       60 8 payload bytes up to the horizon
/// ```
public enum LinkSeedBegin {
    public static let bodyBytes = 68

    public static func frame(_ s: ReplicaSeed) -> LinkFrame {
        var b = ByteBuffer()
        b.writeBytes(s.uuid.count == 16 ? s.uuid : [UInt8](repeating: 0, count: 16))
        b.writeInteger(s.volumeSize)
        b.writeInteger(s.blockSize)
        for v in [s.generation, s.horizon, s.horizonTime, s.createdTime, s.horizonCumulative] { b.writeInteger(v) }
        return LinkFrame(.seedBegin, body: b)
    }

    public static func decode(_ frame: LinkFrame) throws -> ReplicaSeed {
        guard frame.kind == .seedBegin else { throw LinkMessageError.unexpected(frame.kind, expected: .seedBegin) }
        var b = frame.body
        guard b.readableBytes == bodyBytes, let uuid = b.readBytes(length: 16), let size: UInt64 = b.readInteger(),
              let bs: UInt32 = b.readInteger(), let gen: UInt64 = b.readInteger(), let horizon: UInt64 = b.readInteger(),
              let time: UInt64 = b.readInteger(), let created: UInt64 = b.readInteger(), let cum: UInt64 = b.readInteger() else {
            throw LinkMessageError.malformed(.seedBegin, bytes: frame.body.readableBytes)
        }
        return ReplicaSeed(uuid: uuid, volumeSize: size, blockSize: bs, generation: gen, horizon: horizon,
                           horizonTime: time, createdTime: created, horizonCumulative: cum)
    }
}

/// `seedData`: u64 offset, then the bytes of base.img there. `seedEnd`: u64 bytes sent in all.
public enum LinkSeedData {
    public static func frame(offset: UInt64, bytes: UnsafeRawBufferPointer) -> LinkFrame {
        var b = ByteBuffer()
        b.reserveCapacity(8 + bytes.count)
        b.writeInteger(offset)
        b.writeBytes(bytes)
        return LinkFrame(.seedData, body: b)
    }

    public static func decode(_ frame: LinkFrame) throws -> (offset: UInt64, bytes: ByteBuffer) {
        guard frame.kind == .seedData else { throw LinkMessageError.unexpected(frame.kind, expected: .seedData) }
        var b = frame.body
        guard let offset: UInt64 = b.readInteger() else { throw LinkMessageError.malformed(.seedData, bytes: frame.body.readableBytes) }
        return (offset, b)
    }

    /// `seedZero`: a range that reads as zeros in the seed (offset, length).
    public static func zeroFrame(offset: UInt64, length: UInt64) -> LinkFrame {
        var b = ByteBuffer()
        b.writeInteger(offset)
        b.writeInteger(length)
        return LinkFrame(.seedZero, body: b)
    }

    public static func decodeZero(_ frame: LinkFrame) throws -> (offset: UInt64, length: UInt64) {
        guard frame.kind == .seedZero else { throw LinkMessageError.unexpected(frame.kind, expected: .seedZero) }
        var b = frame.body
        guard b.readableBytes == 16, let offset: UInt64 = b.readInteger(), let length: UInt64 = b.readInteger() else {
            throw LinkMessageError.malformed(.seedZero, bytes: frame.body.readableBytes)
        }
        return (offset, length)
    }

    public static func endFrame(bytesSent: UInt64) -> LinkFrame {
        var b = ByteBuffer()
        b.writeInteger(bytesSent)
        return LinkFrame(.seedEnd, body: b)
    }

    public static func decodeEnd(_ frame: LinkFrame) throws -> UInt64 {
        guard frame.kind == .seedEnd else { throw LinkMessageError.unexpected(frame.kind, expected: .seedEnd) }
        var b = frame.body
        guard b.readableBytes == 8, let n: UInt64 = b.readInteger() else {
            throw LinkMessageError.malformed(.seedEnd, bytes: frame.body.readableBytes)
        }
        return n
    }
}
