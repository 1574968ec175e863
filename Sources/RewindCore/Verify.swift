/// What `verify` checked.
public struct VerifyReport: Sendable, Codable {
    public var records: UInt64 = 0
    public var payloadBytes: UInt64 = 0
    public var indexEntries: UInt64 = 0
    public var comparedBytes: UInt64 = 0
    public var comparedAt: UInt64?
}

extension Mirror {
    /// Check every record (header checksum, seq continuity, time order, bounds, payload XXH3)
    /// and every index entry (points at a live record, block XXH3); with `image`, compare the
    /// volume as of `point` with it byte for byte. Throws on the first fault, naming the record
    /// (by seq) or the offset.
    public func verify(at point: Point? = nil, against image: String? = nil, progress: ProgressObserver? = nil) throws -> VerifyReport {
        try verify(at: point, comparingWith: image.map { try BlockFile(path: $0, mode: .readOnly) }, progress: progress)
    }

    /// `verify`, comparing with any `VolumeSource` (an image file, an NBD export).
    public func verify(at point: Point? = nil, comparingWith source: (any VolumeSource)?, progress: ProgressObserver? = nil) throws -> VerifyReport {
        var report = VerifyReport()
        let bs = UInt64(blockSize)
        // A compaction deletes log files once the horizon moves: hold it off, as a snapshot does.
        let lock = try FileLock(path: baseLockPath, kind: .shared, waitSeconds: 30,
                                holder: "a compaction is rewriting base.img")
        defer { lock.release() }
        try journal.env.read { txn in
            let m = try journal.readMeta(txn)
            let cursor = try txn.cursor(journal.records)
            // An unfinished compaction is removing records up to its target: check from there.
            var expected = m.oldestPoint + 1
            var lastTime = m.horizonTime
            var cumulative = m.horizonCumulative
            if m.oldestPoint > m.horizon {
                let h = try journal.header(txn, seq: m.oldestPoint)
                (lastTime, cumulative) = (h.timestamp, h.cumulative)
            }
            progress?.begin(phase: "verifying records", total: m.lastSeq - m.oldestPoint)
            var tallies = TallyBuckets()
            // The headers, kept for the index pass's cross-checks when they are few enough
            // (`headersKeptMax`): each entry is checked against its record, and looking each
            // record up again in LMDB, in the index's block order, cost a random page fault per
            // entry (verify of 200,000 random records: 1.2–1.4 s → 2.6–3.6 s).
            let keep = m.lastSeq - m.oldestPoint <= Self.headersKeptMax
            var headers: [RecordHeader] = []
            if keep { headers.reserveCapacity(Int(m.lastSeq - m.oldestPoint)) }
            var entry = try cursor.seek(atLeast: seqKey(expected))
            while let e = entry {
                guard e.key.count == 8 else { throw RewindError.damagedMirror(path: path, why: "malformed record key") }
                let seq = e.key.loadBE(at: 0)
                // Only a catch-up follows a gap: the one standing for exactly those seqs.
                let gapHeader = seq > expected ? (try? IndexTally.decodeStored(e.value, seq: seq))?.0 : nil
                let skipped = gapHeader.map { $0.kind == .catchUp && $0.offset == expected - 1 } ?? false
                guard seq == expected || skipped else {
                    throw RewindError.corruptRecord(seq: expected, why: seq > expected ? "missing (next record is seq:\(seq))" : "duplicated")
                }
                if let gapHeader, skipped && keep { headers += Array(repeating: gapHeader, count: Int(seq - expected)) }
                expected = seq
                let (h, tally) = try IndexTally.decodeStored(e.value, seq: seq)
                tallies.add(tally, seq: seq)
                if keep { headers.append(h) }
                guard h.timestamp >= lastTime else {
                    throw RewindError.corruptRecord(seq: seq, why: "timestamp \(formatRFC3339(h.timestamp)) is before the previous record's")
                }
                guard h.kind == .catchUp || (h.offset <= volumeSize && h.length <= volumeSize - h.offset) else {
                    throw RewindError.corruptRecord(seq: seq, why: "range \(h.offset)+\(h.length) lies outside the volume")
                }
                guard h.kind != .write || h.length <= Self.maxWriteBytes else {
                    throw RewindError.corruptRecord(seq: seq, why: "write of \(h.length) bytes exceeds the \(Self.maxWriteBytes)-byte limit")
                }
                if h.kind == .catchUp {
                    guard h.offset < seq, h.offset + 1 == expected || seq == expected else {
                        throw RewindError.corruptRecord(seq: seq, why: "a catch-up from seq:\(h.offset) where seq:\(expected - 1) precedes it")
                    }
                    _ = try catchUpRuns(h, seq: seq)  // its run list adds up to its blocks and stored bytes
                }
                let expectedStored = h.kind == .catchUp ? h.storedBytes
                    : UInt64(Self.layout(kind: h.kind, offset: h.offset, length: h.length, blockSize: bs).stored.count) * bs
                guard h.storedBytes == expectedStored, h.cumulative == cumulative + expectedStored else {
                    throw RewindError.corruptRecord(seq: seq, why: "stored length \(h.storedBytes) does not match its \(h.kind.name) of \(h.length) bytes")
                }
                if h.storedBytes > 0 {
                    let sum = try journal.storedChecksum(seq: seq, header: h, blockSize: blockSize)
                    guard sum == h.checksum else {
                        throw RewindError.corruptRecord(seq: seq, why: "payload checksum mismatch (stored \(hex(h.checksum)), computed \(hex(sum)))")
                    }
                }
                report.records += 1
                journal.touched(RecordHeader.size + 16 + Int(clamping: h.storedBytes))
                report.payloadBytes += h.storedBytes
                cumulative = h.cumulative
                lastTime = h.timestamp
                expected += 1
                if report.records % 4096 == 0 { progress?.update(done: report.records) }
                entry = try cursor.next()
            }
            guard expected == m.lastSeq + 1 else {
                throw RewindError.corruptRecord(seq: expected, why: "missing: the journal ends at seq:\(expected - 1) but its header says seq:\(m.lastSeq)")
            }
            progress?.end()
            // Every bookmark checks, and names a point inside the journal.
            for (name, seq) in try journal.allBookmarks(txn) where seq > m.lastSeq {
                throw RewindError.damagedMirror(path: path, why: "bookmark \"\(name)\" names seq:\(seq), after the newest record seq:\(m.lastSeq)")
            }
            try verifyIndex(txn, meta: m, expected: tallies, headers: keep ? headers : nil, report: &report, progress: progress)
        }
        if let source {
            try compare(at: point ?? .latest, with: source, report: &report, progress: progress)
        }
        return report
    }

