import Foundation
import Testing
@testable import RewindCore

/// The block index is checked like the payload (invariant 6): each entry carries a check over
/// its key, log position and content hash; each record keeps the count and hash sum of the
/// entries it wrote; restore, compaction and verify hold the index to both. Each case damages
/// the index the way a flipped bit in data.mdb would, and before mirror format 3 each of them
/// gave a wrong image with no error.
@Suite struct IndexIntegrityTests {
    /// A mirror of 16 blocks: seq 1 writes blocks 0–1, seq 2 block 5, seq 3 zeroes blocks 0–1,
    /// seq 4 writes block 9. Returns its path.
    static func makeMirror(_ dir: TempDir) throws -> String {
        let path = dir.file("m")
        let m = try Mirror.create(at: path, size: 16 * 4096)
        try m.append([.write(0, [UInt8](repeating: 1, count: 8192))])
        try m.append([.write(5 * 4096, [UInt8](repeating: 2, count: 4096))])
        try m.append([.zero(0, 8192)])
        try m.append([.write(9 * 4096, [UInt8](repeating: 4, count: 4096))])
        return path
    }

    /// Move the index entry (block, seq) to another key, value unchanged: what a flipped bit in
    /// a leaf key does.
    static func moveEntry(_ m: Mirror, block: UInt64, seq: UInt64, to newBlock: UInt64, newSeq: UInt64) throws {
        try m.journal.env.write { txn in
            guard let raw = try txn.get(m.journal.blocks, blockKey(block, seq)) else { throw RewindError.invalidArgument("no entry") }
            let value = [UInt8](raw)
            try txn.delete(m.journal.blocks, blockKey(block, seq))
            try txn.put(m.journal.blocks, blockKey(newBlock, newSeq), value)
        }
    }

    func expectError(_ expected: String, _ body: () throws -> Void) {
        do { try body(); Issue.record("no error; expected: \(expected)") } catch {
            #expect("\(error)" == expected)
        }
    }

    @Test func aMovedEntryFailsItsCheckInRestoreVerifyAndReads() throws {
        let dir = TempDir("moved")
        defer { dir.remove() }
        let path = try Self.makeMirror(dir)
        do {
            let m = try Mirror.open(at: path)
            try Self.moveEntry(m, block: 5, seq: 2, to: 4, newSeq: 2)  // block 5 → block 4 (bit 0)
        }
        let m = try Mirror.open(at: path)
        let message = "record seq:2 is corrupt: block 4: its index entry fails its check (journal/data.mdb is damaged)"
        expectError(message) { try m.restore(at: .latest, to: dir.file("out.img")) }
        expectError(message) { _ = try m.verify() }
        expectError(message) { _ = try readAll(m, at: .latest) }
        #expect(!FileManager.default.fileExists(atPath: dir.file("out.img")))
    }

    @Test func aLostEntryStopsRestoreCompactionAndVerifyNamingItsRecord() throws {
        let dir = TempDir("lost")
        defer { dir.remove() }
        let path = try Self.makeMirror(dir)
        do {
            let m = try Mirror.open(at: path)
            try m.journal.env.write { txn in _ = try txn.delete(m.journal.blocks, blockKey(9, 4)) }
        }
        let m = try Mirror.open(at: path)
        expectError("mirror \(path) is damaged: the block index holds 5 entries for seq:1...seq:4 where its records wrote 6: journal/data.mdb is damaged; `rewind verify` names the records") {
            try m.restore(at: .latest, to: dir.file("out.img"))
        }
        expectError("record seq:4 is corrupt: it wrote 1 index entry, the block index holds 0 (journal/data.mdb is damaged)") {
            _ = try m.verify()
        }
        // Earlier points do not depend on the lost entry.
        try m.restore(at: .seq(3), to: dir.file("three.img"))
        let before = try m.meta()
        expectError("mirror \(path) is damaged: the block index holds 5 entries for seq:1...seq:4 where its records wrote 6: journal/data.mdb is damaged; compaction stopped before deleting anything (`rewind verify` names the records)") {
            _ = try m.compact(to: .latest)
        }
        // Nothing was deleted: every record is still there, and points from the target on still read.
        let after = try m.meta()
        #expect(after.horizon == before.horizon && after.lastSeq == 4)
        var records = 0
        try m.forEachRecord(in: 1...4) { _ in records += 1 }
        #expect(records == 4)
    }

