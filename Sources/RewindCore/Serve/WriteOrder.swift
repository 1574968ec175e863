import Synchronization

/// The order of a tap's write-nature requests: two that touch a common mirror block run one
/// after the other, in the order they arrived, so the upstream and the journal see them in
/// one order (and a partial block read back after a write holds that write, not a later one);
/// the others stay in flight together. Block-granular, not byte-granular, for that read-back.
///
/// `enter` runs `start` at once or once every earlier request sharing a block has `leave`n.
/// Requests in flight are bounded by the connections' budgets, so the linear scans stay short.
public final class WriteOrder: Sendable {
    private struct Entry {
        var id: UInt64
        var blocks: Range<UInt64>
        var start: (@Sendable (UInt64) -> Void)?  // nil once started
    }
    private let blockSize: UInt64
    private let state = Mutex((next: UInt64(0), entries: [Entry]()))

    public init(blockSize: Int) { self.blockSize = UInt64(blockSize) }

    private func blocks(_ range: Range<UInt64>) -> Range<UInt64> {
        range.lowerBound / blockSize..<(range.upperBound + blockSize - 1) / blockSize
    }

    /// Queue a request over `range`; `start` runs with the request's id (on this thread, or on
    /// the thread of the `leave` that frees it) when it may go. It must `leave` with that id.
    public func enter(_ range: Range<UInt64>, start: @escaping @Sendable (UInt64) -> Void) {
        let b = blocks(range)
        let (id, runNow) = state.withLock { s -> (UInt64, Bool) in
            s.next += 1
            let blocked = s.entries.contains { $0.blocks.overlaps(b) }
            s.entries.append(Entry(id: s.next, blocks: b, start: blocked ? start : nil))
            return (s.next, !blocked)
        }
        if runNow { start(id) }
    }

    /// The request `id` is done with the upstream and queued in the journal: start the
    /// waiting ones no earlier request blocks any more.
    public func leave(_ id: UInt64) {
        let ready = state.withLock { s -> [(UInt64, @Sendable (UInt64) -> Void)] in
            s.entries.removeAll { $0.id == id }
            var ready: [(UInt64, @Sendable (UInt64) -> Void)] = []
            for i in s.entries.indices {
                guard let start = s.entries[i].start else { continue }
                let b = s.entries[i].blocks
                if !s.entries[..<i].contains(where: { $0.blocks.overlaps(b) }) {
                    ready.append((s.entries[i].id, start))
                    s.entries[i].start = nil
                }
            }
            return ready
        }
        for (id, start) in ready { start(id) }
    }

    /// Requests entered and not yet left.
    public var count: Int { state.withLock { $0.entries.count } }
}
