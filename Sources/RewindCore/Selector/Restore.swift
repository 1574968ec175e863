import Glibc

/// What a restore did, for the CLI's report.
public struct RestoreReport: Sendable {
    public var seq: UInt64
    public var bytes: UInt64
    public var blocksFromJournal: UInt64
}

extension Mirror {
    /// Materialise the volume as of `point` at `path`; `RestoreTarget` decides what that may
    /// be and refuses the rest (a path in a mirror, a served source, an existing file or a
    /// block device without `force`). A symlink is followed: the file it points at is replaced.
    ///
    /// A file: built as a new sparse image under a unique name beside `path` (base.img's data
    /// extents copied in the kernel by `copy_file_range`, then each block changed in
    /// (horizon, seq] written once with its content at seq, in block order), fsynced, then put
    /// at `path` in one step and the directory fsynced: `path` never holds a half image or a
    /// mix of two restores'. On any error the temporary file is removed.
    ///
    /// A block device (`force` only): written in place, whole — every byte of the volume,
    /// zeros included, since the device holds old content — then fsynced; bytes past the
    /// volume's size are left as they were. `blocksFromJournal` is then 0 (not counted).
    @discardableResult
    ///
    /// `overlay`: an overlay of this mirror at the same point (`rewind export --overlay`),
    /// laid over the point's image before it is put in place: the tested volume, as a new image.
    public func restore(at point: Point, to path: String, force: Bool = false, overlay overlayPath: String? = nil,
                        progress: ProgressObserver? = nil) throws -> RestoreReport {
        let target = try RestoreTarget.plan(path, force: force, volumeBytes: volumeSize)
        let snapshot = try Snapshot(mirror: self, point: point)
        defer { snapshot.close() }
        let overlay = try overlayPath.map { try Overlay(path: $0, mirror: self, seq: snapshot.seq, create: false, forWriting: false) }
        switch target {
        case .device where overlay != nil:
            throw RewindError.invalidArgument("--overlay restores to a file, not to the block device \(path): restore to a file, then copy it")
        case let .device(device):
            // A device cannot be put back: the index is checked whole before the first write.
            try snapshot.checkIndex()
            try writeVolume(snapshot, into: device, progress: progress)
            return RestoreReport(seq: snapshot.seq, bytes: volumeSize, blocksFromJournal: 0)
        case let .file(resolved, replace, lock):
            let temporary = try RestoreTarget.createTemporary(beside: resolved)
            do {
                // An existing target's lock is held until it is replaced: no `serve` can start
                // on the file meanwhile.
                let blocks = try withExtendedLifetime(lock) { () throws -> UInt64 in
                    var blocks = try buildImage(snapshot, into: temporary.file, progress: progress)
                    if let overlay { blocks += try overlay.apply(to: temporary.file, progress: progress) }
                    try RestoreTarget.install(temporary.path, at: resolved, given: path, replace: replace)
                    return blocks
                }
                return RestoreReport(seq: snapshot.seq, bytes: volumeSize, blocksFromJournal: blocks)
            } catch {
                unlink(temporary.path)
                throw error
            }
        }
    }

    /// Fill `out`, a new empty file, with the volume as of the snapshot and fsync it; returns
    /// the blocks written from the journal.
    private func buildImage(_ snapshot: Snapshot, into out: BlockFile, progress: ProgressObserver?) throws -> UInt64 {
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
        return blocks
    }

    /// Bytes read from the snapshot and written to a device at a time: big enough that the
    /// per-call cost vanishes, small enough to stay a fixed buffer.
    static let deviceWritePieceBytes = 1 << 20

    /// Write every byte of the volume as of the snapshot into `device` at the same offsets,
    /// `deviceWritePieceBytes` at a time (zeros too: a device has no holes to leave), then fsync.
    private func writeVolume(_ snapshot: Snapshot, into device: DeviceTarget, progress: ProgressObserver?) throws {
        precondition(device.capacityBytes >= volumeSize, "RestoreTarget.plan checks the device's size")
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: Self.deviceWritePieceBytes, alignment: 4096)
        defer { buffer.deallocate() }
        progress?.begin(phase: "writing the device", total: volumeSize)
        var at: UInt64 = 0
        while at < volumeSize {
            let n = Int(min(UInt64(Self.deviceWritePieceBytes), volumeSize - at))
            let piece = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n])
            try snapshot.read(at: at, into: piece)
            try device.write(at: at, from: UnsafeRawBufferPointer(piece))
            at += UInt64(n)
            progress?.update(done: at)
        }
        progress?.end()
        try device.sync()
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
