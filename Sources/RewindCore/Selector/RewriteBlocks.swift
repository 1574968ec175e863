extension Mirror {
    /// Write into `file` the content as of `point` of every block that has a record after
    /// seq `after` — and only those. Used by rollback (revert a source to k: after = k,
    /// point = k) and by serve's start-up replay (bring a source up to the journal: after =
    /// the seq the source is known synced to, point = latest). Does not fsync.
    @discardableResult
    /// `checkThroughLatest`: the entries after `point`, which say which blocks to write, are
    /// held to their records too (a rollback's first run; a resumed one may have cut some).
    public func rewriteBlocks(changedAfter after: UInt64, asOf point: Point, into file: BlockFile,
                              checkThroughLatest: Bool = false, progress: ProgressObserver? = nil) throws -> UInt64 {
        let snapshot = try Snapshot(mirror: self, point: point)
        defer { snapshot.close() }
        // What is written here goes into a live source, which cannot be put back: the index
        // is held to its records (`Snapshot.checkIndex`) before the first write.
        try snapshot.checkIndex(throughLatest: checkThroughLatest)
        let bs = UInt64(blockSize)
        var buffer = [UInt8](repeating: 0, count: blockSize)
        var rewritten: UInt64 = 0
        let total = try journal.env.read { try $0.count(journal.blocks) }
        progress?.begin(phase: "rewriting changed blocks", total: UInt64(total))
        let scan = try snapshot.txn.cursor(journal.blocks)
        var entry = try scan.first()
        var scanned: UInt64 = 0
        var block: UInt64?
        var changed = false
        func emit() throws {
            guard let b = block, changed else { return }
            try buffer.withUnsafeMutableBytes { try snapshot.read(at: b * bs, into: $0) }
            try file.write(at: b * bs, buffer)
            rewritten += 1
        }
        while let e = entry, let key = decodeBlockKey(e.key) {
            if key.block != block { try emit(); block = key.block; changed = false }
            if key.seq > after { changed = true }
            scanned += 1
            if scanned % 4096 == 0 { progress?.update(done: scanned) }
            journal.touched(40 + blockSize)
            entry = try scan.next()
        }
        try emit()
        progress?.end()
        return rewritten
    }

    /// Record that the served source is fsynced up to `seq` (no records to replay before it).
    public func markSourceSynced(_ seq: UInt64) throws {
        try journal.env.write { txn in
            var m = try journal.readMeta(txn)
            m.sourceSyncedSeq = min(seq, m.lastSeq)
            try journal.writeMeta(txn, m)
        }
        try sync()
    }
}

extension Mirror {
    /// What a start of `serve` after an unclean stop did to bring its source up to the journal.
    public struct SourceCatchUp: Sendable, Equatable {
        /// The records replayed: those after the source's last sync.
        public var seqs: ClosedRange<UInt64>
        public var rewrite: Rewrite
    }

    /// Before a source is served: if the last server stopped uncleanly (the source is known
    /// synced only through an earlier seq than the journal's last), rewrite into `source` the
    /// blocks of the records after that seq (`rewriteBlocks(ofRecordsAfter:)`), fsync it and
    /// record it synced. nil when nothing was owed.
    public func bringSourceUpToDate(_ source: BlockFile, progress: ProgressObserver? = nil) throws -> SourceCatchUp? {
        let m = try meta()
        guard m.sourceSyncedSeq < m.lastSeq else { return nil }
        let done = try rewriteBlocks(ofRecordsAfter: m.sourceSyncedSeq, into: source, progress: progress)
        try source.sync()
        try markSourceSynced(m.lastSeq)
        return SourceCatchUp(seqs: m.sourceSyncedSeq + 1...m.lastSeq, rewrite: done)
    }

    /// What `rewriteBlocks(ofRecordsAfter:)` did.
    public struct Rewrite: Sendable, Equatable {
        /// Records after the source's last sync that were read.
        public var records: UInt64
        /// Blocks written into the source.
        public var blocks: UInt64
        /// Every block was written: records the rewrite needed were already folded into the base.
        public var wholeVolume: Bool
    }

