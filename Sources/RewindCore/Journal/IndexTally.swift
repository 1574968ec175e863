/// What one record put into the block index: how many entries, and the wrapping sum of their
/// entry hashes (`BlockEntry`). Stored beside the record's header in the `records` value, so
/// any scan that sees every entry of a seq range can check that the index holds exactly the
/// entries its records wrote — none lost, none added, none moved. LMDB 0.9 has no page
/// checksums: a damaged branch page can hide a whole leaf from a lookup, and per-entry checks
/// alone cannot see an entry that is not there.
///
/// The `records` value (80 bytes):
/// ```
///  0  64  the record header (`RecordHeader`, checked with its seq)
/// 64   4  count      index entries the record wrote
/// 68   4  check      low 32 bits of XXH3-64 of bytes 64..<68 and 72..<80, seeded with the seq
/// 72   8  sum        wrapping sum of those entries' 64-bit hashes
/// ```
/// Integers little-endian.
public struct IndexTally: Equatable, Sendable {
    public var count: UInt64 = 0
    public var sum: UInt64 = 0

    static let storedSize = RecordHeader.size + 16

    @inline(__always)
    mutating func add(_ entryHash: UInt64) {
        count &+= 1
        sum &+= entryHash
    }

    mutating func add(_ other: IndexTally) {
        count &+= other.count
        sum &+= other.sum
    }

    /// The `records` value: the header followed by this tally.
    func stored(header: RecordHeader, seq: UInt64) -> [UInt8] {
        var b = header.encoded(seq: seq)
        b.reserveCapacity(Self.storedSize)
        b.appendLE(UInt32(truncatingIfNeeded: count))
        b.appendLE(UInt32(0))
        b.appendLE(sum)
        b.withUnsafeMutableBytes { raw in
            let check = Self.check(UnsafeRawBufferPointer(rebasing: raw[RecordHeader.size...]), seq: seq)
            raw.storeBytes(of: check.littleEndian, toByteOffset: RecordHeader.size + 4, as: UInt32.self)
        }
        return b
    }

    /// Check of the 16 tally bytes (its own check field read as zero).
    private static func check(_ tally: UnsafeRawBufferPointer, seq: UInt64) -> UInt32 {
        var copy = (UInt64(0), UInt64(0))
        withUnsafeMutableBytes(of: &copy) { c in
            c.copyMemory(from: tally)
            for i in 4..<8 { c[i] = 0 }
        }
        return withUnsafeBytes(of: &copy) { UInt32(truncatingIfNeeded: xxh3($0, seed: seq)) }
    }

    /// Decode a `records` value: its header and its tally, both checked against `seq`.
    static func decodeStored(_ raw: UnsafeRawBufferPointer, seq: UInt64) throws -> (RecordHeader, IndexTally) {
        guard raw.count == storedSize else {
            throw RewindError.corruptRecord(seq: seq, why: "stored record is \(raw.count) bytes, expected \(storedSize)")
        }
        let header = try RecordHeader.decode(UnsafeRawBufferPointer(rebasing: raw[0..<RecordHeader.size]), seq: seq)
        let tally = UnsafeRawBufferPointer(rebasing: raw[RecordHeader.size...])
        guard check(tally, seq: seq) == tally.loadLE(at: 4, as: UInt32.self) else {
            throw RewindError.corruptRecord(seq: seq, why: "its index tally fails its check")
        }
        return (header, IndexTally(count: UInt64(tally.loadLE(at: 0, as: UInt32.self)), sum: tally.loadLE(at: 8, as: UInt64.self)))
    }
}
