import CLMDB

/// A mirror's journal: the index in one LMDB environment (`MIRROR/journal/`) with four named
/// databases, and the payload in the log (`MIRROR/log/`, `PayloadLog`).
///
/// - `meta`      "mirror" → `MirrorMeta`
/// - `records`   seq (u64 BE) → `RecordHeader` (64 bytes); appended in order (MDB_APPEND)
/// - `blocks`    (block, seq) → `BlockContent`: the point-in-time index
/// - `bookmarks` UTF-8 name → seq (u64 BE)
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
            env = try LMDBEnvironment(directory: directory)
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

    func header(_ txn: LMDBTransaction, seq: UInt64) throws -> RecordHeader {
        guard let raw = try txn.get(records, seqKey(seq)) else {
            throw RewindError.corruptRecord(seq: seq, why: "missing from the journal")
        }
        return try RecordHeader.decode(raw, seq: seq)
    }

    /// The payload bytes of a record, read from the log.
    func payload(seq: UInt64, header h: RecordHeader) throws -> [UInt8] {
        guard h.storedLength > 0 else { return [] }
        var bytes = [UInt8](repeating: 0, count: Int(h.storedLength))
        let complete = try bytes.withUnsafeMutableBytes { try log.read(at: h.segment + UInt64(h.segmentOffset), into: $0) }
        guard complete else {
            throw RewindError.corruptRecord(seq: seq, why: "its payload (log position \(h.segment + UInt64(h.segmentOffset))) is missing from log/")
        }
        return bytes
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

    /// The newest index entry of `block` with seq <= `seq`, or nil (then base.img holds it).
    func lookup(_ cursor: LMDBCursor, block: UInt64, atOrBefore seq: UInt64) throws -> (seq: UInt64, content: BlockContent)? {
        let probe = seq == UInt64.max ? blockKey(block &+ 1, 0) : blockKey(block, seq + 1)
        let entry = try cursor.seek(atLeast: probe) != nil ? try cursor.previous() : try cursor.last()
        guard let entry, let key = decodeBlockKey(entry.key), key.block == block else { return nil }
        return (key.seq, try BlockContent.decode(entry.value, seq: key.seq, block: block))
    }

    // MARK: bookmarks

    func bookmark(_ txn: LMDBTransaction, _ name: String) throws -> UInt64? {
        guard let raw = try txn.get(bookmarks, Array(name.utf8)), raw.count == 8 else { return nil }
        return raw.loadBE(at: 0)
    }

    func allBookmarks(_ txn: LMDBTransaction) throws -> [(name: String, seq: UInt64)] {
        let c = try txn.cursor(bookmarks)
        var out: [(String, UInt64)] = []
        var e = try c.first()
        while let entry = e {
            if entry.value.count == 8 {
                out.append((String(decoding: entry.key, as: UTF8.self), entry.value.loadBE(at: 0)))
            }
            e = try c.next()
        }
        return out
    }
}
