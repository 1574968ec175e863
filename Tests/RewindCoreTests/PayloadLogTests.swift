import Foundation
import Testing
@testable import RewindCore

/// The payload log as the durable journal: records synced to the log but never indexed (the
/// writer died before LMDB committed) come back on the next open, a torn chunk ends the log,
/// and a rolled-back history is never replayed.
@Suite struct PayloadLogTests {
    static let bs = 4096
    static let size = UInt64(64 * bs)
    static let seed: UInt64 = 77

    static func changes(_ range: ClosedRange<UInt64>) -> [Change] {
        range.map { streamChange(seed: seed, index: $0, size: size, blockSize: bs) }
    }

    static var logFile: String { "/log/0000000000000000.log" }

    /// Damage the mirror's first log file: flip the bits of `mask` in the byte at `offset`.
    static func flipLogByte(_ mirror: String, at offset: Int, _ mask: UInt8) throws {
        var bytes = fileBytes(mirror + logFile)
        bytes[offset] ^= mask
        try Data(bytes).write(to: URL(fileURLWithPath: mirror + logFile))
    }

    @Test func syncedButUnindexedRecordsAreReplayedOnOpen() throws {
        let dir = TempDir("replay")
        defer { dir.remove() }
        let path = dir.file("m")
        do {
            let m = try Mirror.create(at: path, size: Self.size)
            try m.append(Self.changes(1...10))
            let w = JournalWriter(mirror: m)
            #expect(try w.append(Self.changes(11...20)) == 11...20)
            #expect(try w.append(Self.changes(21...25)) == 21...25)
            try w.syncLog()
            #expect(try m.meta().lastSeq == 10)  // other transactions do not see staged records
            w.abort(keepLog: true)  // the process dies before the index commits
        }
        // (One LMDB environment per file at a time in a process: each `Mirror` here is gone
        // before the next opens. LMDB re-initialises its lock file on an overlapping open.)
        let meta: MirrorMeta
        do {
            let m = try Mirror.open(at: path)
            meta = try m.meta()
            #expect(meta.lastSeq == 25)
            _ = try m.verify()
            let states = streamStates(seed: Self.seed, points: [10, 20, 25], size: Self.size, blockSize: Self.bs)
            for k: UInt64 in [10, 20, 25] {
                #expect(firstDifference(try readAll(m, at: .seq(k)), states[k]!) == nil, "seq:\(k)")
            }
        }
        // Nothing left to replay: a second open changes nothing.
        #expect(try Mirror.open(at: path).meta() == meta)
    }

    /// `rewind compact` and `rewind status` (other processes) beside a live server must neither
    /// index nor cut the server's staged tail: only the owner of `owner.lock` replays.
    @Test func anotherProcessNeverTouchesALiveOwnersTail() throws {
        let dir = TempDir("owner")
        defer { dir.remove() }
        let path = dir.file("m")
        let m = try Mirror.create(at: path, size: Self.size)
        let owner = try FileLock(path: m.ownerLockPath, kind: .exclusive, holder: "the test's server")
        let w = JournalWriter(mirror: m)
        try w.append(Self.changes(1...6))
        try w.syncLog()
        try w.commit()
        try w.append(Self.changes(7...9))  // staged and synced, not indexed: the live owner's tail
        try w.syncLog()
        let end = m.journal.log.end()
        for args in [["status", path, "--json"], ["compact", path, "--keep-size", "1T"]] {
            let child = Process()
            child.executableURL = URL(fileURLWithPath: Self.rewindBinary)
            child.arguments = args
            child.standardOutput = FileHandle.nullDevice
            try child.run()
            // It must finish while the owner still holds LMDB's writer lock: indexing the tail
            // would wait for it (and then could cut the log under the owner).
            let deadline = Date().addingTimeInterval(20)
            while child.isRunning && Date() < deadline { usleep(20_000) }
            let blocked = child.isRunning
            if blocked { try w.commit() }  // let it go on, and fail
            child.waitUntilExit()
            #expect(!blocked, "rewind \(args[0]) waited for the live owner's writer lock")
            #expect(child.terminationStatus == 0, "rewind \(args[0])")
            #expect(m.journal.log.end() == end, "rewind \(args[0]) cut the live owner's log")
        }
        try w.commit()
        #expect(try m.meta().lastSeq == 9)
        owner.release()
        _ = try m.verify()
    }

    static var rewindBinary: String {
        CrashTests.tortureBinary.replacingOccurrences(of: "rewind-torture", with: "rewind")
    }

