import Glibc
import Synchronization

/// A writable layer over a point: what `rewind export --overlay FILE` writes, so a failover
/// can be tested on the volume as it was without touching the mirror.
///
/// One sparse file:
/// ```
/// 0        header (4 KiB): magic "REWINDOV", format, block size, volume size, the mirror's
///          UUID and the seq it lies over, creation time; XXH3-64 of the rest in its last 8 bytes
/// 4096     the map: one byte per block: 0 the point's content, 1 the overlay's data, 2 zeros
/// dataStart  the blocks, block b at dataStart + b × blockSize (holes where never written)
/// ```
/// The map is the overlay's own small index: sparse like the data (a map page exists only
/// once a block it covers was written), read with the blocks it describes, never held in
/// memory whole. A write puts the block's bytes first and its map byte after, so a reader in
/// this process never sees a map byte before its data. Durability is the file's: a FLUSH
/// fdatasyncs it; across a power cut, blocks written after the last FLUSH may read old, new
/// or (map byte on disk, data not) zeros, as a disk's unflushed writes may.
///
/// An overlay belongs to one mirror (its UUID) and one seq, and refuses any other.
public final class Overlay: @unchecked Sendable {
    public let path: String
    public let seq: UInt64
    let file: BlockFile
    public let blockSize: Int
    let blockCount: UInt64
    let dataStart: UInt64
    /// Writes are read-modify-write of whole blocks: one at a time.
    private let writeLock = Mutex(())
    /// One writer per overlay across processes (an exclusive `flock` on the file), and no
    /// reader (`restore --overlay`, shared) while it writes.
    private let fileLock: FileLock

    static let magic: [UInt8] = Array("REWINDOV".utf8)
    static let format: UInt32 = 1
    static let headerSize = 4096
    static let mapStart: UInt64 = 4096

    /// What the map says of a block.
    public enum State: UInt8, Sendable { case point = 0, data = 1, zero = 2 }

    /// Open `path` as the overlay of `mirror` at `seq`, creating it (sparse) when it does not
    /// exist and `create` allows. An existing file must be that mirror's overlay at that seq.
    /// `forWriting`: an export's (the lock exclusive); else a restore's (shared).
    public init(path: String, mirror: Mirror, seq: UInt64, create: Bool = true, forWriting: Bool = true) throws {
        self.path = path
        self.seq = seq
        blockSize = mirror.blockSize
        blockCount = mirror.volumeSize / UInt64(mirror.blockSize)
        dataStart = Self.dataStart(blockCount: blockCount)
        if access(path, F_OK) != 0 {
            guard create else { throw RewindError.invalidArgument("no overlay at \(path)") }
            file = try Self.create(path: path, mirror: mirror, seq: seq, dataStart: dataStart)
        } else {
            file = try BlockFile(path: path, mode: .readWrite)
        }
        try Self.check(file, path: path, mirror: mirror, seq: seq)
        fileLock = try FileLock(path: path, kind: forWriting ? .exclusive : .shared, waitSeconds: 0,
                                holder: "another rewind export writes this overlay (an overlay has one writer); stop it first")
    }

    /// Where the blocks start: after the map, at a whole MiB.
    static func dataStart(blockCount: UInt64) -> UInt64 {
        (mapStart + blockCount + (1 << 20) - 1) / (1 << 20) * (1 << 20)
    }

    /// Let another process open the overlay (also at deinit).
    public func close() { fileLock.release() }

    private static func header(mirror: Mirror, seq: UInt64) -> [UInt8] {
        var h = magic
        h.appendLE(format)
        h.appendLE(UInt32(mirror.blockSize))
        h.appendLE(mirror.volumeSize)
        h += mirror.uuid
        h.appendLE(seq)
        h.appendLE(wallClockNanoseconds())
        h += [UInt8](repeating: 0, count: headerSize - 8 - h.count)
        h.appendLE(xxh3(h))
        return h
    }

    private static func create(path: String, mirror: Mirror, seq: UInt64, dataStart: UInt64) throws -> BlockFile {
        let file = try BlockFile(path: path, mode: .createNew)
        do {
            try file.write(at: 0, header(mirror: mirror, seq: seq))
            try file.truncate(to: dataStart + mirror.volumeSize)
            try file.sync()
        } catch {
            unlink(path)
            throw error
        }
        syncDirectory(containing: path)
        return file
    }

