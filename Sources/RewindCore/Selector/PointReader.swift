import Glibc

/// The volume as of one pinned seq, read in place for as long as an export serves it.
///
/// Unlike `Snapshot` (one read transaction and a shared `base.lock` for its whole life, right
/// for a restore that ends), a point reader may live for days beside a server that keeps
/// writing and compacting: a transaction held that long would keep LMDB from reusing any page
/// freed since, and a held `base.lock` would stop compaction. So it holds a `Pin` instead —
/// no compaction folds past its seq — and each request reads in a transaction of its own:
///
/// - a block with an index entry at or before the seq, newer than the horizon, reads from the
///   journal; any other block from base.img. A compaction (to a target at or before the pin)
///   writes a block's content into base.img before it deletes the block's entries, and frees
///   their payload only after, so a transaction sees either the entry and its payload, or no
///   entry and base.img already holding the content;
/// - the one window that remains — a payload freed after this transaction found its entry —
///   fails the block's checksum; the request is read again in a new transaction, and a last
///   time under a shared `base.lock`, when no compaction runs. Only real damage fails then.
///
/// Safe to use from several threads at once: nothing is shared between requests but the pin.
public final class PointReader: @unchecked Sendable {
    public let mirror: Mirror
    public let seq: UInt64
    public let pin: Pin

    /// Where a range's content comes from, for BLOCK_STATUS.
    public enum Allocation: Sendable, Equatable {
        /// Data: a journal block, or data in base.img.
        case data
        /// Zeros recorded by a zero or trim record.
        case zero
        /// A hole in base.img.
        case hole
    }

    /// Pin `point` and read it. `holder` names the reader in `status` (`export vol@seq:5`).
    public init(mirror: Mirror, point: Point, holder: String) throws {
        self.mirror = mirror
        pin = try mirror.pin(point, holder: holder)
        seq = pin.seq
    }

    /// Give the point up (also at deinit, through the pin's).
    public func close() { pin.release() }

