import Glibc

/// Appends records. Each `append` (one group commit) writes its payload and record headers to
/// the payload log as one `LogChunk` and stages its index updates in an LMDB write transaction
/// that may stay open across many appends; `commit()` makes the index visible to readers.
///
/// Durability comes from the log: after `syncLog()` every appended record survives a crash,
/// indexed or not — the next writer to open the mirror indexes the log's tail
/// (`replayTail`). So a FLUSH costs one fdatasync of the log, and LMDB's own commit (two
/// ordered syncs: data pages, then the meta page on the next commit) happens off that path.
/// Before LMDB commits an index that points into the log, the log is synced, so the index
/// never names payload a power loss could take away.
///
/// With `indexOnThread` (serve), the index is built and committed on a thread of its own
/// (`IndexCommitter`) and this writer only writes the log: its appends never wait for LMDB.
///
/// The writer is a composition: it lays out each append's records and builds their chunks
/// (partial blocks merged with their current content); `ChunkAppender` writes the chunks to the
/// log and syncs it; a `JournalIndexing` strategy indexes the records — `InlineIndexing` (the
/// transaction on this thread, by default) or `ThreadedIndexing` (after `indexOnThread`).
///
/// Use from one thread only: LMDB's writer lock belongs to the thread that took it.
public final class JournalWriter {
    let mirror: Mirror
    let appender: ChunkAppender
    var indexing: any JournalIndexing
    /// Appended since the last `requestCommit` or `commit` (index thread only).
    public var commitOwed: Bool { indexing.commitOwed }
    /// Streaming mode (serve): keep the log out of the page cache and reserve its disk blocks
    /// ahead (`ChunkAppender.keepsLogOutOfCache`).
    public var keepsLogOutOfCache: Bool {
        get { appender.keepsLogOutOfCache }
        set { appender.keepsLogOutOfCache = newValue }
    }

    /// A chunk's payload is written out once it passes this (bounds the buffer).
    static let chunkCapBytes = 32 << 20
    static let chunkMaxRecords = 65536
    /// Aligned writes at least this large go to the log straight from the caller's array
    /// (one copy fewer than gathering them into the chunk buffer).
    static let directMinBytes = 64 << 10

    public init(mirror: Mirror) {
        self.mirror = mirror
        let appender = ChunkAppender(log: mirror.journal.log)
        self.appender = appender
        indexing = InlineIndexing(mirror: mirror, appender: appender)
    }

    deinit {
        abort(keepLog: true)
        indexing.stop()
    }

    /// Build and commit the index on a thread of its own (`IndexCommitter`), by `policy`; before
    /// the first append. `readVolume(offset, into:)` reads the volume's current content (for the
    /// read-modify-write of partial blocks: the LMDB transaction is the index thread's);
    /// `onFailure` runs on the index thread when indexing fails — later appends then throw.
    public func indexOnThread(policy: IndexCommitter.Policy, onFailure: @escaping @Sendable (Error) -> Void,
                              readVolume: @escaping (UInt64, UnsafeMutableRawBufferPointer) throws -> Void) {
        indexing = ThreadedIndexing(mirror: mirror, appender: appender, policy: policy, onFailure: onFailure,
                                    readVolume: readVolume)
    }

    /// The newest seq appended (committed or staged).
    public var lastSeq: UInt64? { indexing.meta?.lastSeq }

    // MARK: append

    /// Append `changes` as consecutive records and return their seqs. Readable by other
    /// transactions after `commit()`; durable after `syncLog()` or `commit()`.
    ///
    /// Each write is stored as the whole blocks it touches: a partial head or tail block is
    /// read from the volume's current content and merged (read-modify-write), so every index
    /// entry names a complete block and a point read is one seek. Zero and trim records store
    /// only their partial edge blocks; their whole blocks get empty ("zero") index entries,
    /// and none at all where the block already reads as zeros.
    /// `sourceSynced`, when given, records that the served source is fsynced up to that seq.
    @discardableResult
    public func append(_ changes: [Change], sourceSynced: UInt64? = nil) throws -> ClosedRange<UInt64> {
        do {
            return try stage(changes, sourceSynced: sourceSynced)
        } catch let e as LMDBError {
            throw RewindError.journal(e)
        }
    }