    /// Check that `file` is `mirror`'s overlay at `seq`, whole.
    private static func check(_ file: BlockFile, path: String, mirror: Mirror, seq: UInt64) throws {
        var h = [UInt8](repeating: 0, count: headerSize)
        let n = try h.withUnsafeMutableBytes { try file.readAvailable(at: 0, into: $0) }
        guard n == headerSize, Array(h[0..<8]) == magic else {
            throw RewindError.invalidArgument("\(path) is not a rewind overlay (give a new file's path to create one)")
        }
        let raw = h
        func u32(_ at: Int) -> UInt32 { raw.withUnsafeBytes { $0.loadLE(at: at, as: UInt32.self) } }
        func u64(_ at: Int) -> UInt64 { raw.withUnsafeBytes { $0.loadLE(at: at, as: UInt64.self) } }
        guard xxh3(Array(raw[0..<headerSize - 8])) == u64(headerSize - 8) else {
            throw RewindError.invalidArgument("\(path): the overlay's header is damaged (checksum mismatch)")
        }
        guard u32(8) == format else {
            throw RewindError.invalidArgument("\(path): overlay format \(u32(8)), this rewind reads format \(format)")
        }
        let uuid = Array(raw[24..<40]), at = u64(40)
        guard uuid == mirror.uuid, Int(u32(12)) == mirror.blockSize, u64(16) == mirror.volumeSize else {
            throw RewindError.invalidArgument("\(path) is an overlay of the mirror \(formatUUID(uuid)), not of \(mirror.path) (\(formatUUID(mirror.uuid)))")
        }
        if seq != at {
            throw RewindError.invalidArgument("\(path) is an overlay of seq:\(at), not of seq:\(seq): give --at seq:\(at), or a new file")
        }
        guard try file.size() >= dataStart(blockCount: mirror.volumeSize / UInt64(mirror.blockSize)) + mirror.volumeSize else {
            throw RewindError.invalidArgument("\(path): the overlay is shorter than its volume (truncated)")
        }
    }

    // MARK: the map

    /// The map bytes of blocks `first..<first+count`.
    func states(_ first: UInt64, _ count: Int) throws -> [UInt8] {
        var m = [UInt8](repeating: 0, count: count)
        try m.withUnsafeMutableBytes { try file.read(at: Self.mapStart + first, into: $0) }
        return m
    }

    /// Runs of blocks in `first..<end` with one state: (first block, count, state).
    public func runs(_ first: UInt64, _ end: UInt64) throws -> [(UInt64, UInt64, State)] {
        var out: [(UInt64, UInt64, State)] = []
        var at = first
        while at < end {
            let n = Int(min(end - at, 1 << 20))
            let m = try states(at, n)
            var i = 0
            while i < n {
                var j = i + 1
                while j < n && m[j] == m[i] { j += 1 }
                let state = State(rawValue: m[i]) ?? .point
                if let last = out.last, last.2 == state, last.0 + last.1 == at + UInt64(i) {
                    out[out.count - 1].1 += UInt64(j - i)
                } else {
                    out.append((at + UInt64(i), UInt64(j - i), state))
                }
                i = j
            }
            at += UInt64(n)
        }
        return out
    }

    // MARK: reads

