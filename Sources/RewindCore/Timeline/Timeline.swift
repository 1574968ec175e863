/// One interval of `timeline --every`: what the journal holds between `start` and `start+width`.
public struct TimelineBucket: Sendable, Codable {
    public var start: UInt64
    public var firstSeq: UInt64
    public var lastSeq: UInt64
    public var records: UInt64 = 0
    public var bytes: UInt64 = 0
    public var writes: UInt64 = 0
    public var zeroes: UInt64 = 0
    public var trims: UInt64 = 0
    public var flushes: UInt64 = 0
    /// Catch-ups (a replica's: many blocks at once, the seqs before them not points here).
    public var catchUps: UInt64 = 0
}

extension Mirror {
    /// Visit the records with seq in `range`, in order, inside one read transaction.
    /// Reads only the small headers: fast and bounded in memory whatever the journal's size.
    public func forEachRecord(in range: ClosedRange<UInt64>, _ body: (Record) throws -> Void) throws {
        try journal.env.read { txn in
            let cursor = try txn.cursor(journal.records)
            var entry = try cursor.seek(atLeast: seqKey(range.lowerBound))
            var count = 0
            while let e = entry {
                let seq = e.key.loadBE(at: 0)
                guard seq <= range.upperBound else { break }
                count += 1
                journal.touched(IndexTally.storedSize + 8)
                try body(Record(seq: seq, header: try IndexTally.decodeStored(e.value, seq: seq).0))
                entry = try cursor.next()
            }
        }
    }

    /// Group the records in `range` into intervals of `widthNanoseconds` (aligned to the epoch),
    /// handing each finished interval to `body`. Empty intervals are skipped.
    public func forEachBucket(in range: ClosedRange<UInt64>, widthNanoseconds: UInt64,
                              _ body: (TimelineBucket) throws -> Void) throws {
        var bucket: TimelineBucket?
        try forEachRecord(in: range) { r in
            let start = r.header.timestamp - r.header.timestamp % widthNanoseconds
            if let b = bucket, b.start != start { try body(b); bucket = nil }
            if bucket == nil { bucket = TimelineBucket(start: start, firstSeq: r.seq, lastSeq: r.seq) }
            bucket!.lastSeq = r.seq
            bucket!.records += 1
            bucket!.bytes += r.header.kind == .catchUp ? r.header.length * UInt64(blockSize) : r.header.length
            switch r.header.kind {
            case .write: bucket!.writes += 1
            case .zero: bucket!.zeroes += 1
            case .trim: bucket!.trims += 1
            case .flush: bucket!.flushes += 1
            case .catchUp: bucket!.catchUps += 1
            }
        }
        if let b = bucket { try body(b) }
    }

    // MARK: bookmarks

    /// Name the point `point` (default latest). Works beside a live writer: one short transaction.
    @discardableResult
    public func setBookmark(_ given: String, at point: Point = .latest, replace: Bool = false) throws -> UInt64 {
        let name = try validateBookmarkName(given)
        return try journal.env.write { txn in
            let m = try journal.readMeta(txn)
            if m.pendingRollback != MirrorMeta.none { throw RewindError.interruptedRollback(target: m.pendingRollback) }
            let seq = try resolve(point, txn)
            if !replace, try journal.bookmark(txn, name) != nil {
                throw RewindError.invalidArgument("bookmark \"\(name)\" already exists (use --force to move it)")
            }
            try txn.put(journal.bookmarks, Array(name.utf8), Journal.bookmarkValue(name: name, seq: seq))
            return seq
        }
    }

    public func deleteBookmark(_ given: String) throws {
        let name = try validateBookmarkName(given)
        try journal.env.write { txn in
            guard try txn.delete(journal.bookmarks, Array(name.utf8)) else { throw RewindError.noSuchBookmark(name) }
        }
    }

    /// Every bookmark with its seq and that record's time.
    public func bookmarks() throws -> [(name: String, seq: UInt64, time: UInt64)] {
        try journal.env.read { txn in
            let m = try journal.readMeta(txn)
            return try journal.allBookmarks(txn).map { b in
                let t = b.seq <= m.horizon ? m.horizonTime : (try? journal.header(txn, seq: b.seq).timestamp) ?? 0
                return (b.name, b.seq, t)
            }
        }
    }
}
