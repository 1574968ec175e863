import CLinux
import Foundation
import Glibc
import Testing
@testable import RewindCore

/// One device cache flush for a FLUSH (`PayloadLog.sync(flushedBy:)`): the log hands its
/// durability to another file's fdatasync only when it owes nothing but data — every byte
/// since the last sync overwrote prewritten, synced blocks and no file was created.
@Suite struct SharedFlushTests {
    static let block = [UInt8](repeating: 0xA5, count: 4096)

    /// A fresh log whose first file exists and is synced.
    static func makeLog(_ dir: TempDir) throws -> PayloadLog {
        let log = PayloadLog(directory: dir.file("log"))
        try PayloadLog.create(directory: log.directory)
        try block.withUnsafeBytes { try log.write($0, at: 0) }
        try log.sync()
        return log
    }

    @Test func onlyDataOnPreparedBlocksSharesTheFlush() throws {
        let dir = TempDir("sharedflush")
        defer { dir.remove() }
        let log = try Self.makeLog(dir)
        var flushes = 0
        // Not prepared (delayed allocation, a size change): a full sync is needed.
        try Self.block.withUnsafeBytes { try log.write($0, at: 4096) }
        #expect(try log.sync(flushedBy: { flushes += 1 }) == false)
        #expect(flushes == 0)
        try log.sync()
        // Prewritten and synced ahead: only data is owed.
        try log.reserve(8192..<12288, ahead: 1 << 20, prewrite: true)
        try Self.block.withUnsafeBytes { try log.write($0, at: 8192) }
        #expect(try log.sync(flushedBy: { flushes += 1 }) == true)
        #expect(flushes == 1)
        // Nothing owed: the flush still runs (it is the other file's sync).
        #expect(try log.sync(flushedBy: { flushes += 1 }) == true)
        #expect(flushes == 2)
        try Self.block.withUnsafeBytes { try log.write($0, at: 12288) }
        #expect(try log.sync(flushedBy: { flushes += 1 }) == true)
        #expect(flushes == 3)
        // Past the prepared blocks: a full sync again.
        let end = 12288 + (UInt64(1) << 20)
        try Self.block.withUnsafeBytes { try log.write($0, at: end) }
        #expect(try log.sync(flushedBy: { flushes += 1 }) == false)
        #expect(flushes == 3)
        try log.sync()
        // Cutting the log back drops the prepared blocks past the cut.
        try log.truncate(at: 16384)
        try Self.block.withUnsafeBytes { try log.write($0, at: 16384) }
        #expect(try log.sync(flushedBy: { flushes += 1 }) == false)
        var back = [UInt8](repeating: 0, count: 4096)
        #expect(try back.withUnsafeMutableBytes { try log.read(at: 12288, into: $0) })
        #expect(back == Self.block)
    }

    /// A failed shared flush is the log's failure for good: no later sync, shared or full,
    /// succeeds (the bytes it covered may be lost although the pages now look clean).
    @Test func aFailedSharedFlushFailsEveryLaterSync() throws {
        let dir = TempDir("sharedflush-failed")
        defer { dir.remove() }
        let log = try Self.makeLog(dir)
        try log.reserve(4096..<8192, ahead: 1 << 20, prewrite: true)
        try Self.block.withUnsafeBytes { try log.write($0, at: 4096) }
        let failure = RewindError.io(path: "source", operation: "fdatasync", errno: EIO)
        #expect(throws: RewindError.self) { try log.sync(flushedBy: { throw failure }) }
        var flushes = 0
        for _ in 0..<2 {
            do { _ = try log.sync(flushedBy: { flushes += 1 }); Issue.record("a shared flush succeeded after a failure") } catch {
                #expect("\(error)" == failure.description)
            }
            do { try log.sync(); Issue.record("a sync succeeded after a failure") } catch {
                #expect("\(error)" == failure.description)
            }
        }
        #expect(flushes == 0)
    }

    /// A large chunk fallocates 8 MiB ahead; small chunks after it land in those blocks, which
    /// are allocated but unwritten: they are prewritten all the same, so their FLUSHes share.
    @Test func smallChunksAfterALargeOneArePrepared() throws {
        let dir = TempDir("sharedflush-afterlarge")
        defer { dir.remove() }
        let log = try Self.makeLog(dir)
        var flushes = 0
        let large = [UInt8](repeating: 0x5A, count: 256 << 10)
        try log.reserve(4096..<4096 + UInt64(large.count), ahead: PayloadLog.reserveAheadBytes)
        try large.withUnsafeBytes { try log.write($0, at: 4096) }
        #expect(try log.sync(flushedBy: { flushes += 1 }) == false)
        try log.sync()
        let small = 4096 + UInt64(large.count)
        try log.reserve(small..<small + 4096, ahead: 1 << 20, prewrite: true)
        try Self.block.withUnsafeBytes { try log.write($0, at: small) }
        #expect(try log.sync(flushedBy: { flushes += 1 }) == true)
        #expect(flushes == 1)
        // The next small chunk inside the prepared megabyte writes no zeros over the first.
        try log.reserve(small + 4096..<small + 8192, ahead: 1 << 20, prewrite: true)
        try Self.block.withUnsafeBytes { try log.write($0, at: small + 4096) }
        #expect(try log.sync(flushedBy: { flushes += 1 }) == true)
        var back = [UInt8](repeating: 0, count: 4096)
        #expect(try back.withUnsafeMutableBytes { try log.read(at: small, into: $0) })
        #expect(back == Self.block)
        var first = [UInt8](repeating: 0, count: large.count)
        #expect(try first.withUnsafeMutableBytes { try log.read(at: 4096, into: $0) })
        #expect(first == large)
    }

    @Test func aNewLogFileNeedsAFullSync() throws {
        let dir = TempDir("sharedflush-new")
        defer { dir.remove() }
        let log = try Self.makeLog(dir)
        let second = PayloadLog.fileBytes
        // Prewriting into the next file creates it: its directory entry is owed.
        try log.reserve(second..<second + 4096, ahead: 4096, prewrite: true)
        try Self.block.withUnsafeBytes { try log.write($0, at: second) }
        #expect(try log.sync(flushedBy: {}) == false)
        try log.sync()
        try Self.block.withUnsafeBytes { try log.write($0, at: second + 4096) }
        #expect(try log.sync(flushedBy: {}) == true)
    }

    @Test func onlyOneExt4OrXFSFileSystemSharesTheFlush() throws {
        let dir = TempDir("sharedflush-fs")
        defer { dir.remove() }
        let file = try BlockFile(path: dir.file("source"), mode: .createNew)
        let type = rewind_fs_type(file.fd)
        #expect(file.fdatasyncFlushesDevice(of: dir.path) == (type == 0xEF53 || type == 0x5846_5342))
        // tmpfs (another file system, and no device at all): never.
        if access("/dev/shm", W_OK) == 0 {
            #expect(file.fdatasyncFlushesDevice(of: "/dev/shm") == false)
            let shm = try BlockFile(path: "/dev/shm/rewind-sharedflush-\(getpid())", mode: .createOrTruncate)
            defer { unlink(shm.path) }
            #expect(shm.fdatasyncFlushesDevice(of: "/dev/shm") == false)
        }
        #expect(file.fdatasyncFlushesDevice(of: dir.file("missing")) == false)
    }
}
