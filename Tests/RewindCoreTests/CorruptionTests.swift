import Foundation
import Testing
@testable import RewindCore

/// Invariant 6: every payload is checked when read back; damage is reported by record, never
/// returned as data. Bytes are flipped in the files themselves (the payload log, LMDB), as a
/// failing disk would.
@Suite struct CorruptionTests {
    /// A payload no other bytes in the file resemble, so the test can find it on disk.
    static func marker(_ tag: UInt8) -> [UInt8] {
        (0..<4096).map { UInt8(truncatingIfNeeded: ($0 &* 131) ^ Int(tag) ^ 0x5A) }
    }

    static func checksum(_ b: [UInt8]) -> UInt64 { b.withUnsafeBytes { payloadChecksum($0, blockSize: 4096) } }

    /// Flip one byte inside the first copy of `needle` in `file`.
    static func flipByte(in file: String, inside needle: [UInt8], at index: Int) throws {
        var bytes = fileBytes(file)
        let first = needle.prefix(64)
        guard let at = (0..<(bytes.count - needle.count)).first(where: { i in
            bytes[i] == first[0] && Array(bytes[i..<i + 64]) == Array(first)
        }) else { throw RewindError.invalidArgument("marker not found in \(file)") }
        bytes[at + index] ^= 0xFF
        try Data(bytes).write(to: URL(fileURLWithPath: file))
    }

    @Test func flippedPayloadByteIsReportedByVerifyRestoreAndReads() throws {
        let dir = TempDir("corrupt")
        defer { dir.remove() }
        let path = dir.file("m")
        do {
            let m = try Mirror.create(at: path, size: 64 * 4096)
            try m.append([.write(0, [UInt8](repeating: 1, count: 4096))])
            try m.append([.write(8192, Self.marker(7)), .flush])
            try m.append([.write(4096, [UInt8](repeating: 3, count: 100))])
            try m.sync()
        }
        try Self.flipByte(in: path + "/log/0000000000000000.log", inside: Self.marker(7), at: 1000)
        let m = try Mirror.open(at: path)
        #expect(throws: RewindError.self) { _ = try m.verify() }
        do { _ = try m.verify() } catch let e as RewindError {
            #expect(e.description == "record seq:2 is corrupt: payload checksum mismatch (stored \(hex(Self.checksum(Self.marker(7)))), computed \(hex(Self.checksum({ var b = Self.marker(7); b[1000] ^= 0xFF; return b }()))))")
        }
        do {
            try m.restore(at: .latest, to: dir.file("out.img"))
            Issue.record("restore returned damaged data")
        } catch let e as RewindError {
            #expect(e.description == "record seq:2 is corrupt: block 2: payload checksum mismatch (data damaged on disk)")
        }
        #expect(!FileManager.default.fileExists(atPath: dir.file("out.img")))
        #expect(try FileManager.default.contentsOfDirectory(atPath: dir.path) == ["m"])  // no temporary image left
        // Reads of the damaged block fail; reads of healthy blocks and of earlier points still work.
        let s = try Snapshot(mirror: m, point: .latest)
        #expect(throws: RewindError.self) { _ = try s.read(at: 8192, count: 10) }
        #expect(try s.read(at: 0, count: 4) == [1, 1, 1, 1])
        #expect(try Snapshot(mirror: m, point: .seq(1)).read(at: 8192, count: 4) == [0, 0, 0, 0])
    }