    @Test func aTornChunkEndsTheLogAndIsCutAway() throws {
        let dir = TempDir("torn")
        defer { dir.remove() }
        let path = dir.file("m")
        var endOfSecond: UInt64 = 0
        do {
            let m = try Mirror.create(at: path, size: Self.size)
            try m.append(Self.changes(1...5))
            let w = JournalWriter(mirror: m)
            try w.append(Self.changes(6...8))
            try w.syncLog()
            endOfSecond = m.journal.log.end()
            try w.append([.write(0, [UInt8](repeating: 0xAB, count: Self.bs))])
            w.abort(keepLog: true)
        }
        // Damage the last chunk's payload (its first byte follows the 64-byte chunk header).
        try Self.flipLogByte(path, at: Int(endOfSecond) + LogChunk.headerSize, 0xFF)
        let m = try Mirror.open(at: path)
        #expect(try m.meta().lastSeq == 8)
        #expect(try m.meta().logEnd == endOfSecond)
        #expect(m.journal.log.end() == endOfSecond)
        _ = try m.verify()
        #expect(try m.append([.flush]) == 9...9)
    }

    /// A damaged chunk with intact chunks after it is not a torn tail: the log still ends at
    /// the damage (nothing after it can be indexed in order), but the mirror says so and the
    /// cut bytes are kept, byte for byte, in damaged-log/.
    @Test func aDamagedChunkBeforeIntactOnesIsReportedAndKept() throws {
        let dir = TempDir("damaged")
        defer { dir.remove() }
        let path = dir.file("m")
        var endOfFirst: UInt64 = 0
        do {
            let m = try Mirror.create(at: path, size: Self.size)
            try m.append(Self.changes(1...5))
            let w = JournalWriter(mirror: m)
            try w.append(Self.changes(6...8))
            endOfFirst = m.journal.log.end()
            try w.append(Self.changes(9...12))
            try w.append(Self.changes(13...13))
            try w.syncLog()
            w.abort(keepLog: true)  // synced, never indexed
        }
        let originalTail = Array(fileBytes(path + Self.logFile)[Int(endOfFirst)...])
        try Self.flipLogByte(path, at: Int(endOfFirst) + LogChunk.headerSize + 5, 0x01)  // payload of seq:9...12's chunk
        let damagedTail = Array(fileBytes(path + Self.logFile)[Int(endOfFirst)...])
        let m = try Mirror.open(at: path)
        #expect(try m.meta().lastSeq == 8)
        #expect(m.journal.log.end() == endOfFirst)
        let d = try #require(m.logDamage)
        #expect(d.position == endOfFirst && d.expectedSeq == 9 && d.laterChunks == 1 && d.laterSeqs == 13...13)
        #expect(d.bytes == UInt64(originalTail.count))
        #expect(d.savedAs == path + String(format: "/damaged-log/%016llx-%016llx.log", endOfFirst, endOfFirst + d.bytes))
        #expect(fileBytes(d.savedAs) == damagedTail)
        #expect(d.description == "the journal's log is damaged at byte \(endOfFirst) (seq:9 failed its checks) and 1 intact chunk claiming seq:13...seq:13 followed; the journal now ends at seq:8, and the \(d.bytes) bytes from there were kept in \(d.savedAs)")
        _ = try m.verify()
    }

    /// A torn last chunk (nothing intact after it) is a crash's unsynced write: no report.
    @Test func aTornLastChunkIsNotReportedAsDamage() throws {
        let dir = TempDir("tornonly")
        defer { dir.remove() }
        let path = dir.file("m")
        var endOfFirst: UInt64 = 0
        do {
            let m = try Mirror.create(at: path, size: Self.size)
            let w = JournalWriter(mirror: m)
            try w.append(Self.changes(1...3))
            endOfFirst = m.journal.log.end()
            try w.append(Self.changes(4...9))
            w.abort(keepLog: true)
        }
        try Self.flipLogByte(path, at: Int(endOfFirst) + LogChunk.headerSize + 100, 0x01)
        let m = try Mirror.open(at: path)
        #expect(try m.meta().lastSeq == 3)
        #expect(m.logDamage == nil)
        #expect(access(path + "/damaged-log", F_OK) != 0)
    }

    @Test func aRolledBackHistoryIsNeverReplayed() throws {
        let dir = TempDir("gen")
        defer { dir.remove() }
        let path = dir.file("m")
        let before: [UInt8]
        do {
            let m = try Mirror.create(at: path, size: Self.size)
            try m.append(Self.changes(1...5))
            try m.append(Self.changes(6...10))  // its own chunk, so the rollback cuts the log there
            before = fileBytes(path + Self.logFile)
            _ = try m.rollback(to: .seq(5), source: nil)
            #expect(fileBytes(path + Self.logFile).count < before.count)
        }
        // As if the process died after the rollback committed but before the log was cut:
        // the old chunk for seqs 6...10 lies exactly where the log now ends.
        try Data(before).write(to: URL(fileURLWithPath: path + Self.logFile))
        let reopened = try Mirror.open(at: path, recover: true)
        #expect(try reopened.meta().lastSeq == 5)
        #expect(reopened.journal.log.end() == (try reopened.meta().logEnd))
        let states = streamStates(seed: Self.seed, points: [5], size: Self.size, blockSize: Self.bs)
        #expect(firstDifference(try readAll(reopened, at: .latest), states[5]!) == nil)
        _ = try reopened.verify()
    }

