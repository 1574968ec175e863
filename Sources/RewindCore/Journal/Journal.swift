import CLMDB

/// A mirror's journal: the index in one LMDB environment (`MIRROR/journal/`) with four named
/// databases, and the payload in the log (`MIRROR/log/`, `PayloadLog`).
///
/// - `meta`      "mirror" → `MirrorMeta`
/// - `records`   seq (u64 BE) → `RecordHeader` (64 bytes) + `IndexTally` (16); appended in order
/// - `blocks`    (block, seq) → `BlockContent`, self-checking: the point-in-time index
/// - `bookmarks` UTF-8 name (NFC) → seq (u64 BE) + check (u32)
public final class Journal: @unchecked Sendable {
    public let env: LMDBEnvironment
    public let log: PayloadLog
    let path: String
    let meta: LMDBDatabase
    let records: LMDBDatabase
    let blocks: LMDBDatabase
    let bookmarks: LMDBDatabase

    static let names = ["meta", "records", "blocks", "bookmarks"]
    static let metaKey = Array("mirror".utf8)

    init(directory: String, logDirectory: String, mirrorPath: String, create: Bool) throws {
        path = mirrorPath
        log = PayloadLog(directory: logDirectory)
        do {
            env = try LMDBEnvironment(directory: directory, mustExist: !create)
            let dbs = try env.openDatabases(Self.names, create: create)
            (meta, records, blocks, bookmarks) = (dbs[0], dbs[1], dbs[2], dbs[3])
        } catch let e as LMDBError where e.code == MDB_NOTFOUND {
            throw RewindError.notAMirror(path: mirrorPath, why: "the journal has no rewind tables")
        } catch let e as LMDBError where e.isInvalid {
            throw RewindError.damagedMirror(path: mirrorPath, why: "journal/data.mdb is not a readable LMDB file (\(e))")
        }
    }

    /// Long scans read the whole journal through LMDB's map, and each fault maps the whole
    /// page-cache folio around the page (up to 2 MiB): counting bytes read undercounts what is
    /// mapped. So every `residencyCheckBytes` read (or `residencyCheckCalls` small reads) they
    /// check this process's file-backed resident size (0.8 µs) and drop the map's pages past
    /// `mappedBytesMax` (the data stays in the page cache). At 10 M records: verify
    /// peaks at 46 MiB checking every 256 KiB, 168 MiB every 1,024 reads, 540 MiB releasing
    /// every 32 MiB read regardless.
    static let residencyCheckBytes = 256 << 10
    /// Journal pages mapped (file-backed resident memory) past which the map is dropped.
    public static let mappedBytesMax = 32 << 20
    static let residencyCheckCalls = 1024
    /// Reads through the map since the last check (approximate across threads: it only times
    /// the next check).
    nonisolated(unsafe) private var touchedBytes = 0
    nonisolated(unsafe) private var touchedCalls = 0

    @inline(__always)
    func touched(_ bytes: Int) {
        touchedBytes &+= bytes
        touchedCalls &+= 1
        if touchedBytes >= Self.residencyCheckBytes || touchedCalls >= Self.residencyCheckCalls {
            touchedBytes = 0
            touchedCalls = 0
            boundResidency()
        }
    }

    /// Drop the map's pages from this process if its file-backed resident size is past
    /// `mappedBytesMax` (see `LMDBEnvironment.releaseMappedPages(ifResidentAbove:)`).
    public func boundResidency() {
        env.releaseMappedPages(ifResidentAbove: Self.mappedBytesMax)
    }

    // MARK: meta

    func readMeta(_ txn: LMDBTransaction) throws -> MirrorMeta {
        guard let raw = try txn.get(meta, Self.metaKey) else {
            throw RewindError.notAMirror(path: path, why: "the journal has no rewind header")
        }
        return try MirrorMeta.decode(raw, path: path)
    }

    func writeMeta(_ txn: LMDBTransaction, _ m: MirrorMeta) throws {
        try txn.put(meta, Self.metaKey, m.encoded())
    }

    // MARK: records

    /// The first record at or after `seq` (a replica's catch-up leaves seqs without records:
    /// `CatchUp`), or nil past the newest.
    func record(_ txn: LMDBTransaction, atOrAfter seq: UInt64) throws -> (seq: UInt64, header: RecordHeader)? {
        let cursor = try txn.cursor(records)
        guard let e = try cursor.seek(atLeast: seqKey(seq)) else { return nil }
        guard e.key.count == 8 else { throw RewindError.damagedMirror(path: path, why: "malformed record key") }
        let found = e.key.loadBE(at: 0) as UInt64
        return (found, try IndexTally.decodeStored(e.value, seq: found).0)
    }

    /// The last record at or before `seq`, or nil before the first.
    func record(_ txn: LMDBTransaction, atOrBefore seq: UInt64) throws -> (seq: UInt64, header: RecordHeader)? {
        let cursor = try txn.cursor(records)
        let e = seq == UInt64.max ? try cursor.last()
            : try cursor.seek(atLeast: seqKey(seq + 1)) != nil ? try cursor.previous() : try cursor.last()
        guard let e else { return nil }
        guard e.key.count == 8 else { throw RewindError.damagedMirror(path: path, why: "malformed record key") }
        let found = e.key.loadBE(at: 0) as UInt64
        guard found <= seq else { return nil }
        return (found, try IndexTally.decodeStored(e.value, seq: found).0)
    }

