/// Bringing a mirror into step with a volume that changed without it: the blocks where the
/// latest point differs from `source` are journalled, as whole-block writes, so the mirror's
/// latest point equals the volume again and every earlier point stays as it was. `rewind tap`
/// runs it before serving, after a stop that may have left upstream writes unjournalled.
public struct ReconcileReport: Sendable, Equatable {
    /// The point compared (the latest before the new records).
    public var comparedAt: UInt64 = 0
    public var comparedBytes: UInt64 = 0
    /// Blocks that differed, and the records that now hold them (nil: none were needed).
    public var differingBlocks: UInt64 = 0
    public var records: ClosedRange<UInt64>?
}

extension Mirror {
    /// `source` is as large as the volume, or the comparison cannot start.
    func checkSameSize(as source: any VolumeSource) throws {
        let size = try source.size()
        guard size == volumeSize else {
            throw RewindError.mismatch(offset: min(size, volumeSize), why: "\(source.name) is \(size) bytes, the volume is \(volumeSize)")
        }
    }

    /// The volume as `snapshot` reads it beside `source`'s bytes, 1 MiB at a time from the
    /// start: `body(offset, mine, theirs)` (shared by `verify --against` and `reconcile`).
    func forEachChunk(of snapshot: Snapshot, beside source: any VolumeSource,
                      _ body: (UInt64, ArraySlice<UInt8>, ArraySlice<UInt8>) throws -> Void) throws {
        let chunk = 1 << 20
        var mine = [UInt8](repeating: 0, count: chunk), theirs = mine
        var at: UInt64 = 0
        while at < volumeSize {
            let n = Int(min(UInt64(chunk), volumeSize - at))
            try mine.withUnsafeMutableBytes { try snapshot.read(at: at, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n])) }
            try theirs.withUnsafeMutableBytes { try source.read(at: at, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n])) }
            try body(at, mine[0..<n], theirs[0..<n])
            at += UInt64(n)
        }
    }

    /// Runs of differing blocks are joined into writes of at most this many bytes.
    static let reconcileWriteBytes = 4 << 20
    /// Differences are appended once this much is pending.
    static let reconcileBatchBytes = 64 << 20

    /// Compare the latest point with `source` block by block and journal what differs.
    /// The caller owns the mirror (`owner.lock`) and nothing else appends meanwhile.
    public func reconcile(with source: any VolumeSource, progress: ProgressObserver? = nil) throws -> ReconcileReport {
        try checkSameSize(as: source)
        var report = ReconcileReport()
        let bs = blockSize
        // Differing blocks, joined into writes of consecutive blocks, appended every
        // `reconcileBatchBytes` (bounded memory whatever the difference). The open snapshot
        // reads at its own seq, so records appended meanwhile do not change what it compares.
        var pending: [Change] = [], pendingBytes = 0
        var run: (offset: UInt64, bytes: [UInt8])?
        func endRun() {
            guard let r = run else { return }
            pending.append(.write(r.offset, r.bytes))
            pendingBytes += r.bytes.count
            run = nil
        }
        func appendPending() throws {
            guard !pending.isEmpty else { return }
            let seqs = try append(pending)
            report.records = (report.records?.lowerBound ?? seqs.lowerBound)...seqs.upperBound
            (pending, pendingBytes) = ([], 0)
        }
        let snapshot = try Snapshot(mirror: self, point: .latest)
        defer { snapshot.close() }
        report.comparedAt = snapshot.seq
        progress?.begin(phase: "comparing with \(source.name)", total: volumeSize)
        try forEachChunk(of: snapshot, beside: source) { at, mine, theirs in
            if mine != theirs {
                for b in stride(from: 0, to: mine.count, by: bs) where mine[mine.startIndex + b..<mine.startIndex + b + bs] != theirs[theirs.startIndex + b..<theirs.startIndex + b + bs] {
                    let offset = at + UInt64(b)
                    let block = theirs[theirs.startIndex + b..<theirs.startIndex + b + bs]
                    report.differingBlocks += 1
                    if let r = run, r.offset + UInt64(r.bytes.count) == offset, r.bytes.count < Self.reconcileWriteBytes {
                        run?.bytes += block
                    } else {
                        endRun()
                        run = (offset, Array(block))
                    }
                }
            }
            if pendingBytes >= Self.reconcileBatchBytes { try appendPending() }
            report.comparedBytes = at + UInt64(mine.count)
            progress?.update(done: report.comparedBytes)
        }
        endRun()
        try appendPending()
        progress?.end()
        return report
    }
}
