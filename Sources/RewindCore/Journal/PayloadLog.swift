import CLinux
import Glibc
import Synchronization

/// The journal's payload bytes: one append-only byte stream, stored as files of
/// `fileBytes` in `MIRROR/log/` (`0000000000000000.log`, `0000000000000001.log`, …).
/// Stream position p lives in file p / fileBytes at offset p % fileBytes; a chunk may run
/// across a file boundary. The stream holds `LogChunk`s, one per group commit, end to end.
///
/// Why a log beside LMDB rather than payload inside it: a FLUSH then costs one fdatasync of
/// this file (plus the source's), not LMDB's two ordered ones (data pages, then meta page);
/// payload is written once, by one `pwrite`, instead of being copied into LMDB's dirty pages;
/// and LMDB's index commits need not be on the FLUSH path at all (`JournalWriter`).
/// Compaction deletes whole files once every record in them is folded into the base.
public final class PayloadLog: @unchecked Sendable {
    public static let fileBytes: UInt64 = 256 << 20
    public static let firstPosition: UInt64 = 0
    /// Open descriptors kept at most (beyond it, idle ones are closed).
    static let maxOpenFiles = 256

    let directory: String
    /// Open files. A file taken out of the map (unlinked, or evicted) stays open until its
    /// last user lets go of it.
    private let files = Mutex([UInt64: BlockFile]())
    /// Files written since the last `sync()`, the stream positions written, and whether a file
    /// was created (the directory entry must be synced too).
    private let dirty = Mutex((files: Set<UInt64>(), written: Range<UInt64>?.none, created: false))
    /// Stream positions on blocks already written with zeros and synced (`reserve(prewrite:)`),
    /// file size included: overwriting them leaves no metadata to write (`sync(flushedBy:)`).
    private let prepared = Mutex<Range<UInt64>>(0..<0)
    /// Held through each sync, so syncs from two threads (the serve writer's FLUSH, the index
    /// thread's commit) never overlap: a sync that finds nothing dirty because another took the
    /// dirty set must still wait until those bytes are durable.
    private let syncing = Mutex(())
    /// The first failed sync or writeback of the log, for good. On Linux a writeback error is
    /// reported once and the pages are then clean (PostgreSQL's "fsync surprise"): a later
    /// sync that succeeds proves nothing about the bytes the failed one covered. So every
    /// sync after a failure throws that failure again; nothing is retried.
    private let failure = Mutex<Error?>(nil)
    /// How far `punchDeadPrefix` has punched, as a stream position (this process only): each
    /// compaction punches from there, not from the file's start again.
    private let punched = Mutex<UInt64>(0)

    public init(directory: String) {
        self.directory = directory
    }

    static func create(directory: String) throws {
        guard mkdir(directory, 0o755) == 0 || errno == EEXIST else {
            throw RewindError.io(path: directory, operation: "mkdir", errno: errno)
        }
    }

    func path(ofFile index: UInt64) -> String {
        directory + "/" + String(index, radix: 16).leftPadded(16) + ".log"
    }

    // MARK: descriptors

    /// Run `body` with file `index`, opening (or, with `create`, creating) it. Returns nil
    /// when the file does not exist and `create` is false.
    private func withFile<T>(_ index: UInt64, create: Bool, _ body: (BlockFile) throws -> T) throws -> T? {
        let file: BlockFile? = try files.withLock { open in
            if let f = open[index] { return f }
            let p = path(ofFile: index)
            let f: BlockFile
            do {
                f = try BlockFile(path: p, mode: .readWrite)
            } catch RewindError.io(_, _, EACCES) {
                f = try BlockFile(path: p, mode: .readOnly)  // a read-only mirror
            } catch RewindError.io(_, _, ENOENT) {
                guard create else { return nil }
                f = try BlockFile(path: p, mode: .createNew)
                dirty.withLock { $0.created = true }
            }
            if open.count >= Self.maxOpenFiles {
                // Never a file with unsynced writes: a writeback error is reported through the
                // descriptors open when it happened, and a closed one would take it away.
                let unsynced = dirty.withLock { $0.files }
                open = open.filter { unsynced.contains($0.key) }
            }
            open[index] = f
            return f
        }
        return try file.map(body)
    }

