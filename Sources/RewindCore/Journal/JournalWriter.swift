import Dispatch
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
/// Use from one thread only: LMDB's writer lock belongs to the thread that took it.
public final class JournalWriter {
    let mirror: Mirror
    private var journal: Journal { mirror.journal }
    private var log: PayloadLog { mirror.journal.log }
    private var txn: LMDBTransaction?
    private var meta: MirrorMeta?
    /// The log's end when the open transaction began (nil once committed): what an abort
    /// that discards the log cuts back to.
    private var beganAtLogEnd: UInt64?
    /// Log positions below this are durable.
    private var syncedTo: UInt64 = 0
    /// The index thread, once `indexOnThread` started it; then `txn` stays nil.
    private var committer: IndexCommitter?
    /// Set when the index thread was given up (`abort`): appends are refused from then on, since
    /// the log holds records past the index that only the next writer's replay may build on.
    private var indexGivenUp = false
    /// With the index on its own thread, the volume's current content at a byte offset: what a
    /// partial block is merged with, unless an earlier change of the same append touched it.
    private var readVolume: ((UInt64, UnsafeMutableRawBufferPointer) throws -> Void)?
    /// Appended since the last `requestCommit` or `commit` (index thread only).
    public private(set) var commitOwed = false
    /// Streaming mode (serve): keep the log out of the page cache — each group commit's chunk
    /// is written back at once and dropped once written, after the next one — and reserve its
    /// disk blocks 8 MiB ahead (`PayloadLog.reserve`). Tools that read back what they wrote
    /// keep the pages, and reserve only each chunk's own blocks (the log's size on disk stays
    /// what was written).
    public var keepsLogOutOfCache = false
    /// The previous group commit's log range, written back but not yet dropped.
    private var writingBack: Range<UInt64>?
    /// Synced log not yet dropped from the cache: small FLUSHed chunks are dropped together once
    /// this passes `dropBatchBytes`, so a FLUSH hands no work to `cacheAdvice` — each hand-off
    /// woke a worker thread (a cross-CPU wake-up per FLUSH at queue depth 1).
    private var undropped: Range<UInt64>?
    static let dropBatchBytes: UInt64 = 1 << 20
    /// Where streaming mode's page-cache advice runs, in order, off the caller's thread:
    /// `release` waits for a chunk's writeback, and with the device busy with an index commit
    /// that held the serve writer for up to 146 ms (and every write answered behind it).
    private let cacheAdvice = DispatchQueue(label: "rewind-log-cache")
    /// The chunk payload buffer, kept between group commits: a fresh 32 MiB array each time
    /// cost page faults on every page, and its `munmap`.
    private var spare: [UInt8] = []

    /// A chunk's payload is written out once it passes this (bounds the buffer).
    static let chunkCapBytes = 32 << 20
    static let chunkMaxRecords = 65536
    /// Aligned writes at least this large go to the log straight from the caller's array
    /// (one copy fewer than gathering them into the chunk buffer).
    static let directMinBytes = 64 << 10
    /// Chunks smaller than this are written into zeroed, synced blocks (see `PayloadLog.reserve`),
    /// prepared this far ahead.
    static let prewriteBelowBytes: UInt64 = 64 << 10
    static let prewriteAheadBytes: UInt64 = 1 << 20

    public init(mirror: Mirror) {
        self.mirror = mirror
    }

    deinit {
        abort(keepLog: true)
        committer?.stop()
    }

    /// Build and commit the index on a thread of its own (`IndexCommitter`), by `policy`; before
    /// the first append. `readVolume(offset, into:)` reads the volume's current content (for the
    /// read-modify-write of partial blocks: the LMDB transaction is the index thread's);
    /// `onFailure` runs on the index thread when indexing fails — later appends then throw.
    public func indexOnThread(policy: IndexCommitter.Policy, onFailure: @escaping @Sendable (Error) -> Void,
                              readVolume: @escaping (UInt64, UnsafeMutableRawBufferPointer) throws -> Void) {
        self.readVolume = readVolume
        committer = IndexCommitter(mirror: mirror, policy: policy, onFailure: onFailure)
    }

