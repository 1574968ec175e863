import Foundation
import Glibc
@testable import RewindCore

/// A fresh directory under /tmp, removed when the test's `defer` calls `remove()`.
struct TempDir {
    let path: String
    init(_ name: String = "t") {
        var template = Array("/tmp/rewind-test-\(name)-XXXXXX".utf8CString)
        let p = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        path = String(cString: p!)
    }
    func remove() { removeTree(path) }
    func file(_ name: String) -> String { path + "/" + name }
}

/// A deterministic PRNG (SplitMix64), so a failing seed can be replayed.
struct SplitMix: RandomNumberGenerator {
    var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// The in-memory model of a volume: what every point must read back as.
struct VolumeModel {
    var bytes: [UInt8]
    mutating func apply(_ c: Change) {
        switch c.kind {
        case .write: bytes.replaceSubrange(Int(c.offset)..<Int(c.offset) + c.data.count, with: c.data)
        case .zero, .trim:
            for i in Int(c.offset)..<Int(c.offset + c.length) { bytes[i] = 0 }
        case .flush: break
        }
    }
}

/// A random change on a volume of `size` bytes: writes from 1 byte to several blocks at any
/// alignment, zeroes and trims of any range, flushes.
func randomChange(_ rng: inout SplitMix, size: UInt64, blockSize: Int) -> Change {
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

func readAll(_ mirror: Mirror, at point: Point) throws -> [UInt8] {
    let s = try Snapshot(mirror: mirror, point: point)
    defer { s.close() }
    return try s.read(at: 0, count: Int(mirror.volumeSize))
}

func fileBytes(_ path: String) -> [UInt8] {
    [UInt8](FileManager.default.contents(atPath: path) ?? Data())
}

func firstDifference(_ a: [UInt8], _ b: [UInt8]) -> Int? {
    if a.count != b.count { return min(a.count, b.count) }
    return a.indices.first { a[$0] != b[$0] }
}
