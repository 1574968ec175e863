import Foundation
import Glibc
import Synchronization
import Testing
@testable import RewindCore

/// Compaction frees the dead prefix of the first live log file by punching a hole
/// (`PayloadLog.punchDeadPrefix`): each punch covers only what earlier ones did not, the bytes
/// after the punched prefix stay, and a log cut back below it is punched again from there.
@Suite struct PunchDeadPrefixTests {
    /// Records the hole punches under `root`, and lets every call through.
    final class Punches: StorageFaults, @unchecked Sendable {
        let root: String
        let ranges = Mutex<[Range<UInt64>]>([])
        init(root: String) { self.root = root }
        func covers(_ path: String) -> Bool { path.hasPrefix(root + "/") }
        func modify(_ path: String, fd: Int32, _ range: Range<UInt64>, operation: String, _ body: () throws -> Void) throws {
            if operation.hasPrefix("fallocate(PUNCH_HOLE") { ranges.withLock { $0.append(range) } }
            try body()
        }
        func sync(_ path: String, fd: Int32, operation: String, _ body: () throws -> Void) throws { try body() }
        func lmdbCommit(_ directory: String, _ body: () throws -> Void) throws { try body() }
        func lmdbSync(_ directory: String, _ body: () throws -> Void) throws { try body() }
    }

    @Test func eachPunchCoversOnlyWhatIsNew() throws {
        let dir = TempDir("punch")
        defer { dir.remove() }
        try PayloadLog.create(directory: dir.file("log"))
        let log = PayloadLog(directory: dir.file("log"))
        let page = 4096
        let bytes = (0..<(64 * page)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) }
        try bytes.withUnsafeBytes { try log.write($0, at: 0) }
        try log.sync()
        let punches = Punches(root: dir.path)
        Storage.install(punches)
        defer { Storage.remove(punches) }

        log.punchDeadPrefix(before: UInt64(10 * page + 100))  // whole pages only: 10
        log.punchDeadPrefix(before: UInt64(10 * page + 3000))  // nothing new
        log.punchDeadPrefix(before: UInt64(20 * page))
        #expect(punches.ranges.withLock { $0 } == [0..<UInt64(10 * page), UInt64(10 * page)..<UInt64(20 * page)])

        var back = [UInt8](repeating: 0xFF, count: 64 * page)
        #expect(try back.withUnsafeMutableBytes { try log.read(at: 0, into: $0) })
        #expect(back[0..<(20 * page)].allSatisfy { $0 == 0 }, "the punched prefix reads as zeros")
        #expect(back[(20 * page)...] == bytes[(20 * page)...], "the live part is untouched")

        // Cut back below the punched point (a rollback's cut): punching resumes from the cut.
        try log.truncate(at: UInt64(15 * page))
        try bytes[(15 * page)...].withUnsafeBytes { try log.write($0, at: UInt64(15 * page)) }
        log.punchDeadPrefix(before: UInt64(30 * page))
        #expect(punches.ranges.withLock { $0 }.last == UInt64(15 * page)..<UInt64(30 * page))
    }
}
