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
    func forEachChangedBlock(_ body: (UInt64, UnsafeRawBufferPointer?) throws -> Void) throws {
        let scan = try txn.cursor(mirror.journal.blocks)
        var current: (block: UInt64, seq: UInt64, content: BlockContent)?
        func emit() throws {
            guard let c = current else { return }
            switch c.content {
            case .zero: try body(c.block, nil)
            case let .data(segment, off, hash):
                try body(c.block, try journalBlock(seq: c.seq, block: c.block, segment: segment, offset: off, hash: hash))
            }
        }
        var entry = try scan.first()
        var count = 0
        while let e = entry {
            guard let key = decodeBlockKey(e.key) else { throw RewindError.damagedMirror(path: mirror.path, why: "malformed index key") }
            count += 1
            mirror.journal.touched(40 + mirror.blockSize)
            if key.block != current?.block { try emit(); current = nil }
            if key.seq <= seq { current = (key.block, key.seq, try BlockContent.decode(e.value, seq: key.seq, block: key.block)) }
            entry = try scan.next()
        }
        try emit()
    }
}
