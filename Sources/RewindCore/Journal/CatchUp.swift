import Glibc

/// A run of blocks a catch-up sets: to the data that follows in its payload, or to zeros.
public struct CatchUpRun: Sendable, Equatable {
    public var blocks: Range<UInt64>
    public var zero: Bool

    public init(_ blocks: Range<UInt64>, zero: Bool = false) {
        self.blocks = blocks
        self.zero = zero
    }
}

/// A replica's consistent catch-up (K9): one record at seq s that brings the volume from the
/// replica's newest point d straight to the origin's point s, when the records between were
/// folded on the origin before the replica got them. The replica holds no record for the seqs
/// d + 1 ..< s: they are not points on it (`Mirror.resolve` says so), and the catch-up is the
/// only record that may follow such a gap (`expectedTally`, `verify`).
///
/// The record: kind 5 (`catchUp`); `offset` holds d, the seq it follows; `length` the blocks
/// it sets. Its payload is the run list — u64 count, then per run u64 first block and u64
/// block count with bit 63 set for a run of zeros — padded with zeros to whole blocks, then the
/// blocks of the data runs in order. Its checksum covers all of it, as any record's does.
///
/// It is written in one chunk of its own and indexed in one LMDB transaction, after the chunk
/// is synced, before anyone is told (`CatchUpWriter`): readers see d or s, never a mix. Log
/// replay never indexes a catch-up: one found unindexed after a crash is cut with the log's
/// tail, and the replica is back at d.
public enum CatchUp {
    static let zeroFlag: UInt64 = 1 << 63

    /// The run list's bytes, padded to whole blocks.
    public static func encodeRuns(_ runs: [CatchUpRun], blockSize: Int) -> [UInt8] {
        var b = [UInt8]()
        b.reserveCapacity(listBlocks(runs: runs.count, blockSize: blockSize) * blockSize)
        b.appendLE(UInt64(runs.count))
        for r in runs {
            b.appendLE(r.blocks.lowerBound)
            b.appendLE(UInt64(r.blocks.count) | (r.zero ? zeroFlag : 0))
        }
        b += [UInt8](repeating: 0, count: listBlocks(runs: runs.count, blockSize: blockSize) * blockSize - b.count)
        return b
    }

    /// Blocks the run list of `runs` runs occupies.
    public static func listBlocks(runs: Int, blockSize: Int) -> Int {
        (8 + 16 * runs + blockSize - 1) / blockSize
    }

    /// Check runs: non-empty, ascending, not overlapping, inside a volume of `volumeBlocks`.
    static func check(_ runs: [CatchUpRun], volumeBlocks: UInt64) throws {
        var end: UInt64 = 0
        for (i, r) in runs.enumerated() {
            guard !r.blocks.isEmpty, r.blocks.lowerBound >= end || i == 0, r.blocks.upperBound <= volumeBlocks else {
                throw RewindError.invalidArgument("catch-up run \(i) (blocks \(r.blocks.lowerBound)..<\(r.blocks.upperBound)) is empty, out of order or past the volume's \(volumeBlocks) blocks")
            }
            end = r.blocks.upperBound
        }
    }

    /// Decode the run list at the start of a catch-up's payload (`seq` names it in errors).
    static func decodeRuns(_ payload: UnsafeRawBufferPointer, seq: UInt64, volumeBlocks: UInt64) throws -> [CatchUpRun] {
        guard payload.count >= 8 else { throw RewindError.corruptRecord(seq: seq, why: "its catch-up run list is missing") }
        let count = payload.loadLE(at: 0, as: UInt64.self)
        guard count <= UInt64((payload.count - 8) / 16) else {
            throw RewindError.corruptRecord(seq: seq, why: "its catch-up run list claims \(count) runs in \(payload.count) bytes")
        }
        var runs: [CatchUpRun] = []
        runs.reserveCapacity(Int(count))
        for i in 0..<Int(count) {
            let first = payload.loadLE(at: 8 + 16 * i, as: UInt64.self), raw = payload.loadLE(at: 16 + 16 * i, as: UInt64.self)
            let n = raw & ~zeroFlag
            guard n > 0, first < volumeBlocks, n <= volumeBlocks - first else {
                throw RewindError.corruptRecord(seq: seq, why: "its catch-up run \(i) lies outside the volume")
            }
            runs.append(CatchUpRun(first..<first + n, zero: raw & zeroFlag != 0))
        }
        do { try check(runs, volumeBlocks: volumeBlocks) } catch {
            throw RewindError.corruptRecord(seq: seq, why: "its catch-up runs are out of order")
        }
        return runs
    }