    @Test func damagedRecordHeaderIsReportedBySeq() throws {
        let dir = TempDir("header")
        defer { dir.remove() }
        let m = try Mirror.create(at: dir.file("m"), size: 16 * 4096)
        try m.append([.write(0, [1]), .write(1, [2]), .write(2, [3])])
        // Overwrite record 2's header with one whose checksum does not match.
        try m.journal.env.write { txn in
            var raw = [UInt8](try txn.get(m.journal.records, seqKey(2))!)
            raw[20] ^= 0x01
            try txn.put(m.journal.records, seqKey(2), raw)
        }
        #expect(throws: RewindError.self) { _ = try m.verify() }
        do { _ = try m.verify() } catch let e as RewindError {
            #expect(e.description == "record seq:2 is corrupt: header checksum mismatch")
        }
        // A missing record (a gap in seqs) is named too.
        try m.journal.env.write { txn in _ = try txn.delete(m.journal.records, seqKey(2)) }
        do { _ = try m.verify(); Issue.record("verify passed a gap") } catch let e as RewindError {
            #expect(e.description == "record seq:2 is corrupt: missing (next record is seq:3)")
        }
    }

    @Test func zeroedOrForeignJournalFailsToOpenWithAClearMessage() throws {
        let dir = TempDir("foreign")
        defer { dir.remove() }
        let path = dir.file("m")
        do { _ = try Mirror.create(at: path, size: 4096) }
        let mdb = path + "/journal/data.mdb"
        let size = fileBytes(mdb).count
        try Data(count: size).write(to: URL(fileURLWithPath: mdb))
        do { _ = try Mirror.open(at: path); Issue.record("opened a zeroed journal") } catch let e as RewindError {
            #expect(e.description == "mirror \(path) is damaged: journal/data.mdb has no valid LMDB meta page (\(size) bytes)")
        }
        // A directory that is not a mirror.
        try FileManager.default.createDirectory(atPath: dir.file("plain"), withIntermediateDirectories: false)
        do { _ = try Mirror.open(at: dir.file("plain")); Issue.record("opened a plain directory") } catch let e as RewindError {
            #expect(e.description == "\(dir.file("plain")) is not a rewind mirror: journal/data.mdb is missing")
        }
    }

    /// Rewrite the raw header of the mirror at `path` in place (through the journal alone, as
    /// `Mirror.open` would refuse it).
    static func editHeader(_ path: String, _ edit: (inout [UInt8]) -> Void) throws {
        let j = try Journal(directory: path + "/journal", logDirectory: path + "/log", mirrorPath: path, create: false)
        try j.env.write { txn in
            var raw = [UInt8](try txn.get(j.meta, Journal.metaKey)!)
            edit(&raw)
            try txn.put(j.meta, Journal.metaKey, raw)
        }
    }

    @Test func newerFormatAndDamagedHeaderAreRefused() throws {
        let dir = TempDir("format")
        defer { dir.remove() }
        let path = dir.file("m")
        do { _ = try Mirror.create(at: path, size: 4096) }
        try Self.editHeader(path) { $0[8] = 9 }  // format 9
        do { _ = try Mirror.open(at: path); Issue.record("opened a newer format") } catch let e as RewindError {
            #expect(e.description == "\(path) has mirror format 9, newer than this rewind understands (3); upgrade rewind")
        }
        try Self.editHeader(path) { $0[8] = 1 }  // format 1: payload inside LMDB, not read by this rewind
        do { _ = try Mirror.open(at: path); Issue.record("opened format 1") } catch let e as RewindError {
            #expect(e.description == "mirror \(path) is damaged: mirror format 1 keeps payload inside LMDB; this rewind reads format 3 only (restore it with the rewind that wrote it, then re-create)")
        }
        try Self.editHeader(path) { $0[8] = 2 }  // format 2: index entries without checks
        do { _ = try Mirror.open(at: path); Issue.record("opened format 2") } catch let e as RewindError {
            #expect(e.description == "mirror \(path) is damaged: mirror format 2 has no checks on its block index entries; this rewind reads format 3 only (restore it with the rewind that wrote it, then re-create)")
        }
        try Self.editHeader(path) { $0[8] = 3; $0[40] ^= 1 }  // right format, damaged field
        do { _ = try Mirror.open(at: path); Issue.record("opened a damaged header") } catch let e as RewindError {
            #expect(e.description == "mirror \(path) is damaged: header checksum mismatch")
        }
    }
}