    @Test func anEntryItsRecordDidNotWriteIsFound() throws {
        let dir = TempDir("foreign-entry")
        defer { dir.remove() }
        let path = try Self.makeMirror(dir)
        do {
            let m = try Mirror.open(at: path)
            // Record 2 wrote block 5. An entry for block 6 at seq 2 with a valid check of its
            // own (a stale page, a bug) — and record 2's own entry removed, so the tallies
            // would match if the entry were not tied to its record.
            try m.journal.env.write { txn in
                let raw = try #require(try txn.get(m.journal.blocks, blockKey(5, 2)))
                let (content, _) = try BlockContent.decode(raw, seq: 2, block: 5)
                try txn.delete(m.journal.blocks, blockKey(5, 2))
                try txn.put(m.journal.blocks, blockKey(6, 2), content.encoded(block: 6, seq: 2).value)
            }
        }
        let m = try Mirror.open(at: path)
        let message = "record seq:2 is corrupt: block 6: its index entry does not match the record's write at 20480+4096 (journal/data.mdb is damaged)"
        expectError(message) { try m.restore(at: .latest, to: dir.file("out.img")) }
        expectError(message) { _ = try m.verify() }
    }

    @Test func aRecordUnderAnotherSeqFailsItsCheck() throws {
        let dir = TempDir("moved-record")
        defer { dir.remove() }
        let path = try Self.makeMirror(dir)
        do {
            let m = try Mirror.open(at: path)
            // Record 2's value stored under seq 3 (a flipped bit in a records key).
            try m.journal.env.write { txn in
                let raw = [UInt8](try #require(try txn.get(m.journal.records, seqKey(2))))
                try txn.put(m.journal.records, seqKey(3), raw)
            }
        }
        let m = try Mirror.open(at: path)
        expectError("record seq:3 is corrupt: header checksum mismatch") { _ = try m.verify() }
        expectError("record seq:3 is corrupt: header checksum mismatch") { try m.restore(at: .latest, to: dir.file("out.img")) }
    }

    @Test func aDamagedBookmarkIsReportedNotFollowed() throws {
        let dir = TempDir("bookmark")
        defer { dir.remove() }
        let path = try Self.makeMirror(dir)
        do {
            let m = try Mirror.open(at: path)
            try m.setBookmark("before", at: .seq(1))
            try m.journal.env.write { txn in
                var raw = [UInt8](try #require(try txn.get(m.journal.bookmarks, Array("before".utf8))))
                raw[7] ^= 2  // seq 1 → seq 3
                try txn.put(m.journal.bookmarks, Array("before".utf8), raw)
            }
        }
        let m = try Mirror.open(at: path)
        let message = "mirror \(path) is damaged: bookmark \"before\" fails its check (journal/data.mdb is damaged)"
        expectError(message) { try m.restore(at: .bookmark("before"), to: dir.file("out.img")) }
        expectError(message) { _ = try m.bookmarks() }
    }

    @Test func aTruncatedIndexFileIsAnErrorNotASignal() throws {
        let dir = TempDir("truncated")
        defer { dir.remove() }
        let path = try Self.makeMirror(dir)
        let mdb = path + "/journal/data.mdb"
        let size = fileBytes(mdb).count
        #expect(truncate(mdb, off_t(4096 * 3)) == 0)
        do { _ = try Mirror.open(at: path); Issue.record("opened a truncated journal") } catch {
            #expect("\(error)".hasPrefix("mirror \(path) is damaged: journal/data.mdb is 12288 bytes but its meta page (transaction "))
            #expect("\(error)".hasSuffix("the file is truncated or its meta page damaged"))
        }
        #expect(size > 4096 * 3)
        #expect(truncate(mdb, 0) == 0)
        expectError("mirror \(path) is damaged: journal/data.mdb is empty") { _ = try Mirror.open(at: path) }
    }

    @Test func bookmarkNamesCompareInNFCAndBookmarksWaitForAnUnfinishedRollback() throws {
        let dir = TempDir("nfc")
        defer { dir.remove() }
        let path = try Self.makeMirror(dir)
        let m = try Mirror.open(at: path)
        try m.setBookmark("caf\u{E9}", at: .seq(2))  // é as one code point
        #expect(try m.resolve(Point(parsing: "bookmark:cafe\u{301}")) == 2)  // e + combining accent
        expectError("bookmark \"caf\u{E9}\" already exists (use --force to move it)") { try m.setBookmark("cafe\u{301}") }
        #expect(try m.bookmarks().map(\.name) == ["caf\u{E9}"])
        #expect(Array(try m.bookmarks()[0].name.utf8) == [0x63, 0x61, 0x66, 0xC3, 0xA9])
        try m.journal.env.write { txn in
            var meta = try m.journal.readMeta(txn)
            meta.pendingRollback = 1
            try m.journal.writeMeta(txn, meta)
        }
        expectError(RewindError.interruptedRollback(target: 1).description) { try m.setBookmark("later", at: .seq(1)) }
    }

    @Test func compactionKeepsWhatACrashedServerStillOwesItsSource() throws {
        let dir = TempDir("replay-floor")
        defer { dir.remove() }
        let path = try Self.makeMirror(dir)
        let m = try Mirror.open(at: path)
        // As a server that crashed leaves it: a source recorded, synced only up to seq 2.
        try m.journal.env.write { txn in
            try txn.put(m.journal.meta, Array("source".utf8), [1])
            var meta = try m.journal.readMeta(txn)
            meta.sourceSyncedSeq = 2
            try m.journal.writeMeta(txn, meta)
        }
        expectError("seq:4 is after seq:2, the last record the source is known to hold: its server stopped without syncing it, and the records after it are what the next `rewind serve` replays into the source; start `rewind serve` once, then compact") {
            _ = try m.compact(to: .latest)
        }
        // Retention folds no further than seq 2.
        let report = try #require(try m.compact(keepAgeNanoseconds: 0, keepBytes: nil))
        #expect(report.toHorizon == 2)
    }
}

/// A payload log file deleted or cut short is found by a cheap check (`status`, and `serve`
/// before it appends), naming the file and the first record whose payload is gone.
@Suite struct LogGapTests {
    @Test func aTruncatedOrMissingLogFileIsNamedWithItsFirstLostRecord() throws {
        let dir = TempDir("log-gap")
        defer { dir.remove() }
        let path = try IndexIntegrityTests.makeMirror(dir)
        let log = path + "/log/0000000000000000.log"
        let m = try Mirror.open(at: path)
        #expect(try m.logGaps().isEmpty)
        let h2 = try m.journal.env.read { try m.journal.header($0, seq: 2) }
        let end = try m.meta().logEnd
        // Cut inside record 2's payload: records 2, 3 (its partial blocks: none, a whole-block
        // zero stores nothing) and 4 lie after the cut.
        let cut = h2.segment + UInt64(h2.segmentOffset) + 100
        #expect(truncate(log, off_t(cut)) == 0)
        #expect(try m.logGaps().map(\.description) == ["log/0000000000000000.log is \(cut) bytes, the journal needs \(end): the payload of seq:2 and later records in it is gone"])
        #expect(unlink(log) == 0)
        #expect(try m.logGaps().map(\.description) == ["log/0000000000000000.log is missing: the payload of seq:1 and later records in it is gone"])
        #expect(try m.status().logDamage.count == 1)
    }
}

/// `rollback --source` writes only into the file the mirror journals, and never into a
/// source a running server holds.
@Suite struct RollbackSourceSafetyTests {
    @Test func rollbackRefusesAnotherFileAndAServedSource() throws {
        let dir = TempDir("rollback-source")
        defer { dir.remove() }
        let path = try IndexIntegrityTests.makeMirror(dir)
        let source = dir.file("v.img"), other = dir.file("other.img")
        for file in [source, other] {
            let f = try BlockFile(path: file, mode: .createNew)
            try f.truncate(to: 16 * 4096)
        }
        let m = try Mirror.open(at: path)
        let fd = open(source, O_RDONLY)
        defer { close(fd) }
        try m.recordSource(try SourceIdentity(describing: fd, path: source))
        do { _ = try m.rollback(to: .seq(2), source: other); Issue.record("rolled back into another file") } catch {
            #expect("\(error)" == "mirror \(path) belongs to source \(source); \(other) is another file (use --mirror to give \(other) its own mirror)")
        }
        // As `serve` holds it: an exclusive flock on the source (another descriptor conflicts
        // even in this process).
        #expect(flock(fd, LOCK_EX | LOCK_NB) == 0)
        do { _ = try m.rollback(to: .seq(2), source: source); Issue.record("rolled back into a served source") } catch {
            #expect("\(error)".hasPrefix("\(source) is busy: another rewind serve has it open"))
        }
        flock(fd, LOCK_UN)
        #expect(try m.meta().lastSeq == 4)  // nothing was cut
        #expect(try m.meta().pendingRollback == MirrorMeta.none)
    }
}