    /// `runs` in at most `maxRuns` runs: where there are more, the runs with the smallest gaps
    /// between them are joined into runs of data (the gap's blocks and any zero run included
    /// are sent as data). Only for blocks outside `runs` that the receiver already holds as
    /// of the catch-up's point: a dirty set's complement.
    public static func coalesce(_ runs: [CatchUpRun], maxRuns: Int) -> [CatchUpRun] {
        guard runs.count > maxRuns, maxRuns > 0 else { return runs }
        // The smallest gap g for which joining every gap ≤ g leaves at most maxRuns runs.
        var gaps = zip(runs, runs.dropFirst()).map { $1.blocks.lowerBound - $0.blocks.upperBound }
        gaps.sort()
        let limit = gaps[runs.count - maxRuns - 1]
        var out: [CatchUpRun] = []
        out.reserveCapacity(maxRuns)
        for run in runs {
            if let last = out.last, run.blocks.lowerBound - last.blocks.upperBound <= limit {
                let zero = last.zero && run.zero && run.blocks.lowerBound == last.blocks.upperBound
                out[out.count - 1] = CatchUpRun(last.blocks.lowerBound..<run.blocks.upperBound, zero: zero)
            } else {
                out.append(run)
            }
        }
        return out
    }

    static func dataBlocks(_ runs: [CatchUpRun]) -> UInt64 { runs.reduce(0) { $0 + ($1.zero ? 0 : UInt64($1.blocks.count)) } }
    static func allBlocks(_ runs: [CatchUpRun]) -> UInt64 { runs.reduce(0) { $0 + UInt64($1.blocks.count) } }
}

extension Mirror {
    /// A catch-up's runs, read from its payload in the log (checked against the record).
    func catchUpRuns(_ h: RecordHeader, seq: UInt64) throws -> [CatchUpRun] {
        let bs = blockSize
        var first = [UInt8](repeating: 0, count: bs)
        try first.withUnsafeMutableBytes { try journal.readPayload(at: h.payloadPosition, into: $0, seq: seq) }
        let count = first.withUnsafeBytes { $0.loadLE(at: 0, as: UInt64.self) }
        guard count <= h.storedBytes / 16 else {
            throw RewindError.corruptRecord(seq: seq, why: "its catch-up run list claims \(count) runs")
        }
        let listBytes = CatchUp.listBlocks(runs: Int(count), blockSize: bs) * bs
        guard UInt64(listBytes) <= h.storedBytes else { throw RewindError.corruptRecord(seq: seq, why: "its catch-up run list is longer than its payload") }
        var list = [UInt8](repeating: 0, count: listBytes)
        try list.withUnsafeMutableBytes { try journal.readPayload(at: h.payloadPosition, into: $0, seq: seq) }
        let runs = try list.withUnsafeBytes { try CatchUp.decodeRuns($0, seq: seq, volumeBlocks: volumeSize / UInt64(bs)) }
        guard CatchUp.allBlocks(runs) == h.length,
              (UInt64(CatchUp.listBlocks(runs: runs.count, blockSize: bs)) + CatchUp.dataBlocks(runs)) * UInt64(bs) == h.storedBytes else {
            throw RewindError.corruptRecord(seq: seq, why: "its catch-up runs do not add up to its \(h.length) blocks and \(h.storedBytes) stored bytes")
        }
        return runs
    }
}

