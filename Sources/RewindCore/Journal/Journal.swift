import CLMDB

/// The LMDB side of a mirror: one environment in `MIRROR/journal/` with five named databases.
///
/// - `meta`      "mirror" → `MirrorMeta`
/// - `records`   seq (u64 BE) → `RecordHeader` (64 bytes); appended in order (MDB_APPEND)
/// - `segments`  first seq of a group commit (u64 BE) → that commit's payload bytes, packed
///               end to end so a 4 KiB write costs 4 KiB, not the two pages a lone 4 KiB
///               LMDB value takes (overflow pages carry a header)
/// - `blocks`    (block, seq) → `BlockContent`: the point-in-time index
/// - `bookmarks` UTF-8 name → seq (u64 BE)
public final class Journal: @unchecked Sendable {
    public let env: LMDBEnvironment
    let path: String
    let meta: LMDBDatabase
    let records: LMDBDatabase
    let segments: LMDBDatabase
    let blocks: LMDBDatabase
    let bookmarks: LMDBDatabase

    static let names = ["meta", "records", "segments", "blocks", "bookmarks"]
    static let metaKey = Array("mirror".utf8)

    init(directory: String, mirrorPath: String, create: Bool) throws {
        path = mirrorPath
        do {
            env = try LMDBEnvironment(directory: directory)
            let dbs = try env.openDatabases(Self.names, create: create)
            (meta, records, segments, blocks, bookmarks) = (dbs[0], dbs[1], dbs[2], dbs[3], dbs[4])
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
    /// Readahead for sequential payload reads (see `Readahead`).
    let readahead = Readahead()

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

    /// The payload bytes of a record, pointing into the map (valid while `txn` lives).
    func payload(_ txn: LMDBTransaction, seq: UInt64, header h: RecordHeader) throws -> UnsafeRawBufferPointer {
        guard h.storedLength > 0 else { return UnsafeRawBufferPointer(start: nil, count: 0) }
        let segment = try segmentBytes(txn, h.segment, seq: seq)
        let end = Int(h.segmentOffset) + Int(h.storedLength)
        guard end <= segment.count else {
            throw RewindError.corruptRecord(seq: seq, why: "payload runs past its segment (\(end) > \(segment.count))")
        }
        readahead.willRead(segment: h.segment, segment, Int(h.segmentOffset)..<end)
        return UnsafeRawBufferPointer(rebasing: segment[Int(h.segmentOffset)..<end])
    }

    func segmentBytes(_ txn: LMDBTransaction, _ id: UInt64, seq: UInt64) throws -> UnsafeRawBufferPointer {
        guard let segment = try txn.get(segments, seqKey(id)) else {
            throw RewindError.corruptRecord(seq: seq, why: "its payload segment \(id) is missing")
        }
        return segment
    }

    /// Drop from the page cache the payload pages of the segments written for records `seqs`
    /// (a segment is keyed by the seq of its first record; see `LMDBEnvironment.dropFromPageCache`).
    func dropSegmentsFromPageCache(_ seqs: ClosedRange<UInt64>) {
        try? env.read { txn in
            let cursor = try txn.cursor(segments)
            var entry = try cursor.seek(atLeast: seqKey(seqs.lowerBound))
            while let e = entry, e.key.count == 8, e.key.loadBE(at: 0) <= seqs.upperBound {
                env.dropFromPageCache(e.value)
                entry = try cursor.next()
            }
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

    /// The bytes of one journal block, checked against the XXH3 its index entry carries
    /// (invariant 6). Points into the map; valid while `txn` lives.
    func verifiedBlock(_ txn: LMDBTransaction, seq: UInt64, block: UInt64, segment: UInt64, offset: UInt32,
                       hash: UInt64, blockSize: Int) throws -> UnsafeRawBufferPointer {
        let bytes = try segmentBytes(txn, segment, seq: seq)
        let start = Int(offset), end = start + blockSize
        guard end <= bytes.count else { throw RewindError.corruptBlock(seq: seq, block: block, why: "points past its segment") }
        readahead.willRead(segment: segment, bytes, start..<end)
        let slice = UnsafeRawBufferPointer(rebasing: bytes[start..<end])
        guard xxh3(slice) == hash else {
            throw RewindError.corruptBlock(seq: seq, block: block, why: "payload checksum mismatch (data damaged on disk)")
        }
        return slice
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
