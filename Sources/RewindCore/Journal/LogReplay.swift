import Foundation

/// What replay found past the last intact chunk when that was not just a torn tail: intact
/// chunks of the current history after a damaged one. A crash tears only unsynced writes, but
/// the kernel may write later pages first, so this is not proof of a disk error — yet the later
/// chunks may hold FLUSHed writes, so their bytes are kept (`savedAs`, fsynced) before the log
/// is cut, and every command that opens the mirror says so.
public struct LogDamage: Sendable, Equatable, CustomStringConvertible {
    /// Where the first chunk that failed its checks starts, and the seq it should have begun with.
    public let position: UInt64
    public let expectedSeq: UInt64
    /// Intact chunks found after it, and the seqs they claim.
    public let laterChunks: Int
    public let laterSeqs: ClosedRange<UInt64>
    /// Bytes from `position` to the log's end, kept in `savedAs`.
    public let bytes: UInt64
    public let savedAs: String

    public var description: String {
        "the journal's log is damaged at byte \(position) (seq:\(expectedSeq) failed its checks) and \(laterChunks) "
            + "intact chunk\(laterChunks == 1 ? "" : "s") claiming seq:\(laterSeqs.lowerBound)...seq:\(laterSeqs.upperBound) "
            + "followed; the journal now ends at seq:\(expectedSeq - 1), and the \(bytes) bytes from there were kept in \(savedAs)"
    }
}

/// Indexing the log's tail: the chunks a writer wrote (and perhaps synced, and answered a
/// FLUSH for) whose LMDB transaction never committed, because the process died first.
extension Mirror {
    /// Whether an intact chunk header lies where the index's log ends.
    func hasLogTail() throws -> Bool {
        let end = try meta().logEnd
        var raw = [UInt8](repeating: 0, count: LogChunk.headerSize)
        let complete = try raw.withUnsafeMutableBytes { try journal.log.read(at: end, into: $0) }
        return complete && raw.withUnsafeBytes { LogChunk.decodeHeader($0) } != nil
    }

    /// Index every intact chunk that follows the index's end of the log, in one write
    /// transaction, then cut the log after the last one: a chunk counts only if its header
    /// and record headers check, it belongs to the current generation (a rollback's abandoned
    /// history never comes back), it starts at the next seq, and every record's payload
    /// matches its checksum. The first chunk that fails ends the log (a torn write: it was
    /// never synced, so never answered as durable). Returns the number of records indexed.
    @discardableResult
    func replayLogTail() throws -> UInt64 {
        let log = journal.log
        do {
            return try journal.env.write { txn in
                var meta = try journal.readMeta(txn)
                let cursor = try txn.cursor(journal.blocks)
                var replayed: UInt64 = 0
                let start = meta.logEnd
                while let (chunk, records) = try readChunk(at: meta.logEnd, meta: meta) {
                    for (i, (h, hashes)) in records.enumerated() {
                        let seq = chunk.firstSeq + UInt64(i)
                        try index(h, seq: seq, blockHashes: hashes, txn, cursor)
                        meta.lastSeq = seq
                        meta.lastTime = max(meta.lastTime, h.timestamp)
                        meta.lastCumulative = h.cumulative
                    }
                    meta.logEnd += chunk.totalBytes
                    replayed += UInt64(chunk.count)
                }
                if replayed > 0 {
                    // The chunks may be only in the page cache (a killed process's unsynced
                    // writes): durable before the index that names them.
                    try log.sync(start..<meta.logEnd)
                }
                let end = log.end()
                if end > meta.logEnd {
                    if let (count, seqs) = try laterIntactChunks(from: meta.logEnd, to: end, meta: meta) {
                        let saved = try keepDamagedTail(meta.logEnd..<end)
                        logDamage = LogDamage(position: meta.logEnd, expectedSeq: meta.lastSeq + 1, laterChunks: count,
                                              laterSeqs: seqs, bytes: end - meta.logEnd, savedAs: saved)
                    }
                    try log.truncate(at: meta.logEnd)
                }
                if replayed > 0 { try journal.writeMeta(txn, meta) }
                return replayed
            }
        } catch let e as LMDBError {
            throw RewindError.journal(e)
        }
    }