    /// Large aligned writes go to the log from the caller's array, not through the chunk
    /// buffer; an unaligned write later in the same group commit merges with their blocks.
    @Test func largeWritesAndPartialWritesInOneGroupCommitReadBackExactly() throws {
        let dir = TempDir("direct")
        defer { dir.remove() }
        var model = [UInt8](repeating: 0, count: Int(Self.size))
        func apply(_ c: Change) {
            if c.kind == .write { model.replaceSubrange(Int(c.offset)..<Int(c.offset) + c.data.count, with: c.data) }
            else if c.kind == .zero { model.replaceSubrange(Int(c.offset)..<Int(c.offset + c.length), with: repeatElement(0, count: Int(c.length))) }
        }
        let big = (0..<(128 << 10)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ 1) }
        let changes: [Change] = [
            .write(4096, [UInt8](repeating: 9, count: 4096)),                // copied
            .write(8192, big),                                               // direct, blocks 2...33
            .write(8192 + 5000, [UInt8](repeating: 0xEE, count: 300)),       // merges with a direct block
            .write(8192 + (64 << 10) - 10, [UInt8](repeating: 0xDD, count: 20)),  // straddles two direct blocks
            .zero(8192 + 100, 50),                                           // a partial zero inside
            .write(32 << 12, big),                                           // direct again (overlaps the first)
            .write((32 << 12) + 1, [1, 2, 3]),
        ]
        do {
            let m = try Mirror.create(at: dir.file("m"), size: Self.size)
            changes.forEach(apply)
            try m.append(changes)
            #expect(firstDifference(try readAll(m, at: .latest), model) == nil)
            _ = try m.verify()
            // And through replay: the same changes staged and synced, never indexed.
            let w = JournalWriter(mirror: m)
            let again = changes.map { c -> Change in c.kind == .write ? .write(c.offset, c.data.map { $0 ^ 0x55 }) : c }
            again.forEach(apply)
            try w.append(again)
            try w.syncLog()
            w.abort(keepLog: true)
        }
        let reopened = try Mirror.open(at: dir.file("m"))
        #expect(firstDifference(try readAll(reopened, at: .latest), model) == nil)
        _ = try reopened.verify()
    }

    @Test func compactionDeletesWholeLogFilesOnly() throws {
        let dir = TempDir("logfiles")
        defer { dir.remove() }
        let m = try Mirror.create(at: dir.file("m"), size: 256 << 20)
        // 3 x 128 MiB of 1 MiB writes: the log spans files 0, 1 and part of 2.
        let mib = [UInt8](repeating: 7, count: 1 << 20)
        for round in 0..<3 {
            try m.append((0..<128).map { .write(UInt64($0) << 20, mib, fua: round == 2) })  // 4 chunks each (32 MiB cap)
        }
        #expect(m.journal.log.fileIndices() == [0, 1])
        try m.append((0..<128).map { .write(UInt64($0) << 20, mib) })
        #expect(m.journal.log.fileIndices() == [0, 1, 2])
        _ = try m.compact(to: .seq(300))  // record 301's chunk starts in file 1
        #expect(m.journal.log.fileIndices() == [1, 2])
        _ = try m.verify()
        let volume = try readAll(m, at: .latest)
        #expect(volume[0..<128 << 20].allSatisfy { $0 == 7 } && volume[128 << 20..<256 << 20].allSatisfy { $0 == 0 })
    }
}

/// A failed sync or writeback of the log is never forgotten: on Linux the error is reported
/// once and the pages are then clean, so a later sync that succeeds would prove nothing.
@Suite struct PayloadLogFailureTests {
    @Test func aFailureStandsForEveryLaterSync() throws {
        let dir = TempDir("log-failure")
        defer { dir.remove() }
        try PayloadLog.create(directory: dir.file("log"))
        let log = PayloadLog(directory: dir.file("log"))
        let bytes = [UInt8](repeating: 7, count: 4096)
        try bytes.withUnsafeBytes { try log.write($0, at: 0) }
        try log.sync()  // healthy: nothing failed yet
        let eio = RewindError.io(path: dir.file("log/0000000000000000.log"), operation: "sync_file_range(WAIT)", errno: EIO)
        log.fail(eio)
        log.fail(RewindError.io(path: "later", operation: "fdatasync", errno: ENOSPC))  // the first one stays
        try bytes.withUnsafeBytes { try log.write($0, at: 4096) }
        for attempt in 0..<3 {
            do { try log.sync(); Issue.record("sync \(attempt) succeeded after a failure") } catch {
                #expect("\(error)" == eio.description)
            }
        }
        do { _ = try log.sync(flushedBy: {}); Issue.record("sync(flushedBy:) succeeded after a failure") } catch {
            #expect("\(error)" == eio.description)
        }
        do { try log.sync(0..<8192); Issue.record("sync(range) succeeded after a failure") } catch {
            #expect("\(error)" == eio.description)
        }
    }
}
