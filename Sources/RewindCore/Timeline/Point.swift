import Foundation
import Glibc

/// A point in time as users name it (CLI.md): `seq:N`, `time:RFC3339`, `bookmark:NAME`,
/// `latest`, `oldest`.
public enum Point: Equatable, Sendable, CustomStringConvertible {
    case seq(UInt64)
    case time(UInt64, text: String)
    case bookmark(String)
    case latest
    case oldest
    /// The newest FLUSH point at or before the inner point (`--consistent`): the record of
    /// a FLUSH the host issued, so every write it completed before is in, as a crash-consistent
    /// file system expects.
    indirect case consistent(Point)

    /// This point, snapped back to a FLUSH point when `consistent`.
    public func consistent(_ yes: Bool) -> Point {
        if case .consistent = self { return self }
        return yes ? .consistent(self) : self
    }

    public init(parsing text: String) throws {
        if text == "latest" { self = .latest; return }
        if text == "oldest" { self = .oldest; return }
        if text.hasPrefix("seq:"), let n = UInt64(text.dropFirst(4)), n < UInt64.max { self = .seq(n); return }
        if text.hasPrefix("time:") {
            let t = String(text.dropFirst(5))
            guard let ns = parseRFC3339(t) else {
                throw RewindError.invalidArgument("invalid time in point \"\(text)\": expected RFC 3339, e.g. time:2026-11-25T14:00:00Z")
            }
            self = .time(ns, text: t); return
        }
        if text.hasPrefix("bookmark:") {
            self = .bookmark(try validateBookmarkName(String(text.dropFirst(9)))); return
        }
        throw RewindError.invalidArgument("invalid point \"\(text)\": use seq:N, time:RFC3339, bookmark:NAME, latest or oldest")
    }

    public var description: String {
        switch self {
        case let .seq(n): "seq:\(n)"
        case let .time(_, text): "time:\(text)"
        case let .bookmark(name): "bookmark:\(name)"
        case .latest: "latest"
        case .oldest: "oldest"
        case let .consistent(inner): "\(inner) --consistent"
        }
    }
}

/// Check a bookmark name and return it in Unicode NFC, the form it is stored and compared in:
/// "é" typed as one code point or as e + a combining accent names the same bookmark.
/// The limit is in characters as users see them; the stored key must also fit LMDB's 511 bytes.
@discardableResult
public func validateBookmarkName(_ name: String) throws -> String {
    let nfc = name.precomposedStringWithCanonicalMapping
    guard !nfc.isEmpty, nfc.count <= 255,
          nfc.allSatisfy({ $0.isLetter || $0.isNumber || "-_.:@".contains($0) }) else {
        throw RewindError.invalidArgument("invalid bookmark name \"\(name)\": use 1 to 255 letters, digits and - _ . : @")
    }
    guard nfc.utf8.count <= 511 else {
        throw RewindError.invalidArgument("invalid bookmark name \"\(name)\": \(nfc.utf8.count) bytes in UTF-8, at most 511")
    }
    return nfc
}

extension Mirror {
    /// The seq a point names, checked against the restorable window [oldest, latest].
    public func resolve(_ point: Point) throws -> UInt64 {
        try journal.env.read { txn in try resolve(point, txn) }
    }

    func resolve(_ point: Point, _ txn: LMDBTransaction) throws -> UInt64 {
        let meta = try journal.readMeta(txn)
        let oldest = meta.oldestPoint
        let seq: UInt64
        switch point {
        case .latest: return meta.lastSeq
        case .oldest: return oldest
        case let .seq(n): seq = n
        case let .bookmark(name):
            guard let n = try journal.bookmark(txn, name) else {
                // A damaged key hides a bookmark from its name: say so rather than "no bookmark".
                _ = try journal.allBookmarks(txn)
                throw RewindError.noSuchBookmark(name)
            }
            seq = n
        case let .time(ns, text):
            seq = try seqAtTime(ns, text: text, meta: meta, txn)
        case let .consistent(inner):
            return try flushPoint(atOrBefore: try resolve(inner, txn), given: point, meta: meta, txn)
        }
        if seq < oldest { throw RewindError.pointBeforeHorizon(point: point.description, horizon: oldest) }
        if seq > meta.lastSeq { throw RewindError.pointAfterLatest(point: point.description, latest: meta.lastSeq) }
        if seq > oldest, try txn.get(journal.records, seqKey(seq)) == nil,
           let (after, h) = try journal.record(txn, atOrAfter: seq), h.kind == .catchUp {
            throw RewindError.invalidArgument("\(point) is not a point on this replica: a catch-up brought it from seq:\(h.offset) to seq:\(after) at once (use either)")
        }
        return seq
    }