    /// Intact chunk headers of the current history that claim later seqs, between the first
    /// chunk that failed and the log's end (chunks start on 64-byte boundaries): how many, and
    /// the seqs they claim; nil when there are none (a torn tail).
    private func laterIntactChunks(from start: UInt64, to end: UInt64, meta: MirrorMeta) throws -> (Int, ClosedRange<UInt64>)? {
        let step = UInt64(LogChunk.headerSize)
        let window = 1 << 20
        var buffer = [UInt8](repeating: 0, count: window + LogChunk.headerSize)
        var found = 0
        var seqs: ClosedRange<UInt64>?
        var at = start + step
        while at + step <= end {
            let n = Int(min(UInt64(buffer.count), end - at))
            guard try buffer.withUnsafeMutableBytes({ try journal.log.read(at: at, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n])) }) else { break }
            var i = 0
            while i + LogChunk.headerSize <= n && i < window {
                if buffer[i] == LogChunk.magic[0],
                   let chunk = buffer.withUnsafeBytes({ LogChunk.decodeHeader(UnsafeRawBufferPointer(rebasing: $0[i..<i + LogChunk.headerSize])) }),
                   chunk.generation == meta.generation, chunk.count > 0, chunk.firstSeq > meta.lastSeq + 1 {
                    found += 1
                    let last = chunk.firstSeq + UInt64(chunk.count) - 1
                    seqs = min(seqs?.lowerBound ?? chunk.firstSeq, chunk.firstSeq)...max(seqs?.upperBound ?? last, last)
                }
                i += Int(step)
            }
            at += UInt64(window)
        }
        guard found > 0, let seqs else { return nil }
        return (found, seqs)
    }

    /// Copy the log's bytes in `range` to `MIRROR/damaged-log/`, fsynced, before they are cut.
    private func keepDamagedTail(_ range: Range<UInt64>) throws -> String {
        let dir = path + "/damaged-log"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        let file = dir + "/" + String(format: "%016llx-%016llx.log", range.lowerBound, range.upperBound)
        let out = try BlockFile(path: file, mode: .createOrTruncate)
        var buffer = [UInt8](repeating: 0, count: 1 << 20)
        var at = range.lowerBound
        while at < range.upperBound {
            let n = Int(min(UInt64(buffer.count), range.upperBound - at))
            let complete = try buffer.withUnsafeMutableBytes { try journal.log.read(at: at, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n])) }
            guard complete else { break }
            try buffer.withUnsafeBytes { try out.write(at: at - range.lowerBound, from: UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
            at += UInt64(n)
        }
        try out.dataSync()
        syncDirectory(containing: file)
        syncDirectory(containing: dir)
        return file
    }

    /// The chunk at `position` with its record headers and each record's block hashes (from
    /// the payload, checked against the record's checksum), if it is intact and is the next
    /// one the index expects; nil otherwise (the log ends there).
    private func readChunk(at position: UInt64, meta: MirrorMeta) throws -> (LogChunk, [(RecordHeader, [UInt64])])? {
        let log = journal.log
        var raw = [UInt8](repeating: 0, count: LogChunk.headerSize)
        guard try raw.withUnsafeMutableBytes({ try log.read(at: position, into: $0) }),
              let chunk = raw.withUnsafeBytes({ LogChunk.decodeHeader($0) }),
              chunk.generation == meta.generation, chunk.firstSeq == meta.lastSeq + 1, chunk.count > 0,
              chunk.count <= UInt32(JournalWriter.chunkMaxRecords),
              chunk.payloadBytes <= UInt64(Mirror.maxWriteBytes) * 2 + UInt64(JournalWriter.chunkCapBytes) else { return nil }
        let payloadStart = position + UInt64(LogChunk.headerSize)
        var records = [UInt8](repeating: 0, count: Int(chunk.count) * RecordHeader.size)
        guard try records.withUnsafeMutableBytes({ try log.read(at: payloadStart + chunk.payloadBytes, into: $0) }),
              xxh3(records) == chunk.recordsCheck else { return nil }
        var payload = [UInt8](repeating: 0, count: Int(chunk.payloadBytes))
        guard try payload.withUnsafeMutableBytes({ try log.read(at: payloadStart, into: $0) }) else { return nil }
        var checked: [(RecordHeader, [UInt64])] = []
        let bs = UInt64(blockSize)
        var cumulative = meta.lastCumulative
        for i in 0..<Int(chunk.count) {
            let seq = chunk.firstSeq + UInt64(i)
            guard let h = try? records.withUnsafeBytes({ try RecordHeader.decode(UnsafeRawBufferPointer(rebasing: $0[i * 64..<(i + 1) * 64]), seq: seq) }),
                  h.kind != .catchUp,  // indexed before anyone is told; one found unindexed is dropped
                  h.segment == payloadStart, h.offset <= volumeSize, h.length <= volumeSize - h.offset,
                  h.kind != .write || h.length <= Mirror.maxWriteBytes,
                  UInt64(h.storedLength) == UInt64(Self.layout(kind: h.kind, offset: h.offset, length: h.length, blockSize: bs).stored.count) * bs,
                  UInt64(h.segmentOffset) + UInt64(h.storedLength) <= chunk.payloadBytes,
                  h.cumulative == cumulative + UInt64(h.storedLength) else { return nil }
            let hashes = payload.withUnsafeBytes {
                blockHashes(UnsafeRawBufferPointer(rebasing: $0[Int(h.segmentOffset)..<Int(h.segmentOffset) + Int(h.storedLength)]), blockSize: blockSize)
            }
            guard hashes.isEmpty || payloadChecksum(blockHashes: hashes) == h.checksum else { return nil }
            cumulative = h.cumulative
            checked.append((h, hashes))
        }
        return (chunk, checked)
    }
}
