/// Appending records (see `JournalWriter` for the group commit) and indexing them.
extension Mirror {
    /// Append `changes` as consecutive records, sync the log and commit the index, and return
    /// their seqs. Durable when it returns. A failure leaves neither index nor log changed.
    @discardableResult
    public func append(_ changes: [Change], sourceSynced: UInt64? = nil) throws -> ClosedRange<UInt64> {
        let writer = JournalWriter(mirror: self)
        do {
            let seqs = try writer.append(changes, sourceSynced: sourceSynced)
            try writer.commit()
            return seqs
        } catch {
            writer.abort(keepLog: false)
            throw error
        }
    }

    /// Index one record whose payload is in the log: an entry per stored block (with its
    /// XXH3, in `blockHashes`), zero entries for the whole blocks a zero or trim clears, and
    /// the record header itself. Shared by the append path and log replay, so both build the
    /// same index from the same records.
    func index(_ h: RecordHeader, seq: UInt64, blockHashes: [UInt64], _ txn: LMDBTransaction, _ cursor: LMDBCursor,
               catchUp runs: [CatchUpRun]? = nil) throws {
        let bs = UInt64(blockSize)
        var tally = IndexTally()
        if h.kind == .catchUp {
            // The run list's blocks come first in the payload; then each data run's blocks.
            guard let runs else { throw RewindError.invalidArgument("a catch-up indexed without its runs") }
            var i = CatchUp.listBlocks(runs: runs.count, blockSize: blockSize)
            for run in runs {
                if run.zero {
                    try markZero(txn, cursor, blocks: run.blocks, seq: seq, tally: &tally)
                    continue
                }
                for block in run.blocks {
                    // Entries name each block's own log position (offset 0): a catch-up may be
                    // longer than a 32-bit offset reaches.
                    let (value, hash) = BlockContent.data(segment: h.payloadPosition + UInt64(i) * bs, offset: 0,
                                                          hash: blockHashes[i]).encoded(block: block, seq: seq)
                    try txn.put(journal.blocks, blockKey(block, seq), value)
                    tally.add(hash)
                    i += 1
                }
            }
            try txn.put(journal.records, seqKey(seq), tally.stored(header: h, seq: seq), append: true)
            return
        }
        let (stored, zeroRange) = Self.layout(kind: h.kind, offset: h.offset, length: h.length, blockSize: bs)
        for (i, block) in stored.enumerated() {
            let (value, hash) = BlockContent.data(segment: h.segment, offset: h.segmentOffset + UInt32(i * blockSize),
                                                  hash: blockHashes[i]).encoded(block: block, seq: seq)
            try txn.put(journal.blocks, blockKey(block, seq), value)
            tally.add(hash)
        }
        if !zeroRange.isEmpty { try markZero(txn, cursor, blocks: zeroRange, seq: seq, tally: &tally) }
        try txn.put(journal.records, seqKey(seq), tally.stored(header: h, seq: seq), append: true)
    }

    /// What one change's index update counts as read through the map (see `Journal.touched`).
    static let indexUpdateBytes = Journal.residencyCheckBytes / 16

    /// What a record stores: the blocks whose content goes into its payload, in block order —
    /// every block a write touches; only the partial head and tail blocks of a zero or trim —
    /// and the whole blocks a zero or trim turns to zeros. `verify` checks stored lengths by it.
    static func layout(kind: ChangeKind, offset: UInt64, length: UInt64, blockSize bs: UInt64)
        -> (stored: [UInt64], zeroed: Range<UInt64>) {
        guard length > 0, kind != .flush else { return ([], 0..<0) }
        let end = offset + length
        let first = offset / bs, last = (end - 1) / bs
        if kind == .write { return (Array(first...last), 0..<0) }
        var stored: [UInt64] = []
        if offset % bs != 0 { stored.append(first) }
        if end % bs != 0 && stored.last != last { stored.append(last) }
        let fullStart = (offset + bs - 1) / bs, fullEnd = end / bs
        return (stored, fullStart < fullEnd ? fullStart..<fullEnd : 0..<0)
    }

    func validate(_ c: Change) throws {
        switch c.kind {
        case .flush:
            break
        case .catchUp:
            throw RewindError.invalidArgument("a catch-up is written by CatchUpWriter, not appended as a change")
        case .write:
            guard UInt64(c.data.count) == c.length else {
                throw RewindError.invalidArgument("write of \(c.length) bytes carries \(c.data.count) bytes of data")
            }
            guard c.length <= Self.maxWriteBytes else {
                throw RewindError.invalidArgument("write of \(c.length) bytes exceeds the \(Self.maxWriteBytes)-byte limit")
            }
            fallthrough
        case .zero, .trim:
            guard c.offset <= volumeSize, c.length <= volumeSize - c.offset else {
                throw RewindError.outOfRange(offset: c.offset, length: c.length, size: volumeSize)
            }
        }
    }

    /// Add zero entries at `seq` for the blocks of `range` that do not already read as zeros:
    /// those whose newest entry holds data, and those with no entry where base.img has data.
    private func markZero(_ txn: LMDBTransaction, _ cursor: LMDBCursor, blocks range: Range<UInt64>, seq: UInt64,
                          tally: inout IndexTally) throws {
        let bs = UInt64(blockSize)
        let window: UInt64 = 1 << 16  // blocks examined at once, bounding memory
        var windowStart = range.lowerBound
        let extents = try base.dataExtents(size: range.upperBound * bs, from: range.lowerBound * bs)
        var extentIndex = 0
        while windowStart < range.upperBound {
            let windowEnd = min(windowStart + window, range.upperBound)
            // Newest entry of each block in the window that has one: true if it is data.
            var newest: [UInt64: Bool] = [:]
            var entry = try cursor.seek(atLeast: blockKey(windowStart, 0))
            while let e = entry {
                guard let key = decodeBlockKey(e.key) else {
                    throw RewindError.damagedMirror(path: path, why: "an index key is \(e.key.count) bytes (journal/data.mdb is damaged)")
                }
                guard key.block < windowEnd else { break }
                newest[key.block] = try BlockContent.decode(e.value, seq: key.seq, block: key.block).content != .zero
                entry = try cursor.next()
            }
            var marks: [UInt64] = newest.filter { $0.value }.map { $0.key }
            while extentIndex < extents.count {
                let ext = extents[extentIndex]
                let a = max(ext.lowerBound / bs, windowStart)
                let b = min((ext.upperBound + bs - 1) / bs, windowEnd)
                if a < b {
                    for block in a..<b where newest[block] == nil { marks.append(block) }
                }
                if (ext.upperBound + bs - 1) / bs > windowEnd { break }
                extentIndex += 1
            }
            marks.sort()
            for block in marks {
                let (value, hash) = BlockContent.zero.encoded(block: block, seq: seq)
                try txn.put(journal.blocks, blockKey(block, seq), value)
                tally.add(hash)
            }
            windowStart = windowEnd
        }
    }
}