    func header(_ txn: LMDBTransaction, seq: UInt64) throws -> RecordHeader {
        try stored(txn, seq: seq).header
    }

    /// A record's header and the tally of the index entries it wrote, both checked.
    func stored(_ txn: LMDBTransaction, seq: UInt64) throws -> (header: RecordHeader, tally: IndexTally) {
        guard let raw = try txn.get(records, seqKey(seq)) else {
            throw RewindError.corruptRecord(seq: seq, why: "missing from the journal")
        }
        return try IndexTally.decodeStored(raw, seq: seq)
    }

    /// The sum of the tallies of the records in `range`: what the block index must hold for
    /// those seqs. One pass over the packed `records` pages.
    func expectedTally(_ txn: LMDBTransaction, seqs range: ClosedRange<UInt64>) throws -> IndexTally {
        var unused: [RecordHeader]?
        return try expectedTally(txn, seqs: range, headers: &unused)
    }

    /// The same, also collecting the records' headers in seq order into `headers` when it is
    /// not nil (callers pass an empty array only for ranges small enough to hold).
    func expectedTally(_ txn: LMDBTransaction, seqs range: ClosedRange<UInt64>, headers: inout [RecordHeader]?) throws -> IndexTally {
        var total = IndexTally()
        let cursor = try txn.cursor(records)
        var expected = range.lowerBound
        var entry = try cursor.seek(atLeast: seqKey(expected))
        while let e = entry, expected <= range.upperBound {
            guard e.key.count == 8 else {
                throw RewindError.corruptRecord(seq: expected, why: "missing from the journal (journal/data.mdb is damaged)")
            }
            let found = e.key.loadBE(at: 0) as UInt64
            if found != expected {
                // Only a catch-up may follow a gap: the one that stands for exactly those seqs.
                guard found > expected, found <= range.upperBound,
                      let (h, _) = try? IndexTally.decodeStored(e.value, seq: found), h.kind == .catchUp,
                      h.offset < expected, expected == range.lowerBound || h.offset == expected - 1 else {
                    throw RewindError.corruptRecord(seq: expected, why: "missing from the journal (journal/data.mdb is damaged)")
                }
                // Headers are kept by position: the skipped seqs get the catch-up's (no entry names them).
                for _ in expected..<found { headers?.append(h) }
                expected = found
            }
            let (header, tally) = try IndexTally.decodeStored(e.value, seq: expected)
            total.add(tally)
            headers?.append(header)
            touched(IndexTally.storedSize + 8)
            expected += 1
            entry = try cursor.next()
        }
        guard expected > range.upperBound else {
            throw RewindError.corruptRecord(seq: expected, why: "missing from the journal (journal/data.mdb is damaged)")
        }
        return total
    }

    /// The payload bytes of a record, read from the log.
    /// Bytes of a record's payload at a log position (`seq` names it when they are missing).
    func readPayload(at position: UInt64, into dst: UnsafeMutableRawBufferPointer, seq: UInt64) throws {
        guard try log.read(at: position, into: dst) else {
            throw RewindError.corruptRecord(seq: seq, why: "its payload (log position \(position)) is missing from log/")
        }
    }

    func payload(seq: UInt64, header h: RecordHeader) throws -> [UInt8] {
        guard h.kind != .catchUp else { throw RewindError.invalidArgument("seq:\(seq) is a catch-up: read it in pieces") }
        guard h.storedLength > 0 else { return [] }
        var bytes = [UInt8](repeating: 0, count: Int(h.storedLength))
        try bytes.withUnsafeMutableBytes { try readPayload(at: h.payloadPosition, into: $0, seq: seq) }
        return bytes
    }

    /// A record's checksum taken over its payload as stored, read in pieces of whole blocks.
    func storedChecksum(seq: UInt64, header h: RecordHeader, blockSize: Int) throws -> UInt64 {
        let hasher = PayloadHasher(blockSize: blockSize)
        try readPayloadPieces(at: h.payloadPosition, count: h.storedBytes, blockSize: blockSize, seq: seq) { hasher.update($0) }
        return hasher.checksum
    }

