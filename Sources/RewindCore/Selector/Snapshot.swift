/// The volume as of one seq, read in place from base.img and the journal, without copying.
///
/// Holds a read transaction (MVCC: the writer goes on) and a shared `base.lock`, so a
/// compaction cannot rewrite base.img under it. Close it promptly: an open snapshot keeps
/// LMDB from reusing pages freed after it began.
public final class Snapshot: @unchecked Sendable {
    public let mirror: Mirror
    public let seq: UInt64
    let txn: LMDBTransaction
    let cursor: LMDBCursor
    private let lock: FileLock
    private var closed = false
    private let zeros: [UInt8]
    private let scratch: UnsafeMutableRawBufferPointer

    public init(mirror: Mirror, point: Point) throws {
        self.mirror = mirror
        lock = try FileLock(path: mirror.baseLockPath, kind: .shared, waitSeconds: 30,
                            holder: "a compaction is rewriting base.img")
        txn = try mirror.journal.env.beginRead()
        do {
            let meta = try mirror.journal.readMeta(txn)
            if meta.pendingRollback != MirrorMeta.none && point == .latest {
                throw RewindError.interruptedRollback(target: meta.pendingRollback)
            }
            seq = try mirror.resolve(point, txn)
            if meta.pendingRollback != MirrorMeta.none && seq > meta.pendingRollback {
                throw RewindError.interruptedRollback(target: meta.pendingRollback)
            }
            cursor = try txn.cursor(mirror.journal.blocks)
        } catch {
            txn.abort()
            lock.release()
            throw error
        }
        zeros = [UInt8](repeating: 0, count: mirror.blockSize)
        scratch = .allocate(byteCount: mirror.blockSize, alignment: 16)
    }

    deinit {
        close()
        scratch.deallocate()
    }

    public func close() {
        guard !closed else { return }
        closed = true
        txn.abort()
        lock.release()
    }

    /// Where block `b`'s content as of `seq` lives: nil means base.img.
    func content(ofBlock b: UInt64) throws -> (seq: UInt64, content: BlockContent)? {
        try mirror.journal.lookup(cursor, block: b, atOrBefore: seq)
    }

    /// The bytes of a journal block, checked against the index's XXH3. Valid until the next
    /// call (one scratch block per snapshot: a snapshot is read by one thread at a time).
    func journalBlock(seq: UInt64, block: UInt64, segment: UInt64, offset: UInt32, hash: UInt64) throws -> UnsafeRawBufferPointer {
        try mirror.journal.readBlock(seq: seq, block: block, segment: segment, offset: offset, hash: hash, into: scratch)
        return UnsafeRawBufferPointer(scratch)
    }

