/// A record as the replication link carries it: the origin's seq, timestamp and header
/// fields, and its stored payload (whole blocks: what the origin's log holds), so a receiver
/// stores exactly the origin's record and the same point gives the same bytes on every unit.
public struct ReplicatedRecord: Sendable, Equatable {
    public var seq: UInt64
    public var timestamp: UInt64
    public var kind: ChangeKind
    public var fua: Bool
    public var offset: UInt64
    public var length: UInt64
    /// XXH3-64 over the XXH3-64s of the payload's blocks, as the origin computed it: checked
    /// by the sender before it sends and by every receiver before it stores.
    public var checksum: UInt64
    public var payload: [UInt8]

    public init(seq: UInt64, timestamp: UInt64, kind: ChangeKind, fua: Bool, offset: UInt64, length: UInt64,
                checksum: UInt64, payload: [UInt8]) {
        self.seq = seq
        self.timestamp = timestamp
        self.kind = kind
        self.fua = fua
        self.offset = offset
        self.length = length
        self.checksum = checksum
        self.payload = payload
    }
}

extension Mirror {
    /// Records `from`... in seq order, at most `maxRecords` and about `maxBytes` of payload
    /// (at least one record when one exists), each payload checked against its record's
    /// checksum. Empty when `from` is past the newest record. Throws `behindHorizon` when
    /// `from` was folded into the base.
    public func replicatedRecords(from: UInt64, maxRecords: Int, maxBytes: Int) throws -> [ReplicatedRecord] {
        try journal.env.read { txn in
            let m = try journal.readMeta(txn)
            guard from > m.horizon else { throw RewindError.behindHorizon(seq: from, horizon: m.horizon) }
            guard from <= m.lastSeq else { return [] }
            var out: [ReplicatedRecord] = []
            var bytes = 0
            var seq = from
            while seq <= m.lastSeq, out.count < maxRecords, out.isEmpty || bytes < maxBytes {
                // A catch-up stands for the seqs it skipped: a peer before it gets it next.
                guard let (found, h) = try journal.record(txn, atOrAfter: seq) else { break }
                seq = found
                if h.kind == .catchUp {
                    // A catch-up goes on as a catch-up (`forEachCatchUpData`), never in a batch:
                    // alone, without its payload (of any size), and nothing after it.
                    if out.isEmpty {
                        out.append(ReplicatedRecord(seq: seq, timestamp: h.timestamp, kind: h.kind, fua: false, offset: h.offset,
                                                    length: h.length, checksum: h.checksum, payload: []))
                    }
                    break
                }
                let payload = try journal.payload(seq: seq, header: h)
                if !payload.isEmpty {
                    let sum = payload.withUnsafeBytes { payloadChecksum($0, blockSize: blockSize) }
                    guard sum == h.checksum else {
                        throw RewindError.corruptRecord(seq: seq, why: "payload checksum mismatch (data damaged on disk)")
                    }
                }
                out.append(ReplicatedRecord(seq: seq, timestamp: h.timestamp, kind: h.kind, fua: h.fua, offset: h.offset,
                                            length: h.length, checksum: h.checksum, payload: payload))
                bytes += payload.count
                journal.touched(payload.count + RecordHeader.size)
                seq += 1
            }
            return out
        }
    }

    /// A catch-up record of this mirror (a cascade forwards it as a catch-up): its runs, then
    /// its data blocks in run order, read from the log in pieces of at most `maxBytes`, each
    /// block checked against the record's checksum as a whole at the end.
    public func forEachCatchUpData(seq: UInt64, maxBytes: Int = 4 << 20, runs body: ([CatchUpRun]) throws -> Void,
                                   data: (UnsafeRawBufferPointer) throws -> Void) throws {
        let h = try journal.env.read { try journal.header($0, seq: seq) }
        guard h.kind == .catchUp else { throw RewindError.invalidArgument("seq:\(seq) is not a catch-up") }
        let runs = try catchUpRuns(h, seq: seq)
        try body(runs)
        let bs = blockSize
        let list = CatchUp.listBlocks(runs: runs.count, blockSize: bs) * bs
        let hasher = PayloadHasher(blockSize: bs)
        CatchUp.encodeRuns(runs, blockSize: bs).withUnsafeBytes { hasher.update($0) }
        try journal.readPayloadPieces(at: h.payloadPosition + UInt64(list), count: h.storedBytes - UInt64(list), blockSize: bs,
                                      maxBytes: maxBytes, seq: seq) { piece in
            hasher.update(piece)
            try data(piece)
        }
        guard hasher.checksum == h.checksum else {
            throw RewindError.corruptRecord(seq: seq, why: "payload checksum mismatch (data damaged on disk)")
        }
    }

