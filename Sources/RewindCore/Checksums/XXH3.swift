import CXXHash

/// XXH3-64 of a byte range (libxxhash). Every payload, block and record header carries one.
@inline(__always)
public func xxh3(_ bytes: UnsafeRawBufferPointer) -> UInt64 {
    XXH3_64bits(bytes.baseAddress, bytes.count)
}

public func xxh3(_ bytes: [UInt8]) -> UInt64 {
    bytes.withUnsafeBytes { xxh3($0) }
}