    /// Read `buffer.count` bytes at `offset` as the volume was at `seq`.
    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        try checkRange(offset, buffer)
        try retrying { _ = try readOnce(at: offset, into: buffer, cachedOnly: false, findHoles: false) }
    }

    /// `read`, also saying which parts hold no data at the point — base.img's holes, zero and
    /// trim records — in order and merged. Those parts are zero-filled, and base.img's holes
    /// are not read (no page cache filled with zeros). One walk over the index, where a read
    /// plus `allocation` take two.
    public func readFindingHoles(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws -> [Range<UInt64>] {
        try checkRange(offset, buffer)
        return try retrying { try readOnce(at: offset, into: buffer, cachedOnly: false, findHoles: true) ?? [] }
    }

    /// `read`, only if every byte comes from the page cache without waiting (`RWF_NOWAIT`) —
    /// what an event loop may call. False when any part would wait, or on any failure: the
    /// caller then reads on a thread pool. (The index is LMDB's map: a page of it not in
    /// memory is the one wait this can still take.)
    public func readIfCached(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) -> Bool {
        guard (try? checkRange(offset, buffer)) != nil else { return false }
        return (try? readOnce(at: offset, into: buffer, cachedOnly: true, findHoles: false)) != nil
    }

    /// `range` cut into pieces by where their content comes from, in order, at most `limit`
    /// pieces (then they stop short of the range's end).
    public func allocation(_ range: Range<UInt64>, limit: Int) throws -> [(Range<UInt64>, Allocation)] {
        try retrying { try allocationOnce(range, limit: limit) }
    }

    private func checkRange(_ offset: UInt64, _ buffer: UnsafeMutableRawBufferPointer) throws {
        guard offset <= mirror.volumeSize, UInt64(buffer.count) <= mirror.volumeSize - offset else {
            throw RewindError.outOfRange(offset: offset, length: UInt64(buffer.count), size: mirror.volumeSize)
        }
    }

    /// Two tries in transactions of their own, then one with compaction held off.
    private func retrying<T>(_ body: () throws -> T) throws -> T {
        for _ in 0..<2 {
            do { return try body() } catch RewindError.corruptBlock { continue }
        }
        let lock = try FileLock(path: mirror.baseLockPath, kind: .shared, waitSeconds: 120,
                                holder: "a compaction is rewriting base.img")
        defer { lock.release() }
        return try body()
    }

    /// One block's source at `seq`, as the index says in `txn`.
    private enum Source {
        case base
        case zero
        case journal(seq: UInt64, segment: UInt64, offset: UInt32, hash: UInt64)
    }

    /// Visit blocks `first..<end` in order as runs: `base(count)` for runs of blocks base.img
    /// holds, else one block at a time. One seek per changed block, none per unchanged one.
    private func walk(_ first: UInt64, _ end: UInt64, _ visit: (UInt64, UInt64, Source) throws -> Void) throws {
        let journal = mirror.journal
        try journal.env.readPooled { txn in
            let horizon = try journal.readMeta(txn).horizon
            let cursor = try txn.cursor(journal.blocks)
            var b = first
            while b < end {
                // The next block at or after b with any entry (for one block, `lookup` alone
                // says: one B-tree descent instead of two).
                var next = end
                if end - b == 1 {
                    next = b
                } else if let e = try cursor.seek(atLeast: blockKey(b, 0)) {
                    guard let key = decodeBlockKey(e.key) else {
                        throw RewindError.damagedMirror(path: mirror.path, why: "an index key is \(e.key.count) bytes (journal/data.mdb is damaged)")
                    }
                    next = min(key.block, end)
                }
                if next > b {
                    try visit(b, next - b, .base)
                    b = next
                    continue
                }
                switch try journal.lookup(cursor, block: b, atOrBefore: seq) {
                case let .some((s, content)) where s > horizon:
                    switch content {
                    case .zero: try visit(b, 1, .zero)
                    case let .data(segment, off, hash): try visit(b, 1, .journal(seq: s, segment: segment, offset: off, hash: hash))
                    }
                default:
                    try visit(b, 1, .base)  // changed only after seq, or folded into base.img
                }
                b += 1
            }
        }
    }

    /// One try; with `cachedOnly`, nil as soon as a piece is not in the page cache. Returns
    /// the holes found when `findHoles` (else none).
    private func readOnce(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, cachedOnly: Bool,
                          findHoles: Bool) throws -> [Range<UInt64>]? {
        guard !buffer.isEmpty else { return [] }
        var holes: [Range<UInt64>] = []
        func hole(_ r: Range<UInt64>, _ dst: UnsafeMutableRawBufferPointer) {
            dst.initializeMemory(as: UInt8.self, repeating: 0)
            guard findHoles, !r.isEmpty else { return }
            if let last = holes.last, last.upperBound == r.lowerBound { holes[holes.count - 1] = last.lowerBound..<r.upperBound } else { holes.append(r) }
        }
        let bs = UInt64(mirror.blockSize)
        let end = offset + UInt64(buffer.count)
        // For parts of journal blocks only (a whole block is read straight into `buffer`).
        var scratchBlock: UnsafeMutableRawBufferPointer?
        defer { scratchBlock?.deallocate() }
        func scratch() -> UnsafeMutableRawBufferPointer {
            if let s = scratchBlock { return s }
            let s = UnsafeMutableRawBufferPointer.allocate(byteCount: mirror.blockSize, alignment: 16)
            scratchBlock = s
            return s
        }
        struct NotCached: Error {}
        do {
            try walk(offset / bs, (end + bs - 1) / bs) { block, count, source in
                // The part of these blocks the request covers.
                let from = max(block * bs, offset), to = min((block + count) * bs, end)
                let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(from - offset)..<Int(to - offset)])
                switch source {
                case .base where findHoles:
                    var at = from
                    for data in try mirror.base.dataExtents(size: to, from: from) {
                        hole(at..<data.lowerBound, UnsafeMutableRawBufferPointer(rebasing: buffer[Int(at - offset)..<Int(data.lowerBound - offset)]))
                        try mirror.base.read(at: data.lowerBound, into: UnsafeMutableRawBufferPointer(
                            rebasing: buffer[Int(data.lowerBound - offset)..<Int(data.upperBound - offset)]))
                        at = data.upperBound
                    }
                    hole(at..<to, UnsafeMutableRawBufferPointer(rebasing: buffer[Int(at - offset)..<Int(to - offset)]))
                case .base:
                    if !cachedOnly { try mirror.base.read(at: from, into: dst) } else if !mirror.base.readIfCached(at: from, into: dst) {
                        throw NotCached()
                    }
                case .zero:
                    hole(from..<to, dst)
                case let .journal(s, segment, off, hash):
                    // A whole block goes straight into the buffer; a part goes through `scratch`.
                    let whole = dst.count == mirror.blockSize
                    let into = whole ? dst : scratch()
                    if !cachedOnly {
                        try mirror.journal.readBlock(seq: s, block: block, segment: segment, offset: off, hash: hash, into: into)
                    } else if !mirror.journal.readBlockIfCached(segment: segment, offset: off, hash: hash, into: into) {
                        throw NotCached()
                    }
                    if !whole {
                        let inBlock = Int(from - block * bs)
                        dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: into[inBlock..<inBlock + dst.count]))
                    }
                }
            }
        } catch is NotCached {
            return nil
        }
        return holes
    }

    private func allocationOnce(_ range: Range<UInt64>, limit: Int) throws -> [(Range<UInt64>, Allocation)] {
        guard !range.isEmpty else { return [] }
        let bs = UInt64(mirror.blockSize)
        var pieces: [(Range<UInt64>, Allocation)] = []
        func add(_ r: Range<UInt64>, _ kind: Allocation) {
            guard !r.isEmpty else { return }
            if let last = pieces.last, last.1 == kind, last.0.upperBound == r.lowerBound {
                pieces[pieces.count - 1].0 = last.0.lowerBound..<r.upperBound
            } else {
                pieces.append((r, kind))
            }
        }
        struct Enough: Error {}
        do {
            try walk(range.lowerBound / bs, (range.upperBound + bs - 1) / bs) { block, count, source in
                let r = max(block * bs, range.lowerBound)..<min((block + count) * bs, range.upperBound)
                switch source {
                case .zero: add(r, .zero)
                case .journal: add(r, .data)
                case .base:
                    var at = r.lowerBound
                    for data in try mirror.base.dataExtents(size: r.upperBound, from: r.lowerBound) {
                        add(at..<data.lowerBound, .hole)
                        add(data, .data)
                        at = data.upperBound
                    }
                    add(at..<r.upperBound, .hole)
                }
                if pieces.count > limit { throw Enough() }
            }
        } catch is Enough {}
        return Array(pieces.prefix(limit))
    }
}
