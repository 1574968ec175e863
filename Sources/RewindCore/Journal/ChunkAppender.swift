import Dispatch

/// Writes a journal writer's chunks to the payload log and syncs it: the log half of
/// `JournalWriter`, whichever way the records are indexed. Keeps the chunk buffer between
/// group commits, and in streaming mode the log out of the page cache.
///
/// Use from one thread only (the writer's).
final class ChunkAppender {
    let log: PayloadLog
    /// Log positions below this are durable. Whoever reads the mirror's header before an append
    /// resets it to the header's `logEnd`.
    var syncedTo: UInt64 = 0
    /// Streaming mode (serve): keep the log out of the page cache — each group commit's chunk
    /// is written back at once and dropped once written, after the next one — and reserve its
    /// disk blocks 8 MiB ahead (`PayloadLog.reserve`). Tools that read back what they wrote
    /// keep the pages, and reserve only each chunk's own blocks (the log's size on disk stays
    /// what was written).
    var keepsLogOutOfCache = false
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

    /// Chunks smaller than this are written into zeroed, synced blocks (see `PayloadLog.reserve`),
    /// prepared this far ahead.
    static let prewriteBelowBytes: UInt64 = 64 << 10
    static let prewriteAheadBytes: UInt64 = 1 << 20

    init(log: PayloadLog) {
        self.log = log
    }

    // MARK: chunks

    /// The first chunk of a group commit, built in the buffer kept from the last one.
    func startChunk(at start: UInt64, firstSeq: UInt64, generation: UInt64) -> ChunkBuilder {
        var chunk = ChunkBuilder(start: start, firstSeq: firstSeq, generation: generation)
        swap(&chunk.payload, &spare)  // moved, not shared: clearing a shared array would copy it
        chunk.payload.removeAll(keepingCapacity: true)
        return chunk
    }

    /// Write a full `chunk` and replace it with the next one, starting where it ended and built
    /// in its buffer. Returns the log's new end.
    func writeAndContinue(_ chunk: inout ChunkBuilder, firstSeq: UInt64) throws -> UInt64 {
        let end = try write(&chunk)
        var next = ChunkBuilder(start: end, firstSeq: firstSeq, generation: chunk.generation)
        swap(&next.payload, &chunk.payload)
        next.payload.removeAll(keepingCapacity: true)
        chunk = next
        return end
    }

    /// Write a finished chunk to the log; returns the log's new end.
    func write(_ chunk: inout ChunkBuilder) throws -> UInt64 {
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

    /// Keep the group commit's last `chunk`'s buffer for the next one.
    func recycle(_ chunk: inout ChunkBuilder) {
        swap(&spare, &chunk.payload)
    }

    /// A group commit wrote the log from `start` to `end`: in streaming mode, start its
    /// writeback and release the previous one's pages.
    func appended(from start: UInt64, to end: UInt64) {
        if keepsLogOutOfCache && end > start {
            // Large appends are written back at once (pacing). A small one is left to the FLUSH
            // that usually follows it: starting its writeback here costs the FLUSH ~100 µs
            // before the source is even written.
            let written = start..<end, previous = writingBack
            let startNow = end - start >= Self.prewriteBelowBytes
            if startNow || previous != nil {
                cacheAdvice.async { [log] in
                    if startNow { log.startWriteback(written) }
                    if let previous { log.release(previous) }
                }
            }
            writingBack = written
        }
    }

    // MARK: sync

    /// Make the log durable up to `end`, the end of the appends it owes (nil: none), if it is
    /// not already: fdatasync of the log.
    func syncLog(upTo end: UInt64?) throws {
        guard let end, end > syncedTo else { return }
        try log.sync()
        logSynced(to: end)
    }

    /// Like `syncLog(upTo:)`, but lets `deviceFlush` — an `fdatasync` of a file whose device
    /// cache flush covers the log — make the log durable when only data is owed
    /// (`PayloadLog.sync(flushedBy:)`). Returns whether `deviceFlush` ran; if not, nothing was
    /// synced.
    func syncLog(upTo end: UInt64?, sharingFlush deviceFlush: () throws -> Void) throws -> Bool {
        guard let end, end > syncedTo else { return false }
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
    func logSharesDeviceFlush(with file: BlockFile) -> Bool {
        file.fdatasyncFlushesDevice(of: log.directory)
    }
}
