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