    /// The newest seq appended (committed or staged).
    public var lastSeq: UInt64? { meta?.lastSeq }

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
            if committer != nil { return try stage(nil, changes, sourceSynced: sourceSynced) }
            let txn = try begin()
            return try stage(txn, changes, sourceSynced: sourceSynced)
        } catch let e as LMDBError {
            throw RewindError.journal(e)
        }
    }

    /// The header as the index thread will have it once it has indexed every append so far
    /// (read once; then kept here).
    private func pipelinedMeta() throws -> MirrorMeta {
        guard !indexGivenUp else { throw RewindError.invalidArgument("the journal's index thread was given up") }
        if let meta { return meta }
        let m = try journal.env.read { try journal.readMeta($0) }
        if m.pendingRollback != MirrorMeta.none { throw RewindError.interruptedRollback(target: m.pendingRollback) }
        syncedTo = m.logEnd
        meta = m
        return m
    }

    private func begin() throws -> LMDBTransaction {
        if let txn { return txn }
        let t = try journal.env.beginWrite()
        do {
            let m = try journal.readMeta(t)
            if m.pendingRollback != MirrorMeta.none { throw RewindError.interruptedRollback(target: m.pendingRollback) }
            meta = m
            beganAtLogEnd = m.logEnd
            syncedTo = m.logEnd  // synced by whoever committed it (a rollback may have cut it back)
        } catch {
            t.abort()
            throw error
        }
        txn = t
        return t
    }

    /// Write `changes` to the log as one chunk and index them: in `txn`, or (nil) by handing
    /// them to the index thread.
    private func stage(_ txn: LMDBTransaction?, _ changes: [Change], sourceSynced: UInt64?) throws -> ClosedRange<UInt64> {
        let current: MirrorMeta? = txn == nil ? try pipelinedMeta() : self.meta
        guard var meta = current else {
            throw RewindError.invalidArgument("no open journal transaction")
        }
        for c in changes { try mirror.validate(c) }
        if let sourceSynced { meta.sourceSyncedSeq = min(sourceSynced, meta.lastSeq) }
        let cursor = try txn?.cursor(journal.blocks)
        var staged = StagedBlocks()  // what partial blocks merge with, when `txn` is nil
        var batch = IndexCommitter.Batch(sourceSynced: sourceSynced.map { _ in meta.sourceSyncedSeq })
        let blockSize = mirror.blockSize
        let bs = UInt64(blockSize)
        let appendStart = meta.logEnd
        var chunk = ChunkBuilder(start: meta.logEnd, firstSeq: meta.lastSeq + 1, generation: meta.generation)
        swap(&chunk.payload, &spare)  // moved, not shared: clearing a shared array would copy it
        chunk.payload.removeAll(keepingCapacity: true)
        var scratch = [UInt8](repeating: 0, count: blockSize)  // a partial block's current content
        var seq = meta.lastSeq
        var cumulative = meta.lastCumulative
        let firstSeq = seq + 1
        for change in changes {
            seq += 1
            // Each index update faults in a journal page, which may map the 2 MiB folio around
            // it: counted as `indexUpdateBytes` of reading (see `Journal.touched`).
            if txn != nil { journal.touched(Mirror.indexUpdateBytes) }
            let now = max(wallClockNanoseconds(), meta.lastTime)
            meta.lastTime = now
            let (stored, zeroed) = Mirror.layout(kind: change.kind, offset: change.offset, length: change.length, blockSize: bs)
            batch.blocks += stored.count + zeroed.count
            let bytes = stored.count * blockSize
            if chunk.count > 0 && (chunk.payloadBytes + bytes > Self.chunkCapBytes || chunk.count >= Self.chunkMaxRecords) {
                meta.logEnd = try write(&chunk)
                var next = ChunkBuilder(start: meta.logEnd, firstSeq: seq, generation: meta.generation)
                swap(&next.payload, &chunk.payload)
                next.payload.removeAll(keepingCapacity: true)
                chunk = next
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
                        try fillBlock(slot: at + i * blockSize, block: block, change: change, cursor, staged, &chunk, &scratch)
                    }
                    blockHashes = chunk.payload.withUnsafeBytes {
                        RewindCore.blockHashes(UnsafeRawBufferPointer(rebasing: $0[at..<at + bytes]), blockSize: blockSize)
                    }
                }
                header.checksum = payloadChecksum(blockHashes: blockHashes)
                cumulative += UInt64(bytes)
                header.cumulative = cumulative
            }
            if let txn, let cursor {
                try mirror.index(header, seq: seq, blockHashes: blockHashes, txn, cursor)
            } else {
                staged.add(header, seq: seq, blockHashes: blockHashes, blockSize: blockSize)
                batch.records.append((header, seq, blockHashes))
            }
            chunk.add(header)
        }
        if chunk.count > 0 { meta.logEnd = try write(&chunk) }
        swap(&spare, &chunk.payload)
        if keepsLogOutOfCache && meta.logEnd > appendStart {
            // Large appends are written back at once (pacing). A small one is left to the FLUSH
            // that usually follows it: starting its writeback here costs the FLUSH ~100 µs
            // before the source is even written.
            let written = appendStart..<meta.logEnd, previous = writingBack
            let startNow = meta.logEnd - appendStart >= Self.prewriteBelowBytes
            if startNow || previous != nil {
                cacheAdvice.async { [log] in
                    if startNow { log.startWriteback(written) }
                    if let previous { log.release(previous) }
                }
            }
            writingBack = written
        }
        meta.lastSeq = seq
        meta.lastCumulative = cumulative
        if let txn {
            try journal.writeMeta(txn, meta)
        } else if let committer {
            (batch.lastSeq, batch.lastTime, batch.lastCumulative, batch.logEnd) = (seq, meta.lastTime, cumulative, meta.logEnd)
            try committer.send(batch)
            commitOwed = true
        }
        self.meta = meta
        return firstSeq...max(seq, firstSeq)
    }

    /// Write a finished chunk to the log; returns the log's new end.
    private func write(_ chunk: inout ChunkBuilder) throws -> UInt64 {
        let header = chunk.header()
        // Small chunks (a FLUSH after a few writes) land in zeroed, synced blocks, so their
        // FLUSH syncs data only; large ones in fallocated blocks, written once.
        let small = header.totalBytes < Self.prewriteBelowBytes
        try log.reserve(chunk.start..<chunk.start + header.totalBytes,
                        ahead: keepsLogOutOfCache ? (small ? min(Self.prewriteAheadBytes, log.reserveAhead) : log.reserveAhead) : 0,
                        prewrite: keepsLogOutOfCache && small)
        try header.encodedHeader().withUnsafeBytes { try log.write($0, at: chunk.start) }
        var at = chunk.payloadStart
        for part in chunk.parts {
            switch part {
            case let .copied(from, length):
                try chunk.payload.withUnsafeBytes { try log.write(UnsafeRawBufferPointer(rebasing: $0[from..<from + length]), at: at) }
                at += UInt64(length)
            case let .direct(data):
                try data.withUnsafeBytes { try log.write($0, at: at) }
                at += UInt64(data.count)
            }
        }
        try chunk.records.withUnsafeBytes { try log.write($0, at: at) }
        return chunk.start + header.totalBytes
    }

    /// Build one stored block of an unaligned write, or a partial edge block of a zero/trim:
    /// the block's current content with the change's part applied. `slot` is where the block
    /// sits in `chunk.payload` (the copied bytes).
    private func fillBlock(slot: Int, block: UInt64, change: Change, _ cursor: LMDBCursor?, _ staged: StagedBlocks,
                           _ chunk: inout ChunkBuilder, _ scratch: inout [UInt8]) throws {
        let blockSize = mirror.blockSize
        let bs = UInt64(blockSize)
        let blockStart = block * bs
        let covered = max(blockStart, change.offset)..<min(blockStart + bs, change.offset + change.length)
        if covered.count < blockSize {
            try scratch.withUnsafeMutableBytes { try currentContent(cursor, staged, chunk, block: block, into: $0) }
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

    /// The latest content of `block`: as the open transaction sees it (`cursor`), including
    /// records staged earlier in the chunk being built (still in memory); or, with the index on
    /// its own thread, as this append's earlier changes left it (`staged`), else the volume.
    private func currentContent(_ cursor: LMDBCursor?, _ staged: StagedBlocks, _ chunk: ChunkBuilder, block: UInt64,
                                into dst: UnsafeMutableRawBufferPointer) throws {
        let found: (seq: UInt64, content: BlockContent)?
        if let cursor {
            found = try journal.lookup(cursor, block: block, atOrBefore: UInt64.max)
        } else if let newest = staged.newest(block) {
            found = newest
        } else {
            guard let readVolume else { throw RewindError.invalidArgument("no volume to merge a partial block with") }
            try readVolume(block * UInt64(mirror.blockSize), dst)
            return
        }
        guard let (seq, content) = found else {
            try mirror.base.read(at: block * UInt64(mirror.blockSize), into: dst)
            return
        }
        switch content {
        case .zero:
            dst.initializeMemory(as: UInt8.self, repeating: 0)
        case let .data(segment, offset, hash):
            if segment == chunk.payloadStart {
                chunk.copy(from: Int(offset), into: dst)
            } else {
                try journal.readBlock(seq: seq, block: block, segment: segment, offset: offset, hash: hash, into: dst)
            }
        }
    }

    // MARK: sync and commit

    /// Make every record appended so far durable (the NBD FLUSH): fdatasync of the log.
    public func syncLog() throws {
        guard let end = meta?.logEnd, end > syncedTo else { return }
        try log.sync()
        logSynced(to: end)
    }

    /// Like `syncLog()`, but lets `deviceFlush` — an `fdatasync` of a file whose device cache
    /// flush covers the log (`BlockFile.fdatasyncFlushesDevice`) — make the log durable when
    /// only data is owed (`PayloadLog.sync(flushedBy:)`): the FLUSH of a served volume then
    /// costs one device cache flush. Returns whether `deviceFlush` ran; if not, nothing was
    /// synced and the caller syncs both the usual way.
    public func syncLog(sharingFlush deviceFlush: () throws -> Void) throws -> Bool {
        guard let end = meta?.logEnd, end > syncedTo else { return false }
        guard try log.sync(flushedBy: deviceFlush) else { return false }
        logSynced(to: end)
        return true
    }

    /// The log is durable up to `end`: what was being written back is clean, so it leaves the cache.
    private func logSynced(to end: UInt64) {
        syncedTo = end
        if keepsLogOutOfCache, let pending = writingBack {
            let clean = undropped.map { min($0.lowerBound, pending.lowerBound)..<max($0.upperBound, pending.upperBound) } ?? pending
            writingBack = nil
            if clean.count >= Self.dropBatchBytes {
                cacheAdvice.async { [log] in log.dropFromCache(clean) }
                undropped = nil
            } else {
                undropped = clean
            }
        }
    }

    /// Whether an `fdatasync` of `file` flushes the device cache under the log too.
    public func logSharesDeviceFlush(with file: BlockFile) -> Bool {
        file.fdatasyncFlushesDevice(of: log.directory)
    }

    /// Sync the log, then commit the index transaction (readers see the new records). If the
    /// sync fails the transaction stays open and the caller chooses how to abort; if LMDB's
    /// commit fails the transaction is gone, and `abort(keepLog: false)` can still cut the log.
    /// With the index on its own thread: wait until it has committed every append so far.
    public func commit() throws {
        if let committer {
            commitOwed = false
            try committer.commitAndWait()
            return
        }
        guard let txn else { return }
        try syncLog()
        self.txn = nil
        meta = nil
        do {
            try txn.commit()
        } catch let e as LMDBError {
            throw RewindError.journal(e)
        }
        beganAtLogEnd = nil
    }

    /// With the index on its own thread: have it commit every append so far, soon (not waiting).
    public func requestCommit() {
        commitOwed = false
        committer?.requestCommit()
    }

    /// Abandon what is staged. With `keepLog` false, the log is cut back to where the
    /// transaction began, so no later replay resurrects the abandoned records; with it true
    /// (a fenced server whose source already holds them), the next writer replays them.
    /// With the index on its own thread, it gives up its transaction and queue (whatever
    /// `keepLog` says: the log keeps them), and every later append is refused.
    public func abort(keepLog: Bool) {
        if let committer {
            committer.abandon()
            indexGivenUp = true
            return
        }
        // Cut the log while still holding LMDB's writer lock, so no other writer's chunk can
        // have followed ours.
        if !keepLog, let end = beganAtLogEnd { try? log.truncate(at: end) }
        txn?.abort()
        txn = nil
        meta = nil
        beganAtLogEnd = nil
    }
}

/// The chunk being built for one group commit: its payload — bytes copied into `payload`,
/// and large aligned writes kept as the caller's arrays — and its record headers.
struct ChunkBuilder {
    enum Part {
        case copied(from: Int, length: Int)  // a run of `payload`
        case direct([UInt8])
    }
    let start: UInt64
    let firstSeq: UInt64
    let generation: UInt64
    /// The copied bytes (its capacity is reused between group commits).
    var payload: [UInt8] = []
    private(set) var parts: [Part] = []
    /// Where each part starts in the chunk's payload.
    private var partStarts: [Int] = []
    private(set) var payloadBytes = 0
    var records: [UInt8] = []
    private(set) var count: UInt32 = 0

    init(start: UInt64, firstSeq: UInt64, generation: UInt64) {
        (self.start, self.firstSeq, self.generation) = (start, firstSeq, generation)
    }

    /// Stream position of the payload (what records and index entries call the segment).
    var payloadStart: UInt64 { start + UInt64(LogChunk.headerSize) }

    private mutating func grow(copied n: Int) {
        if case let .copied(from, length)? = parts.last {
            parts[parts.count - 1] = .copied(from: from, length: length + n)
        } else {
            parts.append(.copied(from: payload.count - n, length: n))
            partStarts.append(payloadBytes)
        }
        payloadBytes += n
    }

    mutating func appendCopied(_ data: [UInt8]) {
        payload.append(contentsOf: data)
        grow(copied: data.count)
    }

    /// Append `n` zero bytes to the copied payload; returns where they start in `payload`.
    mutating func appendZeros(_ n: Int) -> Int {
        let at = payload.count
        payload.append(contentsOf: repeatElement(0, count: n))
        grow(copied: n)
        return at
    }

    mutating func appendDirect(_ data: [UInt8]) {
        parts.append(.direct(data))
        partStarts.append(payloadBytes)
        payloadBytes += data.count
    }

    /// Copy `dst.count` bytes from payload offset `offset` (within one part: a block).
    func copy(from offset: Int, into dst: UnsafeMutableRawBufferPointer) {
        var lo = 0, hi = partStarts.count - 1
        while lo < hi {  // the last part starting at or before offset
            let mid = (lo + hi + 1) / 2
            if partStarts[mid] <= offset { lo = mid } else { hi = mid - 1 }
        }
        let inPart = offset - partStarts[lo]
        switch parts[lo] {
        case let .copied(from, _):
            payload.withUnsafeBytes { dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[from + inPart..<from + inPart + dst.count])) }
        case let .direct(data):
            data.withUnsafeBytes { dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[inPart..<inPart + dst.count])) }
        }
    }

    mutating func add(_ header: RecordHeader) {
        records.append(contentsOf: header.encoded(seq: firstSeq + UInt64(count)))
        count += 1
    }

    func header() -> LogChunk {
        LogChunk(generation: generation, firstSeq: firstSeq, count: count, payloadBytes: UInt64(payloadBytes),
                 recordsCheck: xxh3(records))
    }
}