    /// Split `count` bytes at `position` into per-file pieces: (file, offset in file, offset in
    /// the caller's buffer, length).
    static func pieces(at position: UInt64, count: Int) -> [(file: UInt64, offset: UInt64, from: Int, length: Int)] {
        var out: [(UInt64, UInt64, Int, Int)] = []
        var done = 0
        while done < count {
            let p = position + UInt64(done)
            let inFile = p % fileBytes
            let n = Int(min(UInt64(count - done), fileBytes - inFile))
            out.append((p / fileBytes, inFile, done, n))
            done += n
        }
        return out
    }

    // MARK: reading

    /// Fill `buffer` from stream `position`. False if the log does not reach that far (a file
    /// is missing or too short); I/O errors throw.
    public func read(at position: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws -> Bool {
        for piece in Self.pieces(at: position, count: buffer.count) {
            let slice = UnsafeMutableRawBufferPointer(rebasing: buffer[piece.from..<piece.from + piece.length])
            guard try withFile(piece.file, create: false, { try $0.readAvailable(at: piece.offset, into: slice) }) == piece.length else {
                return false
            }
        }
        return true
    }

    /// `read`, but only from the page cache (`BlockFile.readIfCached`): false when any part
    /// would wait for the disk, or the log does not reach that far.
    public func readIfCached(at position: UInt64, into buffer: UnsafeMutableRawBufferPointer) -> Bool {
        for piece in Self.pieces(at: position, count: buffer.count) {
            let slice = UnsafeMutableRawBufferPointer(rebasing: buffer[piece.from..<piece.from + piece.length])
            guard (try? withFile(piece.file, create: false, { $0.readIfCached(at: piece.offset, into: slice) })) == true else {
                return false
            }
        }
        return true
    }

    // MARK: writing

    /// Write `bytes` at stream `position` (buffered; durable after `sync()`).
    public func write(_ bytes: UnsafeRawBufferPointer, at position: UInt64) throws {
        for piece in Self.pieces(at: position, count: bytes.count) {
            let slice = UnsafeRawBufferPointer(rebasing: bytes[piece.from..<piece.from + piece.length])
            _ = try withFile(piece.file, create: true) { try $0.write(at: piece.offset, from: slice) }
            dirty.withLock { _ = $0.files.insert(piece.file) }
        }
        dirty.withLock { $0.written = Self.spanning($0.written, position..<position + UInt64(bytes.count)) }
    }

    /// Blocks are reserved this far ahead of the log's end (`reserve(through:)`).
    public static let reserveAheadBytes: UInt64 = 8 << 20

    /// What the streaming writer reserves ahead on this log's file system: `reserveAheadBytes`,
    /// or a sixteenth of a small file system (a 24 MiB one would otherwise give a third of
    /// itself to blocks not yet written, and run out of room a full journal's compaction needs).
    public private(set) lazy var reserveAhead: UInt64 = {
        guard let (_, total) = fileSystemSpace() else { return Self.reserveAheadBytes }
        return min(Self.reserveAheadBytes, max(64 << 10, total / 16 / 65536 * 65536))
    }()
    private let reservedTo = Mutex<UInt64>(0)

    /// Reserve disk blocks for `range` (a chunk about to be written) and `ahead` bytes past it,
    /// unless already reserved. Appends into reserved blocks skip ext4's delayed allocation
    /// (~17 % of the serve writer's time at sequential 1 MiB writes).
    /// Plain reservation is `fallocate(FALLOC_FL_KEEP_SIZE)` (the size stays what was written).
    /// With `prewrite`, the blocks are written with zeros and synced instead, the way databases
    /// prepare a WAL: later chunks overwrite allocated, written blocks inside the file's size,
    /// so syncing them flushes data only, no metadata — what a FLUSH of a small write waits for.
    public func reserve(_ range: Range<UInt64>, ahead: UInt64, prewrite: Bool = false) throws {
        if prewrite { return try prepare(range, ahead: ahead) }
        let from = reservedTo.withLock { r -> UInt64? in
            guard range.upperBound > r || r > range.upperBound + 2 * max(ahead, Self.reserveAheadBytes) else { return nil }
            defer { r = range.upperBound + ahead }
            return r > range.lowerBound && r <= range.upperBound ? r : range.lowerBound
        }
        guard let from else { return }
        for piece in Self.pieces(at: from, count: Int(range.upperBound + ahead - from)) {
            _ = try withFile(piece.file, create: true) { file in
                _ = rewind_preallocate_range(file.fd, off_t(piece.offset), off_t(piece.length))
            }
        }
    }

    /// `reserve(prewrite: true)`: unless `range` already lies on prepared blocks, write zeros
    /// from its start (or the prepared end inside it) to `ahead` past it, and sync them. Blocks
    /// only fallocated ahead of a large chunk do not count: writing into them still converts
    /// unwritten extents, metadata a FLUSH would have to sync (after a burst of large chunks
    /// the next 8 MiB of small FLUSHed writes cost two device flushes each, not one). Nothing
    /// at or past `range.lowerBound` is live: the log is written in order.
    private func prepare(_ range: Range<UInt64>, ahead: UInt64) throws {
        let ready = prepared.withLock { $0 }
        if ready.lowerBound <= range.lowerBound && range.upperBound <= ready.upperBound { return }
        let from = ready.lowerBound <= range.lowerBound && range.lowerBound < ready.upperBound ? ready.upperBound : range.lowerBound
        let to = range.upperBound + ahead
        for piece in Self.pieces(at: from, count: Int(to - from)) {
            _ = try withFile(piece.file, create: true) { file in
                try file.writeZeros(at: piece.offset, length: UInt64(piece.length))
                try file.dataSync()
            }
        }
        prepared.withLock { p in
            p = p.upperBound >= from && p.lowerBound <= from ? p.lowerBound..<max(p.upperBound, to) : from..<to
        }
        reservedTo.withLock { r in
            if r < to || r > to + 2 * Self.reserveAheadBytes { r = to }
        }
    }

    /// Make everything written so far durable: `fdatasync` of each file written since the last
    /// call (normally one), and of the directory when a file was created.
    public func sync() throws {
        try syncing.withLock { _ in try syncDirty() }
    }

    /// Remember `error` as the log's permanent failure (the first one wins) and return it.
    @discardableResult
    func fail(_ error: Error) -> Error {
        failure.withLock { f in
            if f == nil { f = error }
            return f ?? error
        }
    }

    /// Throw the log's permanent failure, if a sync or writeback ever failed.
    private func checkNotFailed() throws {
        if let f = failure.withLock({ $0 }) { throw f }
    }

    private func syncDirty() throws {
        try checkNotFailed()
        let (toSync, written, created) = dirty.withLock { d -> (Set<UInt64>, Range<UInt64>?, Bool) in
            defer { d = (Set<UInt64>(), nil, false) }
            return (d.files, d.written, d.created)
        }
        do {
            for index in toSync.sorted() { try syncFile(index) }
            if created { try syncDirectory() }
        } catch {
            // Never retried: the failure stands for every later sync (see `failure`).
            owe(toSync, written, created)
            throw fail(error)
        }
    }

    /// Put back what a failed sync still owes (for the record: every later sync throws the
    /// failure; see `failure`).
    private func owe(_ files: Set<UInt64>, _ written: Range<UInt64>?, _ created: Bool) {
        dirty.withLock { d in
            d.files.formUnion(files)
            d.created = d.created || created
            if let written { d.written = Self.spanning(d.written, written) }
        }
    }

    /// The smallest range holding `a` (if any) and `b`.
    private static func spanning(_ a: Range<UInt64>?, _ b: Range<UInt64>) -> Range<UInt64> {
        guard let a else { return b }
        return min(a.lowerBound, b.lowerBound)..<max(a.upperBound, b.upperBound)
    }

    /// Make everything written so far durable with the device cache flush of another file's
    /// `fdatasync` (`deviceFlush`, on the same device: `BlockFile.fdatasyncFlushesDevice`),
    /// instead of a cache flush of its own: a FLUSH then costs the device one cache flush, not
    /// two (two side by side took 220–270 µs here, one 107–150 µs). Possible only when every
    /// byte written since the last sync overwrote prepared blocks and no file was created —
    /// nothing but data is owed — so the bytes are written out and waited for
    /// (`BlockFile.writeOut`) before `deviceFlush` runs, and its flush, issued after its own
    /// data wait, covers them. Returns false, having done nothing, when a full `sync()` is
    /// needed instead. With nothing owed, `deviceFlush` just runs.
    public func sync(flushedBy deviceFlush: () throws -> Void) throws -> Bool {
        try syncing.withLock { _ in try syncDirty(flushedBy: deviceFlush) }
    }

    private func syncDirty(flushedBy deviceFlush: () throws -> Void) throws -> Bool {
        try checkNotFailed()
        let ready = prepared.withLock { $0 }
        let owed = dirty.withLock { d -> (Set<UInt64>, Range<UInt64>?)? in
            guard !d.created else { return nil }
            if let w = d.written {
                guard w.lowerBound >= ready.lowerBound, w.upperBound <= ready.upperBound else { return nil }
            } else if !d.files.isEmpty {
                return nil
            }
            defer { d = (Set<UInt64>(), nil, false) }
            return (d.files, d.written)
        }
        guard let (toSync, written) = owed else { return false }
        do {
            for index in toSync.sorted() { _ = try withFile(index, create: false) { try $0.writeOut() } }
            try deviceFlush()
        } catch {
            owe(toSync, written, false)
            throw fail(error)
        }
        return true
    }

    /// Make the files spanning `range` durable, whoever wrote them (log replay indexes bytes a
    /// killed process may have left in the page cache only), and the directory.
    public func sync(_ range: Range<UInt64>) throws {
        guard !range.isEmpty else { return }
        try checkNotFailed()
        do {
            for index in range.lowerBound / Self.fileBytes...(range.upperBound - 1) / Self.fileBytes { try syncFile(index) }
            try syncDirectory()
        } catch {
            throw fail(error)
        }
    }

    private func syncFile(_ index: UInt64) throws {
        _ = try withFile(index, create: false) { try $0.dataSync() }
    }

    /// Drop the pages of `range` (already durable) from the page cache: a CDP journal is
    /// written once and rarely read, and on this machine class every page the cache newly
    /// takes costs a host-side fault, while recycled pages cost nothing (docs/design.md).
    public func dropFromCache(_ range: Range<UInt64>) {
        let page = UInt64(LMDBEnvironment.osPageSize)
        let start = (range.lowerBound + page - 1) / page * page, end = range.upperBound / page * page
        guard start < end else { return }
        advise(start..<end) { posix_fadvise($0, $1, $2, Int32(POSIX_FADV_DONTNEED)) }
    }

    /// Start writing `range` back to disk now (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so a
    /// later `release` finds it clean. Not a durability barrier: `sync()` is.
    public func startWriteback(_ range: Range<UInt64>) {
        writeback(range, "sync_file_range(WRITE)", rewind_start_writeback)
    }

    /// Wait until `range` is written back, then drop it from the page cache: the streaming
    /// writer's pattern, which keeps the log's footprint in the cache to a couple of group
    /// commits and hands the kernel back pages it can reuse at once. A writeback error it is
    /// told of becomes the log's permanent failure: the next sync (a FLUSH) fails with it,
    /// where `fdatasync` on the same descriptor would no longer report it.
    public func release(_ range: Range<UInt64>) {
        writeback(range, "sync_file_range(WAIT)", rewind_finish_writeback)
        dropFromCache(range)
    }

    /// `call` on each file's part of `range`; a failure (other than a file already gone)
    /// is kept as the log's permanent failure.
    private func writeback(_ range: Range<UInt64>, _ name: String, _ call: (Int32, off_t, off_t) -> Int32) {
        for piece in Self.pieces(at: range.lowerBound, count: Int(range.upperBound - range.lowerBound)) {
            let failed = try? withFile(piece.file, create: false) { f -> Int32? in
                call(f.fd, off_t(piece.offset), off_t(piece.length)) == 0 ? nil : errno
            }
            if let e = failed ?? nil {
                fail(RewindError.io(path: path(ofFile: piece.file), operation: name, errno: e))
            }
        }
    }

    /// Apply a page-cache call (`fd, offset, length`) to each file's part of `range`. Advice
    /// only: errors are ignored.
    private func advise(_ range: Range<UInt64>, _ call: (Int32, off_t, off_t) -> Int32) {
        for piece in Self.pieces(at: range.lowerBound, count: Int(range.upperBound - range.lowerBound)) {
            _ = try? withFile(piece.file, create: false) { _ = call($0.fd, off_t(piece.offset), off_t(piece.length)) }
        }
    }

    // MARK: housekeeping

    /// Every log file's index, in order.
    public func fileIndices() -> [UInt64] {
        guard let dir = opendir(directory) else { return [] }
        defer { closedir(dir) }
        var out: [UInt64] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            guard name.hasSuffix(".log"), name.count == 20, let i = UInt64(name.prefix(16), radix: 16) else { continue }
            out.append(i)
        }
        return out.sorted()
    }

