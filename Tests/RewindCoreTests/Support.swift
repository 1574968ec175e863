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
