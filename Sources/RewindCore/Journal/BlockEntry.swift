/// An entry of the `blocks` database: the point-in-time index.
///
/// Key (16 bytes): block number u64 big-endian, seq u64 big-endian. The content of block b
/// as of seq k is the entry with the greatest key (b, s <= k) above the horizon, else base.img.
///
/// Value, little-endian: 4 bytes for a block that reads as zeros from s on; 24 for data:
/// ```
///  0  8  segment   log position of the payload area holding the block
///  8  4  offset    where the block starts in that area
/// 12  8  hash      XXH3-64 of the block's bytes, checked on every read
/// 20  4  check     low 32 bits of the entry hash (zero entries: bytes 0..<4)
/// ```
/// The entry hash is XXH3-64 of the key followed by the value's fields before `check`, so a
/// flipped bit anywhere in an entry — its block, its seq, its log position or its content
/// hash — fails the check instead of moving a block's data elsewhere. The record that wrote
/// the entries keeps their count and the sum of their hashes (`IndexTally`).
public enum BlockContent: Equatable, Sendable {
    case zero
    case data(segment: UInt64, offset: UInt32, hash: UInt64)

    static let zeroSize = 4
    static let dataSize = 24

    /// The stored value of this content as the entry (block, seq), and the entry's hash.
    func encoded(block: UInt64, seq: UInt64) -> (value: [UInt8], hash: UInt64) {
        var b = [UInt8](); b.reserveCapacity(16 + Self.dataSize)
        b.appendBE(block); b.appendBE(seq)
        if case let .data(segment, offset, hash) = self {
            b.appendLE(segment); b.appendLE(offset); b.appendLE(hash)
        }
        let entryHash = xxh3(b)
        b.appendLE(UInt32(truncatingIfNeeded: entryHash))
        return (Array(b[16...]), entryHash)
    }

    /// Decode and check the value stored under (block, seq); returns the content and the
    /// entry's hash (for `IndexTally`).
    static func decode(_ raw: UnsafeRawBufferPointer, seq: UInt64, block: UInt64) throws -> (content: BlockContent, hash: UInt64) {
        guard raw.count == zeroSize || raw.count == dataSize else {
            throw RewindError.corruptBlock(seq: seq, block: block, why: "its index entry is \(raw.count) bytes")
        }
        let fields = raw.count - 4
        let entryHash = withUnsafeTemporaryAllocation(byteCount: 16 + dataSize, alignment: 8) { buf -> UInt64 in
            buf.storeBytes(of: block.bigEndian, toByteOffset: 0, as: UInt64.self)
            buf.storeBytes(of: seq.bigEndian, toByteOffset: 8, as: UInt64.self)
            UnsafeMutableRawBufferPointer(rebasing: buf[16..<16 + fields]).copyMemory(from: UnsafeRawBufferPointer(rebasing: raw[0..<fields]))
            return xxh3(UnsafeRawBufferPointer(rebasing: buf[0..<16 + fields]))
        }
        guard UInt32(truncatingIfNeeded: entryHash) == raw.loadLE(at: fields, as: UInt32.self) else {
            throw RewindError.corruptBlock(seq: seq, block: block, why: "its index entry fails its check (journal/data.mdb is damaged)")
        }
        if fields == 0 { return (.zero, entryHash) }
        return (.data(segment: raw.loadLE(at: 0, as: UInt64.self),
                      offset: raw.loadLE(at: 8, as: UInt32.self),
                      hash: raw.loadLE(at: 12, as: UInt64.self)), entryHash)
    }
}

@inline(__always)
func blockKey(_ block: UInt64, _ seq: UInt64) -> [UInt8] {
    var k = [UInt8](); k.reserveCapacity(16); k.appendBE(block); k.appendBE(seq); return k
}

@inline(__always)
func decodeBlockKey(_ raw: UnsafeRawBufferPointer) -> (block: UInt64, seq: UInt64)? {
    guard raw.count == 16 else { return nil }
    return (raw.loadBE(at: 0), raw.loadBE(at: 8))
}

extension Mirror {
    /// Whether the index entry (block, seq) with `content` is one that record `h` could have
    /// written: a block inside its range, of the right kind, whose log position lies where the
    /// record's layout puts that block. An entry can pass its own check and still be wrong
    /// (a stale page of an older tree, a bug): this ties it to the record that wrote it.
    func entryMatches(_ h: RecordHeader, block: UInt64, content: BlockContent) -> Bool {
        let bs = UInt64(blockSize)
        if h.kind == .catchUp {
            // Its blocks are listed in its payload, not given by a range: the entry must point at
            // a whole block inside that payload (the record's tally holds the set to account).
            guard block < volumeSize / bs else { return false }
            switch content {
            case .zero: return true
            case let .data(segment, offset, _):
                let (at, overflow) = segment.addingReportingOverflow(UInt64(offset))
                return !overflow && at >= h.payloadPosition && at < h.payloadEnd && (at - h.payloadPosition) % bs == 0
            }
        }
        guard h.length > 0, h.kind != .flush else { return false }
        let end = h.offset + h.length
        let first = h.offset / bs, last = (end - 1) / bs
        guard block >= first, block <= last else { return false }
        switch content {
        case .zero:
            return h.kind != .write && Self.layout(kind: h.kind, offset: h.offset, length: h.length, blockSize: bs).zeroed.contains(block)
        case let .data(segment, offset, _):
            guard segment == h.segment else { return false }
            let index: UInt64
            if h.kind == .write {
                index = block - first
            } else {  // a zero or trim stores only its partial head and tail blocks, in that order
                let head = h.offset % bs != 0
                let tail = end % bs != 0 && !(head && last == first)
                if head && block == first { index = 0 } else if tail && block == last { index = head ? 1 : 0 } else { return false }
            }
            return UInt64(offset) == UInt64(h.segmentOffset) + index * bs
        }
    }
}