    /// Read `buffer.count` bytes at `offset` as the volume was at `seq`.
    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        guard offset <= mirror.volumeSize, UInt64(buffer.count) <= mirror.volumeSize - offset else {
            throw RewindError.outOfRange(offset: offset, length: UInt64(buffer.count), size: mirror.volumeSize)
        }
        let bs = UInt64(mirror.blockSize)
        var at = offset
        var done = 0
        while done < buffer.count {
            let block = at / bs
            let inBlock = Int(at % bs)
            let n = min(mirror.blockSize - inBlock, buffer.count - done)
            let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[done..<done + n])
            switch try content(ofBlock: block) {
            case nil:
                try mirror.base.read(at: at, into: dst)
            case .some((_, .zero)):
                dst.initializeMemory(as: UInt8.self, repeating: 0)
            case let .some((s, .data(segment, off, hash))):
                let src = try journalBlock(seq: s, block: block, segment: segment, offset: off, hash: hash)
                dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: src[inBlock..<inBlock + n]))
            }
            at += UInt64(n)
            done += n
        }
    }

    public func read(at offset: UInt64, count: Int) throws -> [UInt8] {
        var out = [UInt8](repeating: 0, count: count)
        try out.withUnsafeMutableBytes { try read(at: offset, into: $0) }
        return out
    }

    /// Visit, in block order, every block whose content at `seq` comes from the journal,
    /// with that content (nil = zeros). Blocks not visited read from base.img.
    /// One pass over the index: memory stays bounded whatever the journal's size.
    ///
    /// Checks the index as it goes (invariant 6): every entry it passes against its own check,
    /// each entry it uses against the record that wrote it, and — at the end — that the index
    /// holds exactly the entries the records (oldest, seq] say they wrote (`IndexTally`), so a
    /// damaged page that hides, adds or moves entries stops the scan instead of giving a wrong
    /// image. Throws before `body` sees a block only for damage found on the way; a tally
    /// mismatch is found after the last block.
    func forEachChangedBlock(_ body: (UInt64, UnsafeRawBufferPointer?) throws -> Void) throws {
        try scanIndex { block, seq, content in
            switch content {
            case .zero: try body(block, nil)
            case let .data(segment, off, hash):
                try body(block, try journalBlock(seq: seq, block: block, segment: segment, offset: off, hash: hash))
            }
        }
    }

    /// Run every check `forEachChangedBlock` makes of the index, reading no payload: what a
    /// restore that reads block by block (into a device) runs before it writes anything.
    /// `throughLatest`: hold every entry up to the newest record to its records, not only
    /// those up to `seq` — for a rollback, which decides from the entries after `seq` which
    /// blocks of the source to put back.
    func checkIndex(throughLatest: Bool = false) throws {
        try scanIndex(throughLatest: throughLatest) { _, _, _ in }
    }

    /// The one pass over the index behind both: `visit` gets each changed block's newest entry
    /// at or before `seq`, checked.
    func scanIndex(throughLatest: Bool = false, _ visit: (UInt64, UInt64, BlockContent) throws -> Void) throws {
        let journal = mirror.journal
        let meta = try journal.readMeta(txn)
        // Entries at or below `oldest` may be half deleted by an unfinished compaction.
        let oldest = meta.oldestPoint
        // The seqs whose entries are held to their records' tallies.
        let limit = throughLatest ? max(seq, meta.lastSeq) : seq
        // What the records (oldest, seq] say the index holds, first; and their headers when
        // few enough to keep (`Mirror.headersKeptMax`), for the cross-check of each entry used
        // — else each is looked up, a random page of `records` per changed block.
        var headers: [RecordHeader]? = limit > oldest && limit - oldest <= Mirror.headersKeptMax ? [] : nil
        let expected = limit > oldest ? try journal.expectedTally(txn, seqs: oldest + 1...limit, headers: &headers) : IndexTally()
        let scan = try txn.cursor(journal.blocks)
        var current: (block: UInt64, seq: UInt64, content: BlockContent)?
        var cached: (seq: UInt64, header: RecordHeader)?
        func emit() throws {
            guard let c = current else { return }
            if c.seq > oldest {
                if cached?.seq != c.seq {
                    cached = (c.seq, try headers.map { $0[Int(c.seq - oldest - 1)] } ?? journal.header(txn, seq: c.seq))
                }
                if let h = cached?.header, !mirror.entryMatches(h, block: c.block, content: c.content) {
                    throw RewindError.corruptBlock(seq: c.seq, block: c.block,
                                                   why: "its index entry does not match the record's \(h.kind.name) at \(h.offset)+\(h.length) (journal/data.mdb is damaged)")
                }
            }
            try visit(c.block, c.seq, c.content)
        }
        var found = IndexTally()
        var entry = try scan.first()
        var previous: (block: UInt64, seq: UInt64)?
        while let e = entry {
            guard let key = decodeBlockKey(e.key) else {
                throw RewindError.damagedMirror(path: mirror.path, why: "an index key is \(e.key.count) bytes (journal/data.mdb is damaged)")
            }
            if let p = previous, (p.block, p.seq) >= (key.block, key.seq) {
                throw RewindError.corruptBlock(seq: key.seq, block: key.block, why: "its index entry is out of order (journal/data.mdb is damaged)")
            }
            previous = key
            guard key.block < UInt64(mirror.volumeSize) / UInt64(mirror.blockSize) else {
                throw RewindError.corruptBlock(seq: key.seq, block: key.block, why: "its index entry lies past the volume's end (journal/data.mdb is damaged)")
            }
            mirror.journal.touched(40 + mirror.blockSize)
            if key.block != current?.block { try emit(); current = nil }
            let (content, hash) = try BlockContent.decode(e.value, seq: key.seq, block: key.block)
            if key.seq > oldest && key.seq <= limit { found.add(hash) }
            if key.seq <= seq { current = (key.block, key.seq, content) }
            entry = try scan.next()
        }
        try emit()
        if limit > oldest {
            guard expected == found else {
                throw RewindError.damagedMirror(path: mirror.path, why: "the block index holds \(found.count) entries for seq:\(oldest + 1)...seq:\(limit) where its records wrote \(expected.count)\(found.count == expected.count ? " (their checks differ)" : ""): journal/data.mdb is damaged; `rewind verify` names the records")
            }
        }
    }
}