    /// `count` payload bytes from log position `position`, handed to `body` in pieces of at
    /// most `maxBytes` (whole blocks but the last): a payload of any size, never held whole.
    func readPayloadPieces(at position: UInt64, count: UInt64, blockSize: Int, maxBytes: Int = 4 << 20, seq: UInt64,
                           _ body: (UnsafeRawBufferPointer) throws -> Void) throws {
        let per = max(1, maxBytes / blockSize) * blockSize
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: per, alignment: 4096)
        defer { buffer.deallocate() }
        var at: UInt64 = 0
        while at < count {
            let piece = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<Int(min(UInt64(per), count - at))])
            try readPayload(at: position + at, into: piece, seq: seq)
            try body(UnsafeRawBufferPointer(piece))
            at += UInt64(piece.count)
        }
    }

    /// Delete the records in `range`, `Compactor.chunkRecords` per write transaction so a live
    /// writer is never held up long. Returns how many were there.
    func deleteRecords(_ range: ClosedRange<UInt64>) throws -> UInt64 {
        var removed: UInt64 = 0
        var next = range.lowerBound
        while next <= range.upperBound {
            let end = min(range.upperBound, next + UInt64(Compactor.chunkRecords) - 1)
            try env.write { txn in
                for seq in next...end where try txn.delete(records, seqKey(seq)) { removed += 1 }
            }
            next = end + 1
        }
        return removed
    }

    // MARK: blocks

    /// Read one journal block into `dst` (a block's size), checked against the XXH3 its index
    /// entry carries (invariant 6).
    func readBlock(seq: UInt64, block: UInt64, segment: UInt64, offset: UInt32, hash: UInt64,
                   into dst: UnsafeMutableRawBufferPointer) throws {
        guard try log.read(at: segment + UInt64(offset), into: dst) else {
            throw RewindError.corruptBlock(seq: seq, block: block, why: "its payload (log position \(segment + UInt64(offset))) is missing from log/")
        }
        guard xxh3(UnsafeRawBufferPointer(dst)) == hash else {
            throw RewindError.corruptBlock(seq: seq, block: block, why: "payload checksum mismatch (data damaged on disk)")
        }
    }

    /// `readBlock` from the page cache only (`PayloadLog.readIfCached`): false when any part
    /// would wait for the disk, or the payload does not match its checksum.
    func readBlockIfCached(segment: UInt64, offset: UInt32, hash: UInt64, into dst: UnsafeMutableRawBufferPointer) -> Bool {
        log.readIfCached(at: segment + UInt64(offset), into: dst) && xxh3(UnsafeRawBufferPointer(dst)) == hash
    }

    /// The newest index entry of `block` with seq <= `seq`, or nil (then base.img holds it).
    func lookup(_ cursor: LMDBCursor, block: UInt64, atOrBefore seq: UInt64) throws -> (seq: UInt64, content: BlockContent)? {
        let probe = seq == UInt64.max ? blockKey(block &+ 1, 0) : blockKey(block, seq + 1)
        let entry = try cursor.seek(atLeast: probe) != nil ? try cursor.previous() : try cursor.last()
        guard let entry else { return nil }
        guard let key = decodeBlockKey(entry.key) else {
            throw RewindError.damagedMirror(path: path, why: "an index key is \(entry.key.count) bytes (journal/data.mdb is damaged)")
        }
        guard key.block == block else { return nil }
        return (key.seq, try BlockContent.decode(entry.value, seq: key.seq, block: block).content)
    }

    // MARK: bookmarks

    /// A bookmark's value: its seq (u64 BE) and the low 32 bits of XXH3-64 of the name's
    /// bytes seeded with the seq, so a flipped bit in the name or the seq is found.
    static func bookmarkValue(name: String, seq: UInt64) -> [UInt8] {
        var v = [UInt8](); v.appendBE(seq)
        v.appendLE(UInt32(truncatingIfNeeded: xxh3(Array(name.utf8), seed: seq)))
        return v
    }

    static func decodeBookmark(_ raw: UnsafeRawBufferPointer, name: String, path: String) throws -> UInt64 {
        // A damaged name may hold any bytes: shown escaped, never raw on a terminal.
        var shown = name.unicodeScalars.prefix(64).map { $0.properties.generalCategory == .control || $0 == "\u{FFFD}" || $0 == "\""
            ? $0.escaped(asASCII: true) : String($0) }.joined()
        shown = name.unicodeScalars.count > 64 ? "\"\(shown)…\" (\(name.utf8.count) bytes)" : "\"\(shown)\""
        guard raw.count == 12 else {
            throw RewindError.damagedMirror(path: path, why: "bookmark \(shown) is stored in \(raw.count) bytes (journal/data.mdb is damaged)")
        }
        let seq = raw.loadBE(at: 0)
        guard UInt32(truncatingIfNeeded: xxh3(Array(name.utf8), seed: seq)) == raw.loadLE(at: 8, as: UInt32.self) else {
            throw RewindError.damagedMirror(path: path, why: "bookmark \(shown) fails its check (journal/data.mdb is damaged)")
        }
        return seq
    }

    func bookmark(_ txn: LMDBTransaction, _ name: String) throws -> UInt64? {
        guard let raw = try txn.get(bookmarks, Array(name.utf8)) else { return nil }
        return try Self.decodeBookmark(raw, name: name, path: path)
    }

    func allBookmarks(_ txn: LMDBTransaction) throws -> [(name: String, seq: UInt64)] {
        let c = try txn.cursor(bookmarks)
        var out: [(String, UInt64)] = []
        var e = try c.first()
        while let entry = e {
            let name = String(decoding: entry.key, as: UTF8.self)
            out.append((name, try Self.decodeBookmark(entry.value, name: name, path: path)))
            e = try c.next()
        }
        return out
    }
}