    /// The newest FLUSH record at or before `seq` (seq:0, a fresh mirror's empty base, counts).
    private func flushPoint(atOrBefore seq: UInt64, given: Point, meta: MirrorMeta, _ txn: LMDBTransaction) throws -> UInt64 {
        var s = seq
        while s > meta.oldestPoint {
            // Seqs a catch-up skipped are not points: step over them.
            guard let (found, h) = try journal.record(txn, atOrBefore: s), found > meta.oldestPoint else { s = meta.oldestPoint; break }
            if h.kind == .flush { return found }
            s = found - 1
        }
        if s == 0 { return 0 }
        throw RewindError.invalidArgument("no FLUSH point at or before \(given): none in seq:\(meta.oldestPoint + 1)...seq:\(seq), and the oldest point seq:\(meta.oldestPoint) is not known to be one")
    }

    /// The newest record at or before `ns`, by binary search (timestamps never decrease).
    private func seqAtTime(_ ns: UInt64, text: String, meta: MirrorMeta, _ txn: LMDBTransaction) throws -> UInt64 {
        let oldest = meta.oldestPoint
        let oldestTime = oldest == meta.horizon ? meta.horizonTime : try journal.header(txn, seq: oldest).timestamp
        guard ns >= oldestTime else {
            throw RewindError.noRecordAtTime(text, oldest: "seq:\(oldest) at \(formatRFC3339(oldestTime))")
        }
        var lo = oldest, hi = meta.lastSeq  // invariant: time(lo) <= ns
        while lo < hi {
            let mid = lo + (hi - lo + 1) / 2
            // A seq a catch-up skipped has the catch-up's time, so `lo` always ends on a record.
            let t = try journal.record(txn, atOrAfter: mid)?.header.timestamp ?? journal.header(txn, seq: mid).timestamp
            if t <= ns { lo = mid } else { hi = mid - 1 }
        }
        return lo
    }
}

/// Parse RFC 3339 (`2026-11-25T14:00:00Z`, `…T14:00:00.123456789+01:00`) to ns since 1970.
public func parseRFC3339(_ s: String) -> UInt64? {
    let c = Array(s.utf8)
    func num(_ a: Int, _ n: Int) -> Int? {
        guard a + n <= c.count else { return nil }
        var v = 0
        for i in a..<a + n { guard c[i] >= 48 && c[i] <= 57 else { return nil }; v = v * 10 + Int(c[i] - 48) }
        return v
    }
    guard c.count >= 20, let year = num(0, 4), c[4] == 45, let month = num(5, 2), c[7] == 45, let day = num(8, 2),
          c[10] == 84 || c[10] == 116 || c[10] == 32, let hour = num(11, 2), c[13] == 58, let minute = num(14, 2),
          c[16] == 58, let second = num(17, 2),
          (1...12).contains(month), (1...31).contains(day), hour < 24, minute < 60, second < 61 else { return nil }
    var i = 19
    var nanos = 0
    if i < c.count && c[i] == 46 {
        i += 1
        var digits = 0
        while i < c.count, c[i] >= 48, c[i] <= 57 {
            if digits < 9 { nanos = nanos * 10 + Int(c[i] - 48) }
            digits += 1; i += 1
        }
        guard digits > 0 else { return nil }
        for _ in digits..<max(digits, 9) { nanos *= 10 }
    }
    guard i < c.count else { return nil }
    var offsetSeconds = 0
    if c[i] == 90 || c[i] == 122 {
        i += 1
    } else if c[i] == 43 || c[i] == 45, let oh = num(i + 1, 2), i + 3 < c.count, c[i + 3] == 58, let om = num(i + 4, 2) {
        offsetSeconds = (oh * 3600 + om * 60) * (c[i] == 43 ? 1 : -1)
        i += 6
    } else { return nil }
    guard i == c.count else { return nil }
    var t = tm()
    t.tm_year = Int32(year - 1900); t.tm_mon = Int32(month - 1); t.tm_mday = Int32(day)
    t.tm_hour = Int32(hour); t.tm_min = Int32(minute); t.tm_sec = Int32(second)
    let secs = timegm(&t) - offsetSeconds
    guard secs >= 0 else { return nil }
    return UInt64(secs) * 1_000_000_000 + UInt64(nanos)
}

/// Format ns since 1970 as RFC 3339 UTC with nanoseconds: `2026-11-25T14:00:00.000000001Z`.
public func formatRFC3339(_ ns: UInt64) -> String {
    var secs = time_t(ns / 1_000_000_000)
    var t = tm()
    gmtime_r(&secs, &t)
    func p(_ v: Int32, _ w: Int) -> String { String(v).leftPadded(w) }
    return "\(p(t.tm_year + 1900, 4))-\(p(t.tm_mon + 1, 2))-\(p(t.tm_mday, 2))T\(p(t.tm_hour, 2)):\(p(t.tm_min, 2)):\(p(t.tm_sec, 2)).\(String(ns % 1_000_000_000).leftPadded(9))Z"
}