    /// What a peer at `seq` lacks: records, payload bytes, and the age of the oldest of them.
    public func lag(after seq: UInt64) throws -> (records: UInt64, bytes: UInt64, seconds: Double) {
        try journal.env.read { txn in
            let m = try journal.readMeta(txn)
            guard seq < m.lastSeq else { return (0, 0, 0) }
            guard seq >= m.horizon else { return (m.lastSeq - seq, m.lastCumulative - m.horizonCumulative, 0) }
            let cumulative = seq == m.horizon ? m.horizonCumulative : try journal.record(txn, atOrBefore: seq)?.header.cumulative ?? m.horizonCumulative
            // Seconds: how long ago the oldest record the peer lacks was written.
            let next = try journal.record(txn, atOrAfter: seq + 1)?.header.timestamp ?? journal.header(txn, seq: seq + 1).timestamp
            let now = wallClockNanoseconds()
            return (m.lastSeq - seq, m.lastCumulative - cumulative, now > next ? Double(now - next) / 1e9 : 0)
        }
    }
}

extension JournalWriter {
    /// Append records received from another unit under their own seqs and timestamps; the
    /// first must follow the newest record. Each payload is checked against its checksum and
    /// its kind, offset and length against the volume before anything is staged, so a bad
    /// record changes nothing. Durable after `commit()`.
    public func appendReplicated(_ records: [ReplicatedRecord]) throws {
        do {
            try stageReplicated(records)
        } catch let e as LMDBError {
            throw RewindError.journal(e)
        }
    }

    private func stageReplicated(_ records: [ReplicatedRecord]) throws {
        guard !records.isEmpty else { return }
        var meta = try indexing.beginAppend()
        let bs = UInt64(mirror.blockSize)
        var expected = meta.lastSeq + 1
        var lastTime = meta.lastTime
        var layouts: [(stored: [UInt64], zeroed: Range<UInt64>)] = []
        var hashes: [[UInt64]] = []
        for r in records {
            guard r.seq == expected else {
                throw RewindError.invalidArgument("received seq:\(r.seq) where seq:\(expected) follows this mirror's newest record")
            }
            guard r.timestamp >= lastTime else {
                throw RewindError.corruptRecord(seq: r.seq, why: "its time \(formatRFC3339(r.timestamp)) is before the record it follows")
            }
            if r.kind == .write {
                guard r.length <= Mirror.maxWriteBytes else { throw RewindError.corruptRecord(seq: r.seq, why: "a write of \(r.length) bytes") }
            }
            guard r.kind == .flush || (r.offset <= mirror.volumeSize && r.length <= mirror.volumeSize - r.offset) else {
                throw RewindError.corruptRecord(seq: r.seq, why: "it changes \(r.length) bytes at \(r.offset), past the volume's end (\(mirror.volumeSize))")
            }
            let layout = Mirror.layout(kind: r.kind, offset: r.offset, length: r.length, blockSize: bs)
            guard r.payload.count == layout.stored.count * mirror.blockSize else {
                throw RewindError.corruptRecord(seq: r.seq, why: "its payload is \(r.payload.count) bytes, its \(r.kind.name) stores \(layout.stored.count * mirror.blockSize)")
            }
            let h = r.payload.withUnsafeBytes { RewindCore.blockHashes($0, blockSize: mirror.blockSize) }
            guard (h.isEmpty ? 0 : payloadChecksum(blockHashes: h)) == r.checksum else {
                throw RewindError.corruptRecord(seq: r.seq, why: "payload checksum mismatch (damaged on the way)")
            }
            layouts.append(layout)
            hashes.append(h)
            lastTime = r.timestamp
            expected += 1
        }
        let appendStart = meta.logEnd
        var chunk = appender.startChunk(at: meta.logEnd, firstSeq: records[0].seq, generation: meta.generation)
        var cumulative = meta.lastCumulative
        for (i, r) in records.enumerated() {
            let bytes = r.payload.count
            if chunk.count > 0 && (chunk.payloadBytes + bytes > Self.chunkCapBytes || chunk.count >= Self.chunkMaxRecords) {
                meta.logEnd = try appender.writeAndContinue(&chunk, firstSeq: r.seq)
            }
            cumulative += UInt64(bytes)
            let header = RecordHeader(kind: r.kind, fua: r.fua, timestamp: r.timestamp, offset: r.offset, length: r.length,
                                      checksum: r.checksum, segment: chunk.payloadStart, segmentOffset: UInt32(chunk.payloadBytes),
                                      storedLength: UInt32(bytes), cumulative: cumulative)
            if bytes >= Self.directMinBytes { chunk.appendDirect(r.payload) } else if bytes > 0 { chunk.appendCopied(r.payload) }
            try indexing.index(header, seq: r.seq, blockHashes: hashes[i], blocks: layouts[i].stored.count + layouts[i].zeroed.count)
            chunk.add(header)
        }
        if chunk.count > 0 { meta.logEnd = try appender.write(&chunk) }
        appender.recycle(&chunk)
        appender.appended(from: appendStart, to: meta.logEnd)
        meta.lastSeq = records[records.count - 1].seq
        meta.lastTime = lastTime
        meta.lastCumulative = cumulative
        try indexing.finishAppend(meta, sourceSynced: nil)
    }
}
