import Glibc
import Synchronization

/// Readahead for sequential reads of journal payloads through LMDB's map.
///
/// The map is `MADV_RANDOM` (LMDB's `MDB_NORDAHEAD`, right for index pages), so a payload not
/// in the page cache is read one page per fault: 60 MB/s for a restore right after `serve`
/// dropped its payloads from the cache. When a read continues exactly where the previous one
/// in the same segment ended, the next `window` bytes are asked for with `MADV_WILLNEED`,
/// so restore, verify and compaction walking a sequentially written journal read at disk
/// speed. Random point reads never trigger it.
final class Readahead: Sendable {
    static let window = 2 << 20
    private struct State {
        var segment = UInt64.max
        var next = 0
        var prefetchedTo = 0
    }
    private let state = Mutex(State())

    /// `range` of `segmentBytes` (segment `id`, in the map) is about to be read.
    func willRead(segment id: UInt64, _ segmentBytes: UnsafeRawBufferPointer, _ range: Range<Int>) {
        guard let base = segmentBytes.baseAddress else { return }
        let advise: Range<Int>? = state.withLock { s in
            defer { s.next = range.upperBound }
            guard s.segment == id && range.lowerBound == s.next else {
                s.segment = id
                s.prefetchedTo = range.upperBound
                return nil
            }
            guard range.upperBound + Self.window / 2 > s.prefetchedTo, s.prefetchedTo < segmentBytes.count else { return nil }
            let from = max(s.prefetchedTo, range.lowerBound)
            let to = min(segmentBytes.count, from + Self.window)
            s.prefetchedTo = to
            return from..<to
        }
        guard let advise, !advise.isEmpty else { return }
        let start = Int(bitPattern: base) + advise.lowerBound
        let aligned = start / LMDBEnvironment.osPageSize * LMDBEnvironment.osPageSize
        _ = madvise(UnsafeMutableRawPointer(bitPattern: aligned), start - aligned + advise.count, MADV_WILLNEED)
    }
}
