import RewindCore

/// Deterministic random workloads shared by the model tests, the crash-test child
/// (`rewind-torture`) and the benchmarks: change i of seed s is always the same change,
/// so a checker can rebuild what the volume must hold after any seq.

/// A small, fast PRNG (SplitMix64) with replayable seeds.
public struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// The in-memory model of a volume: what every point must read back as.
public struct VolumeModel {
    public var bytes: [UInt8]
    public init(bytes: [UInt8]) { self.bytes = bytes }
    public init(size: UInt64) { bytes = [UInt8](repeating: 0, count: Int(size)) }

    public mutating func apply(_ c: Change) {
        switch c.kind {
        case .write: bytes.replaceSubrange(Int(c.offset)..<Int(c.offset) + c.data.count, with: c.data)
        case .zero, .trim:
            for i in Int(c.offset)..<Int(c.offset + c.length) { bytes[i] = 0 }
        case .flush, .catchUp: break  // a catch-up is never a host's change
        }
    }
}

/// A random change on a volume of `size` bytes: writes from 1 byte to several blocks at any
/// alignment (65%), zeroes (13%) and trims (12%) of any range, flushes (10%).
public func randomChange(_ rng: inout SplitMix, size: UInt64, blockSize: Int) -> Change {
    let roll = Int.random(in: 0..<100, using: &rng)
    func range(maxLength: UInt64) -> (UInt64, UInt64) {
        let aligned = Bool.random(using: &rng)
        var length = UInt64.random(in: 1...maxLength, using: &rng)
        var offset = UInt64.random(in: 0..<size, using: &rng)
        if aligned {
            let bs = UInt64(blockSize)
            offset -= offset % bs
            length = max(bs, length - length % bs)
        }
        length = min(length, size - offset)
        return (offset, length)
    }
    switch roll {
    case 0..<65:
        let (o, l) = range(maxLength: UInt64(blockSize) * UInt64(Int.random(in: 1...4, using: &rng)) + 17)
        let fill = UInt8.random(in: 1...255, using: &rng)
        let data = (0..<Int(l)).map { UInt8(truncatingIfNeeded: Int(fill) &+ $0 &* 7) }
        return .write(o, data, fua: Int.random(in: 0..<10, using: &rng) == 0)
    case 65..<78:
        let (o, l) = range(maxLength: size / 4)
        return .zero(o, l)
    case 78..<90:
        let (o, l) = range(maxLength: size / 4)
        return .trim(o, l)
    default:
        return .flush
    }
}

/// Change number `index` (1-based, = its seq when appended in order) of the stream `seed`.
public func streamChange(seed: UInt64, index: UInt64, size: UInt64, blockSize: Int) -> Change {
    var rng = SplitMix(seed: seed ^ (index &* 0x2545_F491_4F6C_DD1D))
    return randomChange(&rng, size: size, blockSize: blockSize)
}

/// The volume after changes 1...k of stream `seed`, for each k in `points` (ascending).
public func streamStates(seed: UInt64, points: [UInt64], size: UInt64, blockSize: Int) -> [UInt64: [UInt8]] {
    var model = VolumeModel(size: size)
    var out: [UInt64: [UInt8]] = [:]
    var i: UInt64 = 0
    for k in points.sorted() {
        while i < k { i += 1; model.apply(streamChange(seed: seed, index: i, size: size, blockSize: blockSize)) }
        out[k] = model.bytes
    }
    return out
}