    /// The stream position just past the last byte of the last file.
    public func end() -> UInt64 {
        guard let last = fileIndices().last else { return 0 }
        var st = stat()
        guard stat(path(ofFile: last), &st) == 0 else { return last * Self.fileBytes }
        return last * Self.fileBytes + UInt64(st.st_size)
    }

    /// Free bytes (for an unprivileged writer) and total bytes of the file system holding the
    /// log (`statvfs`); nil if it cannot be asked.
    public func fileSystemSpace() -> (free: UInt64, total: UInt64)? {
        var st = statvfs()
        guard statvfs(directory, &st) == 0 else { return nil }
        return (UInt64(st.f_bavail) * UInt64(st.f_frsize), UInt64(st.f_blocks) * UInt64(st.f_frsize))
    }

    /// Bytes the log files occupy on disk.
    public func allocatedBytes() -> UInt64 {
        fileIndices().reduce(0) { sum, i in
            var st = stat()
            return stat(path(ofFile: i), &st) == 0 ? sum + UInt64(st.st_blocks) * 512 : sum
        }
    }

    /// Delete every file wholly before stream `position` (compaction: nothing there is live).
    /// Returns how many went.
    @discardableResult
    public func deleteFiles(before position: UInt64) -> Int {
        var n = 0
        for i in fileIndices() where (i + 1) * Self.fileBytes <= position {
            closeFile(i)
            if unlink(path(ofFile: i)) == 0 { n += 1 }
        }
        if n > 0 { try? syncDirectory() }  // space only: a file that comes back is deleted again
        prepared.withLock { $0 = $0.clamped(to: position..<max(position, $0.upperBound)) }
        return n
    }

