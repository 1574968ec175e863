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
                if log.end() > meta.logEnd { try log.truncate(at: meta.logEnd) }
                if replayed > 0 { try journal.writeMeta(txn, meta) }
                return replayed
            }
        } catch let e as LMDBError {
            throw RewindError.journal(e)
        }
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