    /// Bring `file` — the served source, after an unclean stop — up to the journal's latest
    /// point: write the latest content of every block that a record after `after` (the seq
    /// the source is known fdatasynced through) touched, and only those. Reads those records'
    /// headers and index entries, not the whole index: the cost is what the crash could have
    /// left undone, whatever the history's length. Does not fsync.
    ///
    /// Before the first write, each of those records' index entries is looked up and held to
    /// the tally the record stored (`IndexTally`): an entry lost or changed by damage stops the
    /// rewrite, as it would stop a restore. Records folded into the base already (a mirror
    /// compacted past `after`) name no blocks any more: then every block is written.
    public func rewriteBlocks(ofRecordsAfter after: UInt64, into file: BlockFile,
                              progress: ProgressObserver? = nil) throws -> Rewrite {
        let snapshot = try Snapshot(mirror: self, point: .latest)
        defer { snapshot.close() }
        let bs = UInt64(blockSize)
        let blockCount = volumeSize / bs
        let meta = try journal.readMeta(snapshot.txn)
        guard after < meta.lastSeq else { return Rewrite(records: 0, blocks: 0, wholeVolume: false) }
        if meta.oldestPoint > after {
            try write(snapshot, blocks: [0..<blockCount], into: file, progress: progress)
            return Rewrite(records: 0, blocks: blockCount, wholeVolume: true)
        }
        var touched: [Range<UInt64>] = []
        let entries = try snapshot.txn.cursor(journal.blocks)
        for seq in after + 1...meta.lastSeq {
            let (h, tally) = try journal.stored(snapshot.txn, seq: seq)
            guard h.kind != .flush, h.length > 0 else { continue }
            let blocks = h.offset / bs..<(h.offset + h.length + bs - 1) / bs
            var found = IndexTally()
            for b in blocks {
                guard let e = try entries.seek(atLeast: blockKey(b, seq)), let key = decodeBlockKey(e.key),
                      key == (b, seq) else { continue }
                let (content, hash) = try BlockContent.decode(e.value, seq: seq, block: b)
                guard entryMatches(h, block: b, content: content) else {
                    throw RewindError.corruptBlock(seq: seq, block: b, why: "its index entry does not match the record's \(h.kind.name) at \(h.offset)+\(h.length) (journal/data.mdb is damaged)")
                }
                found.add(hash)
            }
            guard found == tally else {
                throw RewindError.damagedMirror(path: path, why: "the block index holds \(found.count) entries for seq:\(seq) where the record wrote \(tally.count)\(found.count == tally.count ? " (their checks differ)" : ""): journal/data.mdb is damaged; `rewind verify` names the records")
            }
            touched.append(blocks)
        }
        let merged = Self.merged(touched)
        try write(snapshot, blocks: merged, into: file, progress: progress)
        return Rewrite(records: meta.lastSeq - after, blocks: merged.reduce(0) { $0 + UInt64($1.count) }, wholeVolume: false)
    }

    /// Ranges sorted and joined where they overlap or touch.
    static func merged(_ ranges: [Range<UInt64>]) -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        for r in ranges.sorted(by: { $0.lowerBound < $1.lowerBound }) {
            if let last = out.last, r.lowerBound <= last.upperBound {
                out[out.count - 1] = last.lowerBound..<max(last.upperBound, r.upperBound)
            } else {
                out.append(r)
            }
        }
        return out
    }

    /// Write `blocks` of the volume as `snapshot` has it into `file`, up to 1 MiB per write.
    private func write(_ snapshot: Snapshot, blocks: [Range<UInt64>], into file: BlockFile, progress: ProgressObserver?) throws {
        let bs = UInt64(blockSize)
        let total = blocks.reduce(0) { $0 + UInt64($1.count) }
        progress?.begin(phase: "rewriting changed blocks", total: total)
        let step = max(1, UInt64(1 << 20) / bs)
        var buffer = [UInt8](repeating: 0, count: Int(step * bs))
        var done: UInt64 = 0
        for range in blocks {
            var b = range.lowerBound
            while b < range.upperBound {
                let n = min(step, range.upperBound - b)
                let bytes = Int(n * bs)
                try buffer.withUnsafeMutableBytes { try snapshot.read(at: b * bs, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<bytes])) }
                try buffer.withUnsafeBytes { try file.write(at: b * bs, from: UnsafeRawBufferPointer(rebasing: $0[0..<bytes])) }
                b += n
                done += n
                progress?.update(done: done)
            }
        }
        progress?.end()
    }
}
