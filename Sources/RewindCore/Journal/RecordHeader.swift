/// A journal record as stored in the `records` database under its seq (u64 big-endian).
///
/// ```
/// offset size field
///  0     1    kind            ChangeKind raw value
///  1     1    flags           bit0 FUA
///  2     2    format          record format, 2
///  4     4    headerCheck     low 32 bits of XXH3-64 over bytes 0..<64 with this field zero,
///                             seeded with the record's seq (a header under another seq fails)
///  8     8    timestamp       wall-clock ns since 1970, never decreasing
/// 16     8    offset          byte offset the host wrote at
/// 24     8    length          byte length the host wrote
/// 32     8    checksum        XXH3-64 over the XXH3-64s of the stored blocks (0 when none)
/// 40     8    segment         key of the `segments` value holding the payload (0 = none)
/// 48     4    segmentOffset   where the payload starts in that segment; in a catch-up (whose
///                             segment is its payload's own position) the stored length's high
///                             32 bits, so one catch-up may hold more than 4 GiB
/// 52     4    storedLength    payload bytes (their low 32 bits, in a catch-up): the whole blocks
///                             the change touches (writes), or its partial head and tail blocks
///                             after zeroing (zero, trim)
/// 56     8    cumulative      payload bytes stored from the mirror's creation up to this record
/// ```
/// All integers little-endian. Format 1 (mirror format 2) checked the header without its seq.
public struct RecordHeader: Equatable, Sendable {
    public static let size = 64
    static let format: UInt16 = 2

    public var kind: ChangeKind
    public var fua: Bool
    public var timestamp: UInt64
    public var offset: UInt64
    public var length: UInt64
    public var checksum: UInt64
    public var segment: UInt64
    public var segmentOffset: UInt32
    public var storedLength: UInt32
    public var cumulative: UInt64

    /// A catch-up's header: its payload at log position `position`, `stored` bytes long.
    static func catchUp(timestamp: UInt64, from: UInt64, blocks: UInt64, checksum: UInt64, position: UInt64,
                        stored: UInt64, cumulative: UInt64) -> RecordHeader {
        RecordHeader(kind: .catchUp, fua: false, timestamp: timestamp, offset: from, length: blocks, checksum: checksum,
                     segment: position, segmentOffset: UInt32(truncatingIfNeeded: stored >> 32),
                     storedLength: UInt32(truncatingIfNeeded: stored), cumulative: cumulative)
    }

    /// The log position where the payload starts.
    public var payloadPosition: UInt64 { kind == .catchUp ? segment : segment &+ UInt64(segmentOffset) }

    /// The payload's length in bytes.
    public var storedBytes: UInt64 { kind == .catchUp ? UInt64(segmentOffset) << 32 | UInt64(storedLength) : UInt64(storedLength) }

    /// Where the payload ends in the log.
    public var payloadEnd: UInt64 { payloadPosition &+ storedBytes }

    func encoded(seq: UInt64) -> [UInt8] {
        var b = [UInt8](); b.reserveCapacity(Self.size)
        b.append(kind.rawValue)
        b.append(fua ? 1 : 0)
        b.appendLE(Self.format)
        b.appendLE(UInt32(0))
        b.appendLE(timestamp)
        b.appendLE(offset)
        b.appendLE(length)
        b.appendLE(checksum)
        b.appendLE(segment)
        b.appendLE(segmentOffset)
        b.appendLE(storedLength)
        b.appendLE(cumulative)
        let check = UInt32(truncatingIfNeeded: xxh3(b, seed: seq))
        withUnsafeBytes(of: check.littleEndian) { c in for i in 0..<4 { b[4 + i] = c[i] } }
        return b
    }

    /// Decode and check a header stored under `seq` (in a log chunk, or the first 64 bytes of
    /// a `records` value).
    static func decode(_ raw: UnsafeRawBufferPointer, seq: UInt64) throws -> RecordHeader {
        guard raw.count == size else {
            throw RewindError.corruptRecord(seq: seq, why: "header is \(raw.count) bytes, expected \(size)")
        }
        let stored = raw.loadLE(at: 4, as: UInt32.self)
        // The check is over the header with its own field zeroed: a copy on the stack (every
        // index entry a verify or restore uses decodes its record's header).
        let check = withUnsafeTemporaryAllocation(byteCount: size, alignment: 8) { copy -> UInt32 in
            copy.copyMemory(from: raw)
            copy.storeBytes(of: UInt32(0), toByteOffset: 4, as: UInt32.self)
            return UInt32(truncatingIfNeeded: xxh3(UnsafeRawBufferPointer(copy), seed: seq))
        }
        guard check == stored else {
            throw RewindError.corruptRecord(seq: seq, why: "header checksum mismatch")
        }
        let format = raw.loadLE(at: 2, as: UInt16.self)
        guard format == Self.format else {
            throw RewindError.corruptRecord(seq: seq, why: "unknown record format \(format)")
        }
        guard let kind = ChangeKind(rawValue: raw[0]) else {
            throw RewindError.corruptRecord(seq: seq, why: "unknown kind \(raw[0])")
        }
        return RecordHeader(kind: kind, fua: raw[1] & 1 != 0,
                            timestamp: raw.loadLE(at: 8, as: UInt64.self),
                            offset: raw.loadLE(at: 16, as: UInt64.self),
                            length: raw.loadLE(at: 24, as: UInt64.self),
                            checksum: raw.loadLE(at: 32, as: UInt64.self),
                            segment: raw.loadLE(at: 40, as: UInt64.self),
                            segmentOffset: raw.loadLE(at: 48, as: UInt32.self),
                            storedLength: raw.loadLE(at: 52, as: UInt32.self),
                            cumulative: raw.loadLE(at: 56, as: UInt64.self))
    }
}

/// A record with its seq, as the timeline and verify see it.
public struct Record: Sendable {
    public var seq: UInt64
    public var header: RecordHeader
}
