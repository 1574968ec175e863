/// Appending records: the group commit.
extension Mirror {
    /// Append `changes` as consecutive records in one LMDB write transaction and return
    /// their seqs. Durable once `sync()` returns (or at the next commit's fdatasync).
    ///
    /// Each write is stored as the whole blocks it touches: a partial head or tail block is
    /// read from the volume's current content and merged (read-modify-write), so every index
    /// entry names a complete block and a point read is one seek. Zero and trim records store
    /// only their partial edge blocks; their whole blocks get empty ("zero") index entries,
    /// and none at all where the block already reads as zeros.
    /// `sourceSynced`, when given, records that the served source is fsynced up to that seq
    /// (what a restart must replay from), at no extra commit.
    @discardableResult
    public func append(_ changes: [Change], sourceSynced: UInt64? = nil) throws -> ClosedRange<UInt64> {
        do {
            return try journal.env.write { txn in try appendInTransaction(txn, changes, sourceSynced: sourceSynced) }
        } catch let e as LMDBError {
            throw RewindError.journal(e)
        }
    }

    /// Drop the payload of records `seqs` (one `append`'s) from the page cache, once on disk —
    /// what `serve` does after each commit, the journal being write-mostly (see
    /// `LMDBEnvironment.dropFromPageCache`). Without per-commit syncs the pages are still
    /// dirty and it does nothing.
    public func dropPayloadFromCache(_ seqs: ClosedRange<UInt64>) {
        guard journal.env.syncsEachCommit else { return }
        journal.dropSegmentsFromPageCache(seqs)
    }

    private func appendInTransaction(_ txn: LMDBTransaction, _ changes: [Change], sourceSynced: UInt64?) throws -> ClosedRange<UInt64> {
        var meta = try journal.readMeta(txn)
        if let sourceSynced { meta.sourceSyncedSeq = min(sourceSynced, meta.lastSeq) }
        if meta.pendingRollback != MirrorMeta.none { throw RewindError.interruptedRollback(target: meta.pendingRollback) }
        for c in changes { try validate(c) }
        let cursor = try txn.cursor(journal.blocks)
        var segment = SegmentBuilder()
        var scratch = [UInt8](repeating: 0, count: blockSize)  // a partial block's current content
        let bs = UInt64(blockSize)
        var seq = meta.lastSeq
        var cumulative = meta.lastCumulative
        let firstSeq = seq + 1
        for change in changes {
            seq += 1
            // Each index update faults in a journal page, which may map the 2 MiB folio around
            // it: counted as `indexUpdateBytes` of reading, so even one large group commit of
            // scattered writes checks its resident size every 16 changes (`Journal.touched`).
            journal.touched(Self.indexUpdateBytes)
            let now = max(wallClockNanoseconds(), meta.lastTime)
            meta.lastTime = now
            var header = RecordHeader(kind: change.kind, fua: change.fua, timestamp: now, offset: change.offset,
                                      length: change.length, checksum: 0, segment: 0, segmentOffset: 0,
                                      storedLength: 0, cumulative: cumulative)
            let end = change.offset + change.length
            let (stored, zeroRange) = Self.layout(kind: change.kind, offset: change.offset, length: change.length, blockSize: bs)
            if !stored.isEmpty {
                let bytes = stored.count * blockSize
                if segment.count > 0 && segment.count + bytes > Self.segmentCapBytes {
                    try segment.flush(into: txn, journal.segments)
                }
                if segment.count == 0 { segment.id = seq }
                let start = segment.count
                let aligned = change.kind == .write && change.offset % bs == 0 && change.length % bs == 0
                if aligned {
                    segment.append(change.data)  // the common case: one copy, no read-modify-write
                } else {
                    segment.grow(by: bytes)
                }
                var blockHashes = [UInt64](); blockHashes.reserveCapacity(stored.count)
                for (i, block) in stored.enumerated() {
                    let slot = start + i * blockSize
                    if !aligned {
                        try fillBlock(slot: slot, block: block, change: change, end: end, txn, cursor, &segment, &scratch)
                    }
                    let hash = segment.hash(slot, blockSize)
                    blockHashes.append(hash)
                    try txn.put(journal.blocks, blockKey(block, seq),
                                BlockContent.data(segment: segment.id, offset: UInt32(slot), hash: hash).encoded())
                }
                header.segment = segment.id
                header.segmentOffset = UInt32(start)
                header.storedLength = UInt32(bytes)
                header.checksum = payloadChecksum(blockHashes: blockHashes)
                cumulative += UInt64(bytes)
                header.cumulative = cumulative
            }
            if !zeroRange.isEmpty {
                try markZero(txn, cursor, blocks: zeroRange, seq: seq)
            }
            try txn.put(journal.records, seqKey(seq), header.encoded(), append: true)
        }
        if segment.count > 0 { try segment.flush(into: txn, journal.segments) }
        meta.lastSeq = seq
        meta.lastCumulative = cumulative
        try journal.writeMeta(txn, meta)
        return firstSeq...max(seq, firstSeq)
    }

