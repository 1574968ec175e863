import CLMDB
import Foundation
import Glibc
import Testing
@testable import RewindCore

/// LMDB's map follows the journal's file system (`LMDBEnvironment.mapSizeBytes(forDirectory:)`):
/// an index is never stopped by the map while its disk has room, and a map that was too small
/// (an older mirror's fixed size, or a file system since grown) is larger at the next open,
/// with everything written before it intact.
@Suite struct LMDBMapTests {
    @Test func theMapIsTheFileSystemsSize() throws {
        let dir = TempDir("map")
        defer { dir.remove() }
        var fs = statvfs()
        #expect(statvfs(dir.path, &fs) == 0)
        let fsBytes = Int(fs.f_blocks) * Int(fs.f_frsize)
        let sized = LMDBEnvironment.mapSizeBytes(forDirectory: dir.path)
        #expect(sized >= fsBytes || sized == Int(LMDBEnvironment.maxMapSizeBytes))
        #expect(sized < fsBytes + (1 << 30) || sized == Int(LMDBEnvironment.minMapSizeBytes))
        #expect(sized % (1 << 30) == 0)
        let env = try LMDBEnvironment(directory: dir.path)
        #expect(try env.mapBytes() == sized)
        // A directory that cannot be read falls back to a fixed size rather than failing.
        #expect(LMDBEnvironment.mapSizeBytes(forDirectory: dir.path + "/missing") == LMDBEnvironment.fallbackMapSizeBytes)
    }

    /// An environment whose map filled (MDB_MAP_FULL) takes more at the next open, and keeps
    /// every committed entry: the map bounds address space, not the data.
    @Test func aFullMapGrowsAtTheNextOpen() throws {
        let dir = TempDir("mapgrow")
        defer { dir.remove() }
        let value = [UInt8](repeating: 0xA5, count: 1000)
        var committed = 0
        do {
            let env = try LMDBEnvironment(directory: dir.path, mapSizeBytes: 1 << 20)
            let db = try env.openDatabases(["t"], create: true)[0]
            var full: LMDBError?
            for batch in 0..<100 where full == nil {
                do {
                    try env.write { txn in
                        for i in 0..<100 { try txn.put(db, Self.key(batch * 100 + i), value) }
                    }
                    committed = (batch + 1) * 100
                } catch let e as LMDBError {
                    full = e
                }
            }
            #expect(full?.isMapFull == true, "a 1 MiB map never filled (\(committed) entries)")
            #expect(committed > 0 && committed < 1000)
        }
        let env = try LMDBEnvironment(directory: dir.path)
        #expect(try env.mapBytes() == LMDBEnvironment.mapSizeBytes(forDirectory: dir.path))
        let db = try env.openDatabases(["t"], create: false)[0]
        try env.write { txn in
            for i in committed..<committed + 5000 { try txn.put(db, Self.key(i), value) }
        }
        try env.read { txn in
            for i in 0..<committed + 5000 {
                let got = try txn.get(db, Self.key(i)).map { [UInt8]($0) }
                #expect(got == value, "entry \(i)")
                if got != value { break }
            }
        }
    }

    static func key(_ i: Int) -> [UInt8] { withUnsafeBytes(of: UInt64(i).bigEndian) { [UInt8]($0) } }
}