    /// Free the disk blocks of the file holding `position` that lie wholly before it (nothing
    /// there is live: compaction folded it), by punching a hole: a log file is 256 MiB, so
    /// deleting whole files alone frees nothing on a journal smaller than one. The size stays;
    /// the hole lies before the live part, where `Mirror.logGaps` does not look.
    /// Only what was not punched before: a compaction every few seconds re-punching the whole
    /// dead prefix of a 256 MiB file would walk its extents each time.
    public func punchDeadPrefix(before position: UInt64) {
        let page = UInt64(LMDBEnvironment.osPageSize)
        let fileStart = position / Self.fileBytes * Self.fileBytes
        let end = fileStart + position % Self.fileBytes / page * page
        let from = max(punched.withLock { $0 }, fileStart)
        guard end > from else { return }
        // Compactions run one at a time (the mirror's compaction lock): no two punch at once.
        let done: Bool = (try? withFile(position / Self.fileBytes, create: false) { try $0.punchHole(at: from - fileStart, length: end - from) }) != nil
        if done { punched.withLock { $0 = max($0, end) } }
    }

    /// Cut the stream at `position`: what follows is a torn or abandoned tail. Later files go.
    public func truncate(at position: UInt64) throws {
        punched.withLock { $0 = min($0, position) }
        prepared.withLock { $0 = $0.clamped(to: 0..<position) }
        let keep = position / Self.fileBytes
        var unlinked = false
        for i in fileIndices() where i > keep || (i == keep && position % Self.fileBytes == 0 && position > 0) {
            closeFile(i)
            guard unlink(path(ofFile: i)) == 0 else { throw RewindError.io(path: path(ofFile: i), operation: "unlink", errno: errno) }
            unlinked = true
        }
        if unlinked { try syncDirectory() }
        let inFile = position % Self.fileBytes
        guard inFile > 0 || position == 0 else { return }
        _ = try withFile(keep, create: false) { file in
            try file.truncate(to: inFile)
            try file.dataSync()
        }
    }

    private func closeFile(_ index: UInt64) {
        _ = files.withLock { $0.removeValue(forKey: index) }
        dirty.withLock { _ = $0.files.remove(index) }
    }

    /// Make the directory's entries durable (files created or unlinked).
    private func syncDirectory() throws {
        let fd = open(directory, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw RewindError.io(path: directory, operation: "open", errno: errno) }
        defer { close(fd) }
        try Storage.sync(directory, fd: fd, "fsync") {
            guard fsync(fd) == 0 else { throw RewindError.io(path: directory, operation: "fsync", errno: errno) }
        }
    }
}
