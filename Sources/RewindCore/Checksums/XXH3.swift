import CXXHash

/// XXH3-64 of a byte range (libxxhash). Every payload, block and record header carries one.
@inline(__always)
public func xxh3(_ bytes: UnsafeRawBufferPointer) -> UInt64 {
    XXH3_64bits(bytes.baseAddress, bytes.count)
}

public func xxh3(_ bytes: [UInt8]) -> UInt64 {
    bytes.withUnsafeBytes { xxh3($0) }
}

/// XXH3-64 with a seed: what binds a stored value to the key it is stored under (a record's
/// header to its seq, a bookmark to its name), so a value found under another key fails.
@inline(__always)
public func xxh3(_ bytes: UnsafeRawBufferPointer, seed: UInt64) -> UInt64 {
    XXH3_64bits_withSeed(bytes.baseAddress, bytes.count, seed)
}

public func xxh3(_ bytes: [UInt8], seed: UInt64) -> UInt64 {
    bytes.withUnsafeBytes { xxh3($0, seed: seed) }
}

/// A record's checksum: XXH3-64 over the XXH3-64 of each stored block (little-endian, in
/// block order). Equivalent in strength to hashing the payload, but lets the append path hash
/// each byte once, since the per-block hashes are needed for the index anyway.
public func payloadChecksum(blockHashes: [UInt64]) -> UInt64 {
    blockHashes.withUnsafeBytes { raw in
        // Hashes are stored little-endian; this machine is little-endian (x86_64, arm64).
        xxh3(raw)
    }
}

/// The XXH3-64 of each `blockSize`-byte block of `payload` (the last may be short), in order:
/// what index entries carry and what a record's checksum is taken over.
public func blockHashes(_ payload: UnsafeRawBufferPointer, blockSize: Int) -> [UInt64] {
    var hashes = [UInt64](); hashes.reserveCapacity((payload.count + blockSize - 1) / blockSize)
    var at = 0
    while at < payload.count {
        hashes.append(xxh3(UnsafeRawBufferPointer(rebasing: payload[at..<min(at + blockSize, payload.count)])))
        at += blockSize
    }
    return hashes
}

/// The record checksum of a stored payload made of `blockSize`-byte blocks.
public func payloadChecksum(_ payload: UnsafeRawBufferPointer, blockSize: Int) -> UInt64 {
    payloadChecksum(blockHashes: blockHashes(payload, blockSize: blockSize))
}

/// A record's checksum taken as its payload passes in pieces of whole blocks: the same value
/// as `payloadChecksum`, without holding the payload or its block hashes (a catch-up may be
/// larger than memory).
public final class PayloadHasher {
    private let state: OpaquePointer
    private let blockSize: Int

    public init(blockSize: Int) {
        guard let state = XXH3_createState() else { fatalError("out of memory for an XXH3 state") }
        self.state = state
        self.blockSize = blockSize
        XXH3_64bits_reset(state)
    }

    deinit { XXH3_freeState(state) }

    /// The next blocks of the payload (only the payload's last piece may end in a short block).
    public func update(_ bytes: UnsafeRawBufferPointer) {
        update(hashes: blockHashes(bytes, blockSize: blockSize))
    }

    /// The next blocks' hashes.
    public func update(hashes: [UInt64]) {
        hashes.withUnsafeBytes { _ = XXH3_64bits_update(state, $0.baseAddress, $0.count) }
    }

    public var checksum: UInt64 { XXH3_64bits_digest(state) }
}
