import Glibc

/// What a restore did, for the CLI's report.
public struct RestoreReport: Sendable {
    public var seq: UInt64
    public var bytes: UInt64
    public var blocksFromJournal: UInt64
}

extension Mirror {
    /// Materialise the volume as of `point` into a new sparse image at `path`.
    /// Copies base.img's data extents in the kernel (`copy_file_range`), then writes each block
    /// changed in (horizon, seq] once, with its content at seq, in block order. The image is
    /// built as `path.partial`, fsynced and renamed into place: never a half image under `path`.
    @discardableResult
    public func restore(at point: Point, to path: String, force: Bool = false, progress: ProgressObserver? = nil) throws -> RestoreReport {
        var st = stat()
        let exists = stat(path, &st) == 0
        if exists && !force { throw RewindError.fileExists(path: path) }
        if exists && (st.st_mode & S_IFMT) == S_IFBLK {
            throw RewindError.invalidArgument("\(path) is a block device: use `rewind rollback --source` to revert a device in place")
        }
        let snapshot = try Snapshot(mirror: self, point: point)
        defer { snapshot.close() }
        let partial = path + ".partial"
        unlink(partial)
        let out = try BlockFile(path: partial, mode: .createNew)
        do {
            try out.truncate(to: volumeSize)
            let extents = try base.dataExtents(size: volumeSize)
            progress?.begin(phase: "copying base", total: extents.reduce(0) { $0 + UInt64($1.count) })
            var copied: UInt64 = 0
            for e in extents {
                try out.copyRange(from: base, offset: e.lowerBound, length: UInt64(e.count))
                copied += UInt64(e.count)
                progress?.update(done: copied)
            }
            progress?.end()
            let blocks = try applyChangedBlocks(snapshot, to: out, progress: progress)
            try out.sync()
            guard rename(partial, path) == 0 else { throw RewindError.io(path: path, operation: "rename", errno: errno) }
            syncDirectory(containing: path)
            return RestoreReport(seq: snapshot.seq, bytes: volumeSize, blocksFromJournal: blocks)
        } catch {
            unlink(partial)
            throw error
        }
    }

    /// Write every block whose content at the snapshot's seq comes from the journal into
    /// `out`, which must already hold base.img's content. Adjacent blocks are coalesced into
    /// writes of up to 1 MiB and zero runs into hole punches. Returns the blocks written.
    func applyChangedBlocks(_ snapshot: Snapshot, to out: BlockFile, progress: ProgressObserver?) throws -> UInt64 {
        let bs = UInt64(blockSize)
        let flushBytes = 1 << 20
        var pending: [UInt8] = []
        pending.reserveCapacity(flushBytes)
        var pendingStart: UInt64 = 0
        var zeroStart: UInt64 = 0, zeroEnd: UInt64 = 0
        var blocks: UInt64 = 0
        let total = try journal.env.read { try $0.count(journal.blocks) }
        progress?.begin(phase: "applying journal", total: UInt64(total))
        func flushData() throws {
            guard !pending.isEmpty else { return }
            try out.write(at: pendingStart * bs, pending)
            pending.removeAll(keepingCapacity: true)
        }
        func flushZero() throws {
            guard zeroEnd > zeroStart else { return }
            try out.punchHole(at: zeroStart * bs, length: (zeroEnd - zeroStart) * bs)
            zeroStart = 0; zeroEnd = 0
        }
        try snapshot.forEachChangedBlock { block, bytes in
            blocks += 1
            if blocks % 4096 == 0 { progress?.update(done: blocks) }
            if let bytes {
                try flushZero()
                if pending.isEmpty || pendingStart + UInt64(pending.count) / bs != block || pending.count >= flushBytes {
                    try flushData()
                    pendingStart = block
                }
                pending.append(contentsOf: bytes)
            } else {
                try flushData()
                if zeroEnd != block || zeroEnd == zeroStart { try flushZero(); zeroStart = block }
                zeroEnd = block + 1
            }
        }
        try flushData()
        try flushZero()
        progress?.end()
        return blocks
    }
}