    /// Check every index entry: its own check, that it lies inside the journal, that the
    /// record it names wrote it (`entryMatches`), its payload's XXH3; then that the entries of
    /// each seq add up to what its record's tally says, naming the first record that differs.
    /// Record headers `verify` and a restore's index pass keep in memory for the cross-checks
    /// (72 bytes each: 18 MiB at most).
    static let headersKeptMax: UInt64 = 1 << 18

    /// `headers`: the records (oldest, lastSeq] in order, when the records pass kept them.
    private func verifyIndex(_ txn: LMDBTransaction, meta m: MirrorMeta, expected: TallyBuckets, headers: [RecordHeader]?,
                             report: inout VerifyReport, progress: ProgressObserver?) throws {
        let cursor = try txn.cursor(journal.blocks)
        progress?.begin(phase: "verifying index", total: UInt64(try txn.count(journal.blocks)))
        var entry = try cursor.first()
        var scratch = [UInt8](repeating: 0, count: blockSize)
        let oldestEntry = m.target > m.horizon ? 0 : m.horizon + 1  // an unfinished compaction leaves older entries
        var found = TallyBuckets()
        var cached: (seq: UInt64, header: RecordHeader)?
        var previous: (block: UInt64, seq: UInt64)?
        while let e = entry {
            guard let key = decodeBlockKey(e.key) else {
                throw RewindError.damagedMirror(path: path, why: "an index key is \(e.key.count) bytes (journal/data.mdb is damaged)")
            }
            if let p = previous, (p.block, p.seq) >= (key.block, key.seq) {
                throw RewindError.corruptBlock(seq: key.seq, block: key.block, why: "its index entry is out of order (journal/data.mdb is damaged)")
            }
            previous = key
            guard key.seq >= oldestEntry, key.seq <= m.lastSeq, key.block < m.blockCount else {
                throw RewindError.corruptBlock(seq: key.seq, block: key.block, why: "index entry outside the journal")
            }
            let (content, hash) = try BlockContent.decode(e.value, seq: key.seq, block: key.block)
            if key.seq > m.oldestPoint {
                found.add(hash, seq: key.seq)
                if cached?.seq != key.seq {
                    let header = try headers.map { $0[Int(key.seq - m.oldestPoint - 1)] } ?? journal.header(txn, seq: key.seq)
                    cached = (key.seq, header)
                }
                if let h = cached?.header, !entryMatches(h, block: key.block, content: content) {
                    throw RewindError.corruptBlock(seq: key.seq, block: key.block,
                                                   why: "its index entry does not match the record's \(h.kind.name) at \(h.offset)+\(h.length) (journal/data.mdb is damaged)")
                }
            }
            if case let .data(segment, off, hash) = content {
                try scratch.withUnsafeMutableBytes {
                    try journal.readBlock(seq: key.seq, block: key.block, segment: segment, offset: off, hash: hash, into: $0)
                }
            }
            report.indexEntries += 1
            journal.touched(32 + blockSize)
            if report.indexEntries % 4096 == 0 { progress?.update(done: report.indexEntries) }
            entry = try cursor.next()
        }
        progress?.end()
        let differing = expected.differingBuckets(found)
        guard !differing.isEmpty else { return }
        // Name the first record whose entries differ: per seq, only for the differing buckets.
        var perSeq: [UInt64: IndexTally] = [:]
        var e2 = try cursor.first()
        while let e = e2 {
            if let key = decodeBlockKey(e.key), key.seq > m.oldestPoint, differing.contains(TallyBuckets.bucket(key.seq)),
               perSeq.count < TallyBuckets.namedSeqsMax || perSeq[key.seq] != nil {
                perSeq[key.seq, default: IndexTally()].add(try BlockContent.decode(e.value, seq: key.seq, block: key.block).hash)
            }
            e2 = try cursor.next()
        }
        var seq = m.oldestPoint + 1
        while seq <= m.lastSeq {
            if differing.contains(TallyBuckets.bucket(seq)) {
                let want = try journal.stored(txn, seq: seq).tally
                let have = perSeq[seq] ?? IndexTally()
                if want != have {
                    throw RewindError.corruptRecord(seq: seq, why: "it wrote \(want.count) index entr\(want.count == 1 ? "y" : "ies"), the block index holds \(have.count)\(want.count == have.count ? " that differ" : "") (journal/data.mdb is damaged)")
                }
            }
            seq += 1
        }
        throw RewindError.damagedMirror(path: path, why: "the block index does not hold what its records wrote (journal/data.mdb is damaged)")
    }

