import Foundation
import Glibc
@testable import RewindCore
@_exported import RewindWorkload

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

/// A volume of 64 blocks whose first half holds a pattern (`mul`, `add` vary it) and whose
/// second half is zeros: the model tests' base, so base reads are exercised as well as
/// journal reads.
func halfFilledVolume(blockSize: Int, mul: Int, add: Int) -> [UInt8] {
    var bytes = [UInt8](repeating: 0, count: blockSize * 64)
    for i in 0..<bytes.count / 2 { bytes[i] = UInt8(truncatingIfNeeded: i &* mul &+ add) }
    return bytes
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
    let equal = a.isEmpty || a.withUnsafeBytes { x in b.withUnsafeBytes { y in memcmp(x.baseAddress!, y.baseAddress!, x.count) == 0 } }
    if equal { return nil }
    return a.indices.first { a[$0] != b[$0] }
}
