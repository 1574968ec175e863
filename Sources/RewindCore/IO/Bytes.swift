/// Fixed-width integer encoding. Keys are big-endian so that LMDB's memcmp order is numeric
/// order; values are little-endian.
extension Array where Element == UInt8 {
    @inline(__always)
    mutating func appendBE(_ v: UInt64) {
        Swift.withUnsafeBytes(of: v.bigEndian) { append(contentsOf: $0) }
    }
    @inline(__always)
    mutating func appendLE<T: FixedWidthInteger>(_ v: T) {
        Swift.withUnsafeBytes(of: v.littleEndian) { append(contentsOf: $0) }
    }
}

extension UnsafeRawBufferPointer {
    @inline(__always)
    func loadBE(at offset: Int) -> UInt64 {
        UInt64(bigEndian: loadUnaligned(fromByteOffset: offset, as: UInt64.self))
    }
    @inline(__always)
    func loadLE<T: FixedWidthInteger>(at offset: Int, as: T.Type) -> T {
        T(littleEndian: loadUnaligned(fromByteOffset: offset, as: T.self))
    }
}

/// An 8-byte big-endian key for a sequence number.
@inline(__always)
func seqKey(_ seq: UInt64) -> [UInt8] {
    var k = [UInt8](); k.reserveCapacity(8); k.appendBE(seq); return k
}