    /// Compare the volume as of `point` with `source`, 1 MiB at a time.
    private func compare(at point: Point, with source: any VolumeSource, report: inout VerifyReport, progress: ProgressObserver?) throws {
        let image = source.name
        try checkSameSize(as: source)
        let snapshot = try Snapshot(mirror: self, point: point)
        defer { snapshot.close() }
        report.comparedAt = snapshot.seq
        progress?.begin(phase: "comparing with \(image)", total: volumeSize)
        try forEachChunk(of: snapshot, beside: source) { at, mine, theirs in
            if mine != theirs {
                let i = (0..<mine.count).first { mine[mine.startIndex + $0] != theirs[theirs.startIndex + $0] } ?? 0
                let (a, b) = (mine[mine.startIndex + i], theirs[theirs.startIndex + i])
                throw RewindError.mismatch(offset: at + UInt64(i),
                                           why: "the mirror at seq:\(snapshot.seq) has 0x\(String(a, radix: 16)), \(image) has 0x\(String(b, radix: 16))")
            }
            report.comparedBytes = at + UInt64(mine.count)
            progress?.update(done: report.comparedBytes)
        }
        progress?.end()
    }
}

func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16).leftPadded(16) }

/// Index tallies summed per bucket of seqs (seq mod `count`): bounded memory whatever the
/// journal's length, and enough to find which records' entries differ on a second pass.
struct TallyBuckets {
    static let count = 1 << 16
    /// Seqs tallied one by one when naming a differing record.
    static let namedSeqsMax = 1 << 20
    private var buckets = [IndexTally](repeating: IndexTally(), count: count)

    static func bucket(_ seq: UInt64) -> Int { Int(seq % UInt64(count)) }

    mutating func add(_ tally: IndexTally, seq: UInt64) { buckets[Self.bucket(seq)].add(tally) }
    mutating func add(_ entryHash: UInt64, seq: UInt64) { buckets[Self.bucket(seq)].add(entryHash) }

    func differingBuckets(_ other: TallyBuckets) -> Set<Int> {
        Set((0..<Self.count).filter { buckets[$0] != other.buckets[$0] })
    }
}
