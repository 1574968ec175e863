import Glibc
import CLinux

/// A raw image file (base.img, a source volume, a restored image) with positioned I/O.
/// Every method names the C call it wraps and turns errno into `RewindError.io` with the path.
public final class BlockFile: @unchecked Sendable {
    public let path: String
    public let fd: Int32

    public enum Mode { case readOnly, readWrite, createNew, createOrTruncate }

    public init(path: String, mode: Mode) throws {
        self.path = path
        let flags: Int32
        switch mode {
        case .readOnly: flags = O_RDONLY
        case .readWrite: flags = O_RDWR
        case .createNew: flags = O_RDWR | O_CREAT | O_EXCL
        case .createOrTruncate: flags = O_RDWR | O_CREAT | O_TRUNC
        }
        let fd = open(path, flags | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw RewindError.io(path: path, operation: "open", errno: errno) }
        self.fd = fd
    }

    deinit { close(fd) }

    /// Size in bytes (`fstat`); for a block device, its capacity.
    public func size() throws -> UInt64 {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw err("fstat") }
        if (st.st_mode & S_IFMT) == S_IFBLK {
            let end = lseek(fd, 0, SEEK_END)
            guard end >= 0 else { throw err("lseek") }
            return UInt64(end)
        }
        return UInt64(st.st_size)
    }

    /// Bytes actually allocated on disk (`st_blocks` × 512).
    public func allocatedBytes() throws -> UInt64 {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw err("fstat") }
        return UInt64(st.st_blocks) * 512
    }

    /// Set the length. The corresponding C function is `ftruncate`.
    public func truncate(to size: UInt64) throws {
        let old = try self.size()
        try Storage.modify(path, fd: fd, min(old, size)..<max(old, size), "ftruncate") {
            guard ftruncate(fd, off_t(size)) == 0 else { throw err("ftruncate") }
        }
    }

    /// Read exactly `buffer.count` bytes at `offset`, looping over short reads (`pread`).
    /// Past end of file reads zeros.
    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        let n = try readAvailable(at: offset, into: buffer)
        if n < buffer.count {
            (buffer.baseAddress! + n).initializeMemory(as: UInt8.self, repeating: 0, count: buffer.count - n)
        }
    }

    /// Read up to `buffer.count` bytes at `offset`, looping over short reads until end of
    /// file; returns how many were read.
    public func readAvailable(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws -> Int {
        var done = 0
        while done < buffer.count {
            let n = pread(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw err("pread")
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    /// Write all of `buffer` at `offset`, looping over short writes (`pwrite`).
    /// Fill `buffer` from `offset` only if every byte is already in the page cache
    /// (`preadv2(RWF_NOWAIT)`): never waits for the disk or a lock, so an event loop may call
    /// it. False when any part would block, or on any error — the caller then reads normally.
    public func readIfCached(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) -> Bool {
        guard let base = buffer.baseAddress else { return true }
        var done = 0
        while done < buffer.count {
            let n = rewind_pread_nowait(fd, base + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { return false }
            done += n
        }
        return true
    }

    public func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer) throws {
        try Storage.modify(path, fd: fd, offset..<offset + UInt64(buffer.count), "pwrite") { try pwriteAll(at: offset, buffer) }
    }

    private func pwriteAll(at offset: UInt64, _ buffer: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < buffer.count {
            let n = pwrite(fd, buffer.baseAddress! + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw err("pwrite")
            }
            done += n
        }
    }

    public func write(at offset: UInt64, _ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try write(at: offset, from: $0) }
    }

    /// Write `bytes` as one `pwrite` per `piece`-aligned piece (`piece` a power of two). The
    /// page cache sizes the folios a buffered write creates by the write's length, so this
    /// caps them at `piece` (see `ServePipeline.sourceWritePieceBytes` for why that matters).
    public func write(at offset: UInt64, _ bytes: [UInt8], piecesOf piece: Int) throws {
        try bytes.withUnsafeBytes { all in
            var at = offset
            let end = offset + UInt64(all.count)
            while at < end {
                let next = min(end, (at / UInt64(piece) + 1) * UInt64(piece))
                try write(at: at, from: UnsafeRawBufferPointer(rebasing: all[Int(at - offset)..<Int(next - offset)]))
                at = next
            }
        }
    }

    /// Make the range read as zeros and free its space:
    /// `fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`, falling back to writing zeros
    /// where the file system cannot punch holes.
    public func punchHole(at offset: UInt64, length: UInt64) throws {
        guard length > 0 else { return }
        var punched = false
        try Storage.modify(path, fd: fd, offset..<offset + length, "fallocate(PUNCH_HOLE)") {
            punched = rewind_punch_hole(fd, off_t(offset), off_t(length)) == 0
        }
        if punched { return }
        let e = errno
        guard e == EOPNOTSUPP || e == ENOSYS || e == EINVAL || e == ENODEV else {
            throw RewindError.io(path: path, operation: "fallocate(PUNCH_HOLE)", errno: e)
        }
        try writeZeros(at: offset, length: length)
    }

    /// Make the range read as zeros keeping it allocated: `fallocate(FALLOC_FL_ZERO_RANGE)`.
    /// Returns false where the file system cannot (then the caller writes zeros or refuses).
    public func zeroRange(at offset: UInt64, length: UInt64) throws -> Bool {
        guard length > 0 else { return true }
        var zeroed = false
        try Storage.modify(path, fd: fd, offset..<offset + length, "fallocate(ZERO_RANGE)") {
            zeroed = rewind_zero_range(fd, off_t(offset), off_t(length)) == 0
        }
        if zeroed { return true }
        let e = errno
        if e == EOPNOTSUPP || e == ENOSYS || e == EINVAL || e == ENODEV { return false }
        throw RewindError.io(path: path, operation: "fallocate(ZERO_RANGE)", errno: e)
    }

    /// Write `length` zero bytes at `offset`, 1 MiB at a time.
    public func writeZeros(at offset: UInt64, length: UInt64) throws {
        let chunk = [UInt8](repeating: 0, count: Int(min(length, 1 << 20)))
        var at = offset
        while at < offset + length {
            let n = Int(min(UInt64(chunk.count), offset + length - at))
            try chunk.withUnsafeBytes { try write(at: at, from: UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
            at += UInt64(n)
        }
    }

    /// Hint that the range will be read soon (`posix_fadvise(POSIX_FADV_WILLNEED)`).
    public func willNeed(at offset: UInt64, length: UInt64) {
        _ = rewind_fadvise_willneed(fd, off_t(offset), off_t(length))
    }

    /// Flush data to stable storage (`fdatasync`).
    public func dataSync() throws {
        try Storage.sync(path, fd: fd, "fdatasync") {
            guard fdatasync(fd) == 0 else { throw err("fdatasync") }
        }
    }

    /// Write the file's dirty pages to the device and wait for them (`sync_file_range` with
    /// WAIT_BEFORE | WRITE | WAIT_AFTER): not durable until a device cache flush follows, and
    /// no metadata is written. Reports a writeback error as `fdatasync` would.
    public func writeOut() throws {
        try Storage.sync(path, fd: fd, "sync_file_range") {
            guard rewind_finish_writeback(fd, 0, 0) == 0 else { throw err("sync_file_range") }
        }
    }

    /// Start writing the file's dirty pages to the device (`sync_file_range(WRITE)`); advice only.
    public func startWriteback() {
        _ = rewind_start_writeback(fd, 0, 0)
    }

    /// Whether this file's `fdatasync` ends with a device cache flush that also makes durable
    /// the writes already completed to files on the file system holding `directory`: both on
    /// one ext4 or XFS file system (so one device, or a device-mapper stack that passes the
    /// flush to all of it), and not an XFS realtime file (its flush goes to the realtime
    /// device only). Both file systems issue that flush after waiting for the file's own data,
    /// whether or not a metadata commit was needed (`ext4_sync_file`, `xfs_file_fsync`).
    public func fdatasyncFlushesDevice(of directory: String) -> Bool {
        var mine = stat(), theirs = stat()
        guard fstat(fd, &mine) == 0, stat(directory, &theirs) == 0, mine.st_dev == theirs.st_dev,
              (mine.st_mode & S_IFMT) == S_IFREG else { return false }
        switch rewind_fs_type(fd) {
        case 0xEF53: return true
        case 0x5846_5342: return rewind_is_realtime(fd) == 0
        default: return false
        }
    }

    /// Flush data and metadata to stable storage. The corresponding C function is `fsync`.
    public func sync() throws {
        try Storage.sync(path, fd: fd, "fsync") {
            guard fsync(fd) == 0 else { throw err("fsync") }
        }
    }

    /// The allocated (data) extents of the file within `range` (default [0, size)), by
    /// `lseek(SEEK_DATA/SEEK_HOLE)`. Without hole reporting, one extent covers everything.
    public func dataExtents(size: UInt64, from: UInt64 = 0) throws -> [Range<UInt64>] {
        var result: [Range<UInt64>] = []
        var at = off_t(from)
        while UInt64(at) < size {
            let start = rewind_seek_data(fd, at)
            if start < 0 {
                if errno == ENXIO { break }
                return [UInt64(at)..<size]
            }
            guard UInt64(start) < size else { break }
            var end = rewind_seek_hole(fd, start)
            if end < 0 { end = off_t(size) }
            let e = min(UInt64(end), size)
            result.append(UInt64(start)..<e)
            at = off_t(e)
        }
        return result
    }

    /// Copy `length` bytes from `source` at `offset` to the same offset here, in the kernel
    /// (`copy_file_range`), falling back to read/write.
    public func copyRange(from source: BlockFile, offset: UInt64, length: UInt64) throws {
        try Storage.modify(path, fd: fd, offset..<offset + length, "copy_file_range") {
            try copyRangeInKernel(from: source, offset: offset, length: length)
        }
    }

    private func copyRangeInKernel(from source: BlockFile, offset: UInt64, length: UInt64) throws {
        var inOff = off_t(offset), outOff = off_t(offset)
        var left = Int(length)
        while left > 0 {
            let n = rewind_copy_file_range(source.fd, &inOff, fd, &outOff, min(left, 1 << 30))
            if n < 0 {
                if errno == EINTR { continue }
                if errno == EXDEV || errno == ENOSYS || errno == EOPNOTSUPP || errno == EINVAL {
                    try copyByReading(from: source, offset: UInt64(inOff), length: UInt64(left))
                    return
                }
                throw err("copy_file_range")
            }
            if n == 0 { break }
            left -= n
        }
    }

    private func copyByReading(from source: BlockFile, offset: UInt64, length: UInt64) throws {
        let chunk = 1 << 20
        let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buffer.deallocate() }
        var at = offset
        while at < offset + length {
            let n = Int(min(UInt64(chunk), offset + length - at))
            let slice = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n])
            try source.read(at: at, into: slice)
            try pwriteAll(at: at, UnsafeRawBufferPointer(slice))
            at += UInt64(n)
        }
    }

    private func err(_ operation: String) -> RewindError {
        RewindError.io(path: path, operation: operation, errno: errno)
    }
}

/// True if every byte of `buffer` is zero.
@inline(__always)
public func isAllZero(_ buffer: UnsafeRawBufferPointer) -> Bool {
    var i = 0
    let n = buffer.count
    while i + 8 <= n {
        if buffer.loadUnaligned(fromByteOffset: i, as: UInt64.self) != 0 { return false }
        i += 8
    }
    while i < n { if buffer[i] != 0 { return false }; i += 1 }
    return true
}