    /// Write `changes` to the log as one chunk (more past `chunkCapBytes` or `chunkMaxRecords`)
    /// and hand each record to `indexing`.
    private func stage(_ changes: [Change], sourceSynced: UInt64?) throws -> ClosedRange<UInt64> {
        var meta = try indexing.beginAppend()
        for c in changes { try mirror.validate(c) }
        if let sourceSynced { meta.sourceSyncedSeq = min(sourceSynced, meta.lastSeq) }
        let blockSize = mirror.blockSize
        let bs = UInt64(blockSize)
        let appendStart = meta.logEnd
        var chunk = appender.startChunk(at: meta.logEnd, firstSeq: meta.lastSeq + 1, generation: meta.generation)
        var scratch = [UInt8](repeating: 0, count: blockSize)  // a partial block's current content
        var seq = meta.lastSeq
        var cumulative = meta.lastCumulative
        let firstSeq = seq + 1
        for change in changes {
            seq += 1
            let now = max(wallClockNanoseconds(), meta.lastTime)
            meta.lastTime = now
            let (stored, zeroed) = Mirror.layout(kind: change.kind, offset: change.offset, length: change.length, blockSize: bs)
            let bytes = stored.count * blockSize
            if chunk.count > 0 && (chunk.payloadBytes + bytes > Self.chunkCapBytes || chunk.count >= Self.chunkMaxRecords) {
                meta.logEnd = try appender.writeAndContinue(&chunk, firstSeq: seq)
            }
            let start = chunk.payloadBytes
            var header = RecordHeader(kind: change.kind, fua: change.fua, timestamp: now, offset: change.offset,
                                      length: change.length, checksum: 0, segment: chunk.payloadStart,
                                      segmentOffset: UInt32(start), storedLength: UInt32(bytes), cumulative: cumulative)
            var blockHashes = [UInt64]()
            if !stored.isEmpty {
                let aligned = change.kind == .write && change.offset % bs == 0 && change.length % bs == 0
                if aligned {
                    // The common case, no read-modify-write: a large write is written to the log
                    // from the caller's array; a small one is copied into the chunk.
                    if change.data.count >= Self.directMinBytes { chunk.appendDirect(change.data) } else { chunk.appendCopied(change.data) }
                    blockHashes = change.data.withUnsafeBytes { RewindCore.blockHashes($0, blockSize: blockSize) }
                } else {
                    let at = chunk.appendZeros(bytes)
                    for (i, block) in stored.enumerated() {
                        try fillBlock(slot: at + i * blockSize, block: block, change: change, &chunk, &scratch)
                    }
                    blockHashes = chunk.payload.withUnsafeBytes {
                        RewindCore.blockHashes(UnsafeRawBufferPointer(rebasing: $0[at..<at + bytes]), blockSize: blockSize)
                    }
                }
                header.checksum = payloadChecksum(blockHashes: blockHashes)
                cumulative += UInt64(bytes)
                header.cumulative = cumulative
            }
            try indexing.index(header, seq: seq, blockHashes: blockHashes, blocks: stored.count + zeroed.count)
            chunk.add(header)
        }
        if chunk.count > 0 { meta.logEnd = try appender.write(&chunk) }
        appender.recycle(&chunk)
        appender.appended(from: appendStart, to: meta.logEnd)
        meta.lastSeq = seq
        meta.lastCumulative = cumulative
        try indexing.finishAppend(meta, sourceSynced: sourceSynced)
        return firstSeq...max(seq, firstSeq)
    }

