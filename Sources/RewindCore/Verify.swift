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
            var entry = try cursor.seek(atLeast: seqKey(expected))
            while let e = entry {
                guard e.key.count == 8 else { throw RewindError.damagedMirror(path: path, why: "malformed record key") }
                let seq = e.key.loadBE(at: 0)
                guard seq == expected else {
                    throw RewindError.corruptRecord(seq: expected, why: seq > expected ? "missing (next record is seq:\(seq))" : "duplicated")
                }
                let h = try RecordHeader.decode(e.value, seq: seq)
                guard h.timestamp >= lastTime else {
                    throw RewindError.corruptRecord(seq: seq, why: "timestamp \(formatRFC3339(h.timestamp)) is before the previous record's")
                }
                guard h.offset <= volumeSize, h.length <= volumeSize - h.offset else {
                    throw RewindError.corruptRecord(seq: seq, why: "range \(h.offset)+\(h.length) lies outside the volume")
                }
                guard h.kind != .write || h.length <= Self.maxWriteBytes else {
                    throw RewindError.corruptRecord(seq: seq, why: "write of \(h.length) bytes exceeds the \(Self.maxWriteBytes)-byte limit")
                }
                let expectedStored = UInt64(Self.layout(kind: h.kind, offset: h.offset, length: h.length, blockSize: bs).stored.count) * bs
                guard UInt64(h.storedLength) == expectedStored, h.cumulative == cumulative + expectedStored else {
                    throw RewindError.corruptRecord(seq: seq, why: "stored length \(h.storedLength) does not match its \(h.kind.name) of \(h.length) bytes")
                }
                let payload = try journal.payload(seq: seq, header: h)
                if h.storedLength > 0 {
                    let sum = payload.withUnsafeBytes { payloadChecksum($0, blockSize: blockSize) }
                    guard sum == h.checksum else {
                        throw RewindError.corruptRecord(seq: seq, why: "payload checksum mismatch (stored \(hex(h.checksum)), computed \(hex(sum)))")
                    }
                }
                report.records += 1
                journal.touched(RecordHeader.size + 16 + Int(h.storedLength))
                report.payloadBytes += UInt64(h.storedLength)
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
            try verifyIndex(txn, meta: m, report: &report, progress: progress)
        }
        if let image {
            try compare(at: point ?? .latest, with: image, report: &report, progress: progress)
        }
        return report
    }

    private func verifyIndex(_ txn: LMDBTransaction, meta m: MirrorMeta, report: inout VerifyReport, progress: ProgressObserver?) throws {
        let cursor = try txn.cursor(journal.blocks)
        progress?.begin(phase: "verifying index", total: UInt64(try txn.count(journal.blocks)))
        var entry = try cursor.first()
        var scratch = [UInt8](repeating: 0, count: blockSize)
        let oldestEntry = m.target > m.horizon ? 0 : m.horizon + 1  // an unfinished compaction leaves older entries
        while let e = entry {
            guard let key = decodeBlockKey(e.key) else { throw RewindError.damagedMirror(path: path, why: "malformed index key") }
            guard key.seq >= oldestEntry, key.seq <= m.lastSeq, key.block < m.blockCount else {
                throw RewindError.corruptBlock(seq: key.seq, block: key.block, why: "index entry outside the journal")
            }
            if case let .data(segment, off, hash) = try BlockContent.decode(e.value, seq: key.seq, block: key.block) {
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
    }

    /// Compare the volume as of `point` with `image`, 1 MiB at a time.
    private func compare(at point: Point, with image: String, report: inout VerifyReport, progress: ProgressObserver?) throws {
        let file = try BlockFile(path: image, mode: .readOnly)
        let size = try file.size()
        guard size == volumeSize else {
            throw RewindError.mismatch(offset: min(size, volumeSize), why: "\(image) is \(size) bytes, the volume is \(volumeSize)")
        }
        let snapshot = try Snapshot(mirror: self, point: point)
        defer { snapshot.close() }
        report.comparedAt = snapshot.seq
        let chunk = 1 << 20
        var mine = [UInt8](repeating: 0, count: chunk), theirs = mine
        progress?.begin(phase: "comparing with \(image)", total: volumeSize)
        var at: UInt64 = 0
        while at < volumeSize {
            let n = Int(min(UInt64(chunk), volumeSize - at))
            try mine.withUnsafeMutableBytes { try snapshot.read(at: at, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n])) }
            try theirs.withUnsafeMutableBytes { try file.read(at: at, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n])) }
            if mine[0..<n] != theirs[0..<n] {
                let i = (0..<n).first { mine[$0] != theirs[$0] } ?? 0
                throw RewindError.mismatch(offset: at + UInt64(i),
                                           why: "the mirror at seq:\(snapshot.seq) has 0x\(String(mine[i], radix: 16)), \(image) has 0x\(String(theirs[i], radix: 16))")
            }
            at += UInt64(n)
            report.comparedBytes = at
            progress?.update(done: at)
        }
        progress?.end()
    }
}

func hex(_ v: UInt64) -> String { "0x" + String(v, radix: 16).leftPadded(16) }