    /// Read `buffer.count` bytes at `offset`: the overlay's blocks over `point`'s.
    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer, point: (UInt64, UnsafeMutableRawBufferPointer) throws -> Void) throws {
        guard !buffer.isEmpty else { return }
        let bs = UInt64(blockSize), end = offset + UInt64(buffer.count)
        for (block, count, state) in try runs(offset / bs, (end + bs - 1) / bs) {
            let from = max(block * bs, offset), to = min((block + count) * bs, end)
            let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[Int(from - offset)..<Int(to - offset)])
            switch state {
            case .point: try point(from, dst)
            case .data: try file.read(at: dataStart + from, into: dst)
            case .zero: dst.initializeMemory(as: UInt8.self, repeating: 0)
            }
        }
    }

    // MARK: writes

    /// Write `data` at `offset`. Blocks it covers in part are first filled from `point`.
    public func write(at offset: UInt64, _ data: UnsafeRawBufferPointer, point: (UInt64, UnsafeMutableRawBufferPointer) throws -> Void) throws {
        guard !data.isEmpty else { return }
        try checkRange(offset, UInt64(data.count))
        try writeLock.withLock { _ in
            try writeBlocks(at: offset, length: UInt64(data.count), point: point) { from, dst in
                dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: data[Int(from - offset)..<Int(from - offset) + dst.count]))
            }
        }
    }

    /// Zero `length` bytes at `offset` (WRITE_ZEROES and TRIM): whole blocks become map zeros
    /// and their data a hole; blocks covered in part are written.
    public func zero(at offset: UInt64, length: UInt64, point: (UInt64, UnsafeMutableRawBufferPointer) throws -> Void) throws {
        guard length > 0 else { return }
        try checkRange(offset, length)
        try writeLock.withLock { _ in
            let bs = UInt64(blockSize), end = offset + length
            let firstWhole = (offset + bs - 1) / bs, endWhole = end / bs
            if firstWhole < endWhole {
                try file.punchHole(at: dataStart + firstWhole * bs, length: (endWhole - firstWhole) * bs)
                try setMap(firstWhole, Int(endWhole - firstWhole), .zero)
            }
            let zeroFill: (UInt64, UnsafeMutableRawBufferPointer) -> Void = { _, dst in dst.initializeMemory(as: UInt8.self, repeating: 0) }
            if firstWhole >= endWhole {
                try writeBlocks(at: offset, length: length, point: point, fill: zeroFill)
            } else {
                if offset < firstWhole * bs { try writeBlocks(at: offset, length: firstWhole * bs - offset, point: point, fill: zeroFill) }
                if end > endWhole * bs { try writeBlocks(at: endWhole * bs, length: end - endWhole * bs, point: point, fill: zeroFill) }
            }
        }
    }

    private func checkRange(_ offset: UInt64, _ length: UInt64) throws {
        let size = blockCount * UInt64(blockSize)
        guard offset <= size, length <= size - offset else {
            throw RewindError.outOfRange(offset: offset, length: length, size: size)
        }
    }

    /// Under `writeLock`: write [offset, offset+length) block by block through `fill`, each
    /// partial block first read whole (from the overlay or the point).
    private func writeBlocks(at offset: UInt64, length: UInt64, point: (UInt64, UnsafeMutableRawBufferPointer) throws -> Void,
                             fill: (UInt64, UnsafeMutableRawBufferPointer) throws -> Void) throws {
        let bs = UInt64(blockSize), end = offset + length
        let first = offset / bs, last = (end + bs - 1) / bs
        let span = Int((last - first) * bs)
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: span, alignment: 4096)
        defer { buffer.deallocate() }
        // Partial head and tail blocks: their current content first.
        for b in Set([first, last - 1]) where b * bs < offset || (b + 1) * bs > end {
            let dst = UnsafeMutableRawBufferPointer(rebasing: buffer[Int((b - first) * bs)..<Int((b - first + 1) * bs)])
            try read(at: b * bs, into: dst, point: point)
        }
        try fill(offset, UnsafeMutableRawBufferPointer(rebasing: buffer[Int(offset - first * bs)..<Int(end - first * bs)]))
        try file.write(at: dataStart + first * bs, from: UnsafeRawBufferPointer(buffer))
        try setMap(first, Int(last - first), .data)
    }

    private func setMap(_ first: UInt64, _ count: Int, _ state: State) throws {
        try file.write(at: Self.mapStart + first, [UInt8](repeating: state.rawValue, count: count))
    }

    /// Make every write so far durable.
    public func sync() throws { try file.sync() }

    /// Lay the overlay's blocks onto `target` (a restored image of its point); returns how
    /// many blocks it wrote. `progress` sees blocks of the map scanned.
    public func apply(to target: BlockFile, progress: ProgressObserver?) throws -> UInt64 {
        let bs = UInt64(blockSize)
        var written: UInt64 = 0
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: blockSize, alignment: 4096)
        defer { buffer.deallocate() }
        progress?.begin(phase: "applying overlay", total: blockCount)
        var at: UInt64 = 0
        // Map pages that were never written are holes: skip them without reading.
        for extent in try file.dataExtents(size: Self.mapStart + blockCount, from: Self.mapStart) {
            let from = extent.lowerBound - Self.mapStart, to = extent.upperBound - Self.mapStart
            for (block, count, state) in try runs(from, to) where state != .point {
                switch state {
                case .zero:
                    try target.writeZeros(at: block * bs, length: count * bs)
                    written += count
                case .data:
                    for b in block..<block + count {
                        try file.read(at: dataStart + b * bs, into: buffer)
                        try target.write(at: b * bs, from: UnsafeRawBufferPointer(buffer))
                        written += 1
                    }
                case .point: break
                }
            }
            at = to
            progress?.update(done: at)
        }
        progress?.end()
        try target.sync()
        return written
    }
}