    /// Build one stored block of an unaligned write, or a partial edge block of a zero/trim:
    /// the block's current content with the change's part applied. `slot` is where the block
    /// sits in `chunk.payload` (the copied bytes).
    private func fillBlock(slot: Int, block: UInt64, change: Change, _ chunk: inout ChunkBuilder,
                           _ scratch: inout [UInt8]) throws {
        let blockSize = mirror.blockSize
        let bs = UInt64(blockSize)
        let blockStart = block * bs
        let covered = max(blockStart, change.offset)..<min(blockStart + bs, change.offset + change.length)
        if covered.count < blockSize {
            try scratch.withUnsafeMutableBytes { try currentContent(chunk, block: block, into: $0) }
            chunk.payload.replaceSubrange(slot..<slot + blockSize, with: scratch)
        }
        let at = slot + Int(covered.lowerBound - blockStart)
        if change.kind == .write {
            let from = Int(covered.lowerBound - change.offset)
            chunk.payload.replaceSubrange(at..<at + covered.count, with: change.data[from..<from + covered.count])
        } else {
            chunk.payload.replaceSubrange(at..<at + covered.count, with: repeatElement(0, count: covered.count))
        }
    }

    /// The latest content of `block`: its newest entry `indexing` can see — inline, as the open
    /// transaction sees it; on the index thread, as this append's earlier changes left it — read
    /// from the chunk being built (still in memory) or the log; else what lies beneath the
    /// entries (base.img; the volume).
    private func currentContent(_ chunk: ChunkBuilder, block: UInt64, into dst: UnsafeMutableRawBufferPointer) throws {
        guard let (seq, content) = try indexing.newest(block) else {
            try indexing.readUnindexed(block, into: dst)
            return
        }
        switch content {
        case .zero:
            dst.initializeMemory(as: UInt8.self, repeating: 0)
        case let .data(segment, offset, hash):
            if segment == chunk.payloadStart {
                chunk.copy(from: Int(offset), into: dst)
            } else {
                try mirror.journal.readBlock(seq: seq, block: block, segment: segment, offset: offset, hash: hash, into: dst)
            }
        }
    }

    // MARK: sync and commit

    /// Make every record appended so far durable (the NBD FLUSH): fdatasync of the log.
    public func syncLog() throws {
        try appender.syncLog(upTo: indexing.meta?.logEnd)
    }

    /// Like `syncLog()`, but lets `deviceFlush` — an `fdatasync` of a file whose device cache
    /// flush covers the log (`BlockFile.fdatasyncFlushesDevice`) — make the log durable when
    /// only data is owed (`PayloadLog.sync(flushedBy:)`): the FLUSH of a served volume then
    /// costs one device cache flush. Returns whether `deviceFlush` ran; if not, nothing was
    /// synced and the caller syncs both the usual way.
    public func syncLog(sharingFlush deviceFlush: () throws -> Void) throws -> Bool {
        try appender.syncLog(upTo: indexing.meta?.logEnd, sharingFlush: deviceFlush)
    }

    /// Whether an `fdatasync` of `file` flushes the device cache under the log too.
    public func logSharesDeviceFlush(with file: BlockFile) -> Bool {
        appender.logSharesDeviceFlush(with: file)
    }

    /// Sync the log, then commit the index transaction (readers see the new records). If the
    /// sync fails the transaction stays open and the caller chooses how to abort; if LMDB's
    /// commit fails the transaction is gone, and `abort(keepLog: false)` can still cut the log.
    /// With the index on its own thread: wait until it has committed every append so far.
    public func commit() throws {
        try indexing.commit()
    }

    /// With the index on its own thread: have it commit every append so far, soon (not waiting).
    public func requestCommit() {
        indexing.requestCommit()
    }

    /// Abandon what is staged. With `keepLog` false, the log is cut back to where the
    /// transaction began, so no later replay resurrects the abandoned records; with it true
    /// (a fenced server whose source already holds them), the next writer replays them.
    /// With the index on its own thread, it gives up its transaction and queue (whatever
    /// `keepLog` says: the log keeps them), and every later append is refused.
    public func abort(keepLog: Bool) {
        indexing.abort(keepLog: keepLog)
    }
}
