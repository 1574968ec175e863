import CLinux
import Glibc

/// A payload log file that is missing or shorter than the journal needs: the live stream
/// runs from the first record after the oldest point to `logEnd`, without gaps, across
/// 256 MiB files (`PayloadLog`), so every file in between must exist and reach its share.
public struct LogGap: Sendable, Equatable, CustomStringConvertible, Codable {
    /// The file, relative to the mirror (`log/0000000000000001.log`).
    public let file: String
    /// Its size now (nil: missing), and the size the journal needs.
    public let bytes: UInt64?
    public let neededBytes: UInt64
    /// Where a hole starts inside the needed part (a file cut short, then written past the
    /// cut by a server started with --accept-damage); nil when the file is short or missing.
    public var holeAt: UInt64? = nil
    /// The first record whose payload lay in the missing part.
    public let firstSeq: UInt64

    public var description: String {
        let what = holeAt.map { "has a hole at byte \($0) (its payload was lost)" }
            ?? bytes.map { "is \($0) bytes, the journal needs \(neededBytes)" } ?? "is missing"
        return "\(file) \(what): the payload of seq:\(firstSeq) and later records in it is gone"
    }
}

extension Mirror {
    /// Every gap in the live part of the payload log: a cheap check (one `stat` per file and a
    /// binary search per gap), run by `status` and before `serve` appends to the log.
    public func logGaps() throws -> [LogGap] {
        try journal.env.read { txn in
            var m = try journal.readMeta(txn)
            // An unfinished rollback may have deleted the records after its target already: the
            // live stream ends with the target's record then.
            if m.pendingRollback != MirrorMeta.none && m.pendingRollback < m.lastSeq {
                guard m.pendingRollback > m.oldestPoint else { return [] }
                let last = try journal.header(txn, seq: m.pendingRollback)
                m.lastSeq = m.pendingRollback
                m.logEnd = last.payloadEnd
            }
            guard m.lastSeq > m.oldestPoint else { return [] }
            guard let first = try journal.record(txn, atOrAfter: m.oldestPoint + 1) else { return [] }
            let start = first.header.segment - UInt64(LogChunk.headerSize)
            let end = m.logEnd
            guard end > start else { return [] }
            let size = PayloadLog.fileBytes
            var gaps: [LogGap] = []
            for i in start / size...(end - 1) / size {
                let fileStart = i * size
                let needed = min(size, end - fileStart)
                var st = stat()
                let path = journal.log.path(ofFile: i)
                let have: UInt64? = stat(path, &st) == 0 ? UInt64(st.st_size) : nil
                let name = "log/" + String(path.split(separator: "/").last ?? "")
                if let have, have >= needed {
                    // Whole in size; a hole inside the live part is payload that was lost.
                    let from = start > fileStart ? start - fileStart : 0
                    guard let hole = Self.firstHole(path, from: from, before: needed) else { continue }
                    gaps.append(LogGap(file: name, bytes: have, neededBytes: needed, holeAt: hole,
                                       firstSeq: try firstRecord(endingAfter: fileStart + hole, txn, meta: m)))
                    continue
                }
                let lost = max(start, fileStart + (have ?? 0))
                gaps.append(LogGap(file: name, bytes: have, neededBytes: needed, firstSeq: try firstRecord(endingAfter: lost, txn, meta: m)))
            }
            return gaps
        }
    }

    /// The first hole at or after `from` and before `end` in the file (`SEEK_HOLE`), or nil.
    private static func firstHole(_ path: String, from: UInt64, before end: UInt64) -> UInt64? {
        let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        let hole = rewind_seek_hole(fd, off_t(from))
        return hole >= 0 && UInt64(hole) < end ? UInt64(hole) : nil
    }

    /// The first record whose chunk ends after log position `position` (binary search: chunk
    /// positions grow with seq).
    private func firstRecord(endingAfter position: UInt64, _ txn: LMDBTransaction, meta m: MirrorMeta) throws -> UInt64 {
        var lo = m.oldestPoint + 1, hi = m.lastSeq
        while lo < hi {
            let mid = lo + (hi - lo) / 2
            // A catch-up's gap reads as the catch-up (chunk positions still grow with seq).
            let h = try journal.record(txn, atOrAfter: mid)?.header ?? journal.header(txn, seq: mid)
            if h.payloadEnd <= position { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }
}
