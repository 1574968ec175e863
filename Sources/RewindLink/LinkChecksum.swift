import CXXHash

/// XXH3-64 of a frame's checked bytes: the check the journal's own records use.
func linkChecksum(_ bytes: UnsafeRawBufferPointer) -> UInt64 {
    XXH3_64bits(bytes.baseAddress, bytes.count)
}