/// Writes one catch-up (`CatchUp`) to a mirror: the data blocks in run order as they come
/// (straight into the log, never all in memory), then the run list, the record and its chunk's
/// header; syncs the log; then indexes it in one LMDB transaction and syncs that. Until
/// `finish` returns the mirror reads as before and a power cut leaves it so (or at the
/// catch-up, once its commit is on the disk); after, it is durable; `abandon` leaves it as
/// before. Memory: 8 bytes per block (their hashes, for the index). The caller owns the mirror's
/// writing (owner.lock, no other writer).
public final class CatchUpWriter {
    public let mirror: Mirror
    public let from: UInt64
    public let seq: UInt64
    public let timestamp: UInt64
    public let runs: [CatchUpRun]
    private let start: UInt64
    private let meta: MirrorMeta
    private let listBytes: Int
    private let dataBlocks: UInt64
    private var written: UInt64 = 0
    private var hashes: [UInt64] = []
    private var finished = false

    public init(mirror: Mirror, from: UInt64, seq: UInt64, timestamp: UInt64, runs: [CatchUpRun]) throws {
        self.mirror = mirror
        self.from = from
        self.seq = seq
        self.timestamp = timestamp
        self.runs = runs
        let m = try mirror.meta()
        guard m.pendingRollback == MirrorMeta.none else { throw RewindError.interruptedRollback(target: m.pendingRollback) }
        guard from == m.lastSeq else {
            throw RewindError.invalidArgument("a catch-up from seq:\(from) for a mirror whose newest record is seq:\(m.lastSeq)")
        }
        guard seq > from else { throw RewindError.invalidArgument("a catch-up to seq:\(seq) from seq:\(from)") }
        guard timestamp >= m.lastTime else {
            throw RewindError.invalidArgument("a catch-up's time \(formatRFC3339(timestamp)) is before the record it follows")
        }
        try CatchUp.check(runs, volumeBlocks: mirror.volumeSize / UInt64(mirror.blockSize))
        listBytes = CatchUp.listBlocks(runs: runs.count, blockSize: mirror.blockSize) * mirror.blockSize
        dataBlocks = CatchUp.dataBlocks(runs)
        meta = m
        start = m.logEnd
        hashes.reserveCapacity(Int(dataBlocks) + listBytes / mirror.blockSize)
    }

    private var payloadStart: UInt64 { start + UInt64(LogChunk.headerSize) }

    /// Blocks of data still expected.
    public var remaining: UInt64 { dataBlocks - written }

    /// The next data blocks, in run order (whole blocks).
    public func write(_ bytes: UnsafeRawBufferPointer) throws {
        let bs = mirror.blockSize
        guard bytes.count % bs == 0, UInt64(bytes.count / bs) <= remaining else {
            throw RewindError.invalidArgument("catch-up data of \(bytes.count) bytes where \(remaining) blocks of \(bs) bytes remain")
        }
        try mirror.journal.log.write(bytes, at: payloadStart + UInt64(listBytes) + written * UInt64(bs))
        hashes += blockHashes(bytes, blockSize: bs)
        written += UInt64(bytes.count / bs)
    }