    /// Build one stored block of an unaligned write, or a partial edge block of a zero/trim:
    /// the block's current content with the change's part applied.
    private func fillBlock(slot: Int, block: UInt64, change: Change, end: UInt64, _ txn: LMDBTransaction, _ cursor: LMDBCursor,
                           _ segment: inout SegmentBuilder, _ scratch: inout [UInt8]) throws {
        let bs = UInt64(blockSize)
        let blockStart = block * bs
        let covered = max(blockStart, change.offset)..<min(blockStart + bs, end)
        if covered.count < blockSize {
            try scratch.withUnsafeMutableBytes { try currentContent(txn, cursor, segment, block: block, into: $0) }
            scratch.withUnsafeBytes { src in segment.withSlot(slot, blockSize) { $0.copyMemory(from: src) } }
        }
        segment.withSlot(slot, blockSize) { dst in
            let at = Int(covered.lowerBound - blockStart)
            if change.kind == .write {
                change.data.withUnsafeBytes { src in
                    let from = Int(covered.lowerBound - change.offset)
                    (dst.baseAddress! + at).copyMemory(from: src.baseAddress! + from, byteCount: covered.count)
                }
            } else {
                (dst.baseAddress! + at).initializeMemory(as: UInt8.self, repeating: 0, count: covered.count)
            }
        }
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

    private func validate(_ c: Change) throws {
        switch c.kind {
        case .flush:
            break
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

    /// The latest content of `block` as this write transaction sees it, including records
    /// appended earlier in the same transaction (still in `segment`).
    private func currentContent(_ txn: LMDBTransaction, _ cursor: LMDBCursor, _ segment: SegmentBuilder,
                                block: UInt64, into dst: UnsafeMutableRawBufferPointer) throws {
        guard let (seq, content) = try journal.lookup(cursor, block: block, atOrBefore: UInt64.max) else {
            try base.read(at: block * UInt64(blockSize), into: dst)
            return
        }
        switch content {
        case .zero:
            dst.initializeMemory(as: UInt8.self, repeating: 0)
        case let .data(id, offset, _):
            if id == segment.id && segment.count > 0 {
                segment.copy(from: Int(offset), count: blockSize, into: dst)
            } else {
                let bytes = try journal.segmentBytes(txn, id, seq: seq)
                guard Int(offset) + blockSize <= bytes.count else {
                    throw RewindError.corruptBlock(seq: seq, block: block, why: "points past its segment")
                }
                dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes[Int(offset)..<Int(offset) + blockSize]))
            }
        }
    }

    /// Add zero entries at `seq` for the blocks of `range` that do not already read as zeros:
    /// those whose newest entry holds data, and those with no entry where base.img has data.
    private func markZero(_ txn: LMDBTransaction, _ cursor: LMDBCursor, blocks range: Range<UInt64>, seq: UInt64) throws {
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
            while let e = entry, let key = decodeBlockKey(e.key), key.block < windowEnd {
                newest[key.block] = !e.value.isEmpty
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
            for block in marks { try txn.put(journal.blocks, blockKey(block, seq), []) }
            windowStart = windowEnd
        }
    }
}

/// The payload bytes of the segment being built in the current group commit.
struct SegmentBuilder {
    var id: UInt64 = 0
    private var bytes: [UInt8] = []
    var count: Int { bytes.count }

    mutating func grow(by n: Int) { bytes.append(contentsOf: repeatElement(0, count: n)) }
    mutating func append(_ data: [UInt8]) { bytes.append(contentsOf: data) }

    mutating func withSlot<T>(_ at: Int, _ n: Int, _ body: (UnsafeMutableRawBufferPointer) throws -> T) rethrows -> T {
        try bytes.withUnsafeMutableBytes { try body(UnsafeMutableRawBufferPointer(rebasing: $0[at..<at + n])) }
    }

    func hash(_ at: Int, _ n: Int) -> UInt64 {
        bytes.withUnsafeBytes { xxh3(UnsafeRawBufferPointer(rebasing: $0[at..<at + n])) }
    }

    func copy(from at: Int, count n: Int, into dst: UnsafeMutableRawBufferPointer) {
        bytes.withUnsafeBytes { dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[at..<at + n])) }
    }

    mutating func flush(into txn: LMDBTransaction, _ db: LMDBDatabase) throws {
        try bytes.withUnsafeBytes { v in try seqKey(id).withUnsafeBytes { k in try txn.put(db, k, v, append: true) } }
        bytes.removeAll(keepingCapacity: true)
    }
}
