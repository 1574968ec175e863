/// An entry of the `blocks` database: the point-in-time index.
///
/// Key (16 bytes): block number u64 big-endian, seq u64 big-endian. The content of block b
/// as of seq k is the entry with the greatest key (b, s <= k) above the horizon, else base.img.
///
/// Value: empty for a block that reads as zeros from s on; otherwise 20 bytes, little-endian:
/// ```
///  0  8  segment   key of the `segments` value holding the block
///  8  4  offset    where the block starts in that segment
/// 12  8  hash      XXH3-64 of the block's bytes, checked on every read
/// ```
public enum BlockContent: Equatable, Sendable {
    case zero
    case data(segment: UInt64, offset: UInt32, hash: UInt64)

    static let dataSize = 20

    func encoded() -> [UInt8] {
        switch self {
        case .zero: return []
        case let .data(segment, offset, hash):
            var b = [UInt8](); b.reserveCapacity(Self.dataSize)
            b.appendLE(segment); b.appendLE(offset); b.appendLE(hash)
            return b
        }
    }

    static func decode(_ raw: UnsafeRawBufferPointer, seq: UInt64, block: UInt64) throws -> BlockContent {
        if raw.isEmpty { return .zero }
        guard raw.count == dataSize else {
            throw RewindError.corruptBlock(seq: seq, block: block, why: "index entry is \(raw.count) bytes")
        }
        return .data(segment: raw.loadLE(at: 0, as: UInt64.self),
                     offset: raw.loadLE(at: 8, as: UInt32.self),
                     hash: raw.loadLE(at: 12, as: UInt64.self))
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