    /// Write the run list, the record and the chunk header; sync; index. Returns the record's
    /// checksum. `checksum`: the sender's, to compare.
    @discardableResult
    public func finish(checksum expected: UInt64? = nil) throws -> UInt64 {
        guard remaining == 0 else { throw RewindError.invalidArgument("a catch-up finished with \(remaining) blocks of data missing") }
        let bs = mirror.blockSize
        let list = CatchUp.encodeRuns(runs, blockSize: bs)
        let all = list.withUnsafeBytes { blockHashes($0, blockSize: bs) } + hashes
        let checksum = payloadChecksum(blockHashes: all)
        if let expected, expected != checksum {
            throw RewindError.invalidArgument("the catch-up's checksum is \(String(checksum, radix: 16)), the sender's \(String(expected, radix: 16)): damaged on the way")
        }
        let stored = UInt64(list.count) + written * UInt64(bs)
        let header = RecordHeader.catchUp(timestamp: timestamp, from: from, blocks: CatchUp.allBlocks(runs), checksum: checksum,
                                          position: payloadStart, stored: stored, cumulative: meta.lastCumulative + stored)
        let log = mirror.journal.log
        try list.withUnsafeBytes { try log.write($0, at: payloadStart) }
        let headerBytes = header.encoded(seq: seq)
        try headerBytes.withUnsafeBytes { try log.write($0, at: payloadStart + stored) }
        let chunk = LogChunk(generation: meta.generation, firstSeq: seq, count: 1, payloadBytes: stored, recordsCheck: xxh3(headerBytes))
        try chunk.encodedHeader().withUnsafeBytes { try log.write($0, at: start) }
        try log.sync()
        CrashPoint.hit("catchup.log-synced")
        let journal = mirror.journal
        do {
            try journal.env.write { txn in
                var m = try journal.readMeta(txn)
                guard m.lastSeq == from, m.logEnd == start else {
                    throw RewindError.invalidArgument("the mirror changed while a catch-up was written")
                }
                let cursor = try txn.cursor(journal.blocks)
                try mirror.index(header, seq: seq, blockHashes: all, txn, cursor, catchUp: runs)
                m.lastSeq = seq
                m.lastTime = timestamp
                m.lastCumulative = header.cumulative
                m.logEnd = start + chunk.totalBytes
                try journal.writeMeta(txn, m)
            }
            finished = true  // committed: its payload stays in the log whatever follows
            // A commit's meta page waits for the next one (MDB_NOMETASYNC), and replay never
            // brings a catch-up back: synced here, before the sender is told and drops what
            // it kept for the peer.
            try journal.env.sync()
        } catch let e as LMDBError {
            throw RewindError.journal(e)
        }
        mirror.indexCommitted?()
        return checksum
    }

    /// Give up: cut what was written from the log. The mirror reads as before.
    public func abandon() {
        guard !finished else { return }
        try? mirror.journal.log.truncate(at: start)
        finished = true
    }
}

extension Snapshot {
    /// The runs of a catch-up that sets `blocks` to their content at this point: a run of
    /// zeros where the point reads zeros without data behind it (a zero entry, or a hole in
    /// base.img), data elsewhere. Blocks are looked up one by one, in order.
    public func catchUpRuns(for blocks: DirtySet) throws -> [CatchUpRun] {
        let bs = UInt64(mirror.blockSize)
        let extents = try mirror.base.dataExtents(size: mirror.volumeSize)
        var e = 0
        func inBaseData(_ block: UInt64) -> Bool {
            while e < extents.count && extents[e].upperBound <= block * bs { e += 1 }
            return e < extents.count && extents[e].lowerBound < (block + 1) * bs
        }
        var runs: [CatchUpRun] = []
        try blocks.forEachRun { range in
            for block in range {
                let zero: Bool
                switch try content(ofBlock: block) {
                case .some((_, .zero)): zero = true
                case .some((_, .data)): zero = false
                case nil: zero = !inBaseData(block)
                }
                if let last = runs.last, last.zero == zero, last.blocks.upperBound == block {
                    runs[runs.count - 1].blocks = last.blocks.lowerBound..<block + 1
                } else {
                    runs.append(CatchUpRun(block..<block + 1, zero: zero))
                }
            }
        }
        return runs
    }

    /// The content of `runs`' data blocks at this point, in order, in pieces of at most
    /// `maxBytes` (whole blocks).
    public func forEachCatchUpData(_ runs: [CatchUpRun], maxBytes: Int = 1 << 20,
                                   _ body: (UnsafeRawBufferPointer) throws -> Void) throws {
        let bs = mirror.blockSize
        let per = max(1, maxBytes / bs)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: per * bs, alignment: 4096)
        defer { buffer.deallocate() }
        for run in runs where !run.zero {
            var at = run.blocks.lowerBound
            while at < run.blocks.upperBound {
                let n = Int(min(UInt64(per), run.blocks.upperBound - at))
                let piece = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n * bs])
                try read(at: at * UInt64(bs), into: piece)
                try body(UnsafeRawBufferPointer(piece))
                at += UInt64(n)
            }
        }
    }
}
