/// One group commit in the payload log: a 64-byte header, the payload blocks of its records
/// end to end, then the records' 64-byte headers (the same `RecordHeader` LMDB's `records`
/// table holds). A chunk is self-describing so the tail of the log that LMDB has not indexed
/// yet — after a crash — can be read back and indexed (`JournalWriter.replayTail`).
///
/// ```
///  0  8  magic        "RWLOGCHK"
///  8  8  generation   the mirror's generation when written (a rollback bumps it, so chunks
///                     of a rolled-back history are never replayed)
/// 16  8  firstSeq     seq of its first record
/// 24  4  count        records
/// 28  4  format (1)
/// 32  8  payloadBytes
/// 40  8  recordsCheck XXH3-64 of the record headers
/// 48  8  (zero)
/// 56  8  headerCheck  XXH3-64 of bytes 0..<56
/// ```
/// Record payloads are checked by each record's own checksum (XXH3 over block XXH3s).
struct LogChunk: Equatable {
    static let magic: [UInt8] = Array("RWLOGCHK".utf8)
    static let headerSize = 64
    static let format: UInt32 = 1

    var generation: UInt64
    var firstSeq: UInt64
    var count: UInt32
    var payloadBytes: UInt64
    var recordsCheck: UInt64

    /// Bytes the whole chunk spans.
    var totalBytes: UInt64 { UInt64(Self.headerSize) + payloadBytes + UInt64(count) * UInt64(RecordHeader.size) }

    func encodedHeader() -> [UInt8] {
        var b = Self.magic
        b.reserveCapacity(Self.headerSize)
        b.appendLE(generation); b.appendLE(firstSeq); b.appendLE(count); b.appendLE(Self.format)
        b.appendLE(payloadBytes); b.appendLE(recordsCheck); b.appendLE(UInt64(0))
        b.appendLE(xxh3(b))
        return b
    }

    /// Decode a header, or nil if these bytes are not a whole, intact chunk header (a torn or
    /// never-written tail reads as nil).
    static func decodeHeader(_ raw: UnsafeRawBufferPointer) -> LogChunk? {
        guard raw.count >= headerSize, Array(raw[0..<8]) == magic,
              xxh3(UnsafeRawBufferPointer(rebasing: raw[0..<56])) == raw.loadLE(at: 56, as: UInt64.self),
              raw.loadLE(at: 28, as: UInt32.self) == format else { return nil }
        return LogChunk(generation: raw.loadLE(at: 8, as: UInt64.self), firstSeq: raw.loadLE(at: 16, as: UInt64.self),
                        count: raw.loadLE(at: 24, as: UInt32.self), payloadBytes: raw.loadLE(at: 32, as: UInt64.self),
                        recordsCheck: raw.loadLE(at: 40, as: UInt64.self))
    }
}
