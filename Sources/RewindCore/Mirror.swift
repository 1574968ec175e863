import Glibc

/// A mirror: a base image plus a journal (LMDB index + payload log) in one directory on the
/// same file system.
///
/// ```
/// MIRROR/
///   base.img     the volume as of the horizon (oldest restorable point); raw, sparse
///   journal/     LMDB environment (data.mdb, lock.mdb): header, records, block index, bookmarks
///   log/         the payload log: group commits as checksummed chunks, 256 MiB per file
///   owner.lock   flock: held exclusively by the process that owns the source (serve, rollback)
///   base.lock    flock: shared by readers of points, exclusive while compaction rewrites base.img
/// ```
/// Base + records (horizon, k] is exactly the volume after record k.
public final class Mirror: @unchecked Sendable {
    public let path: String
    public let journal: Journal
    let base: BlockFile
    public let blockSize: Int
    public let volumeSize: UInt64
    public let uuid: [UInt8]
    /// Set when opening found the log's tail damaged rather than torn (see `LogDamage`).
    public internal(set) var logDamage: LogDamage?
    /// Called after each commit of the index by this process's writer (new records are
    /// readable): replication senders wake on it instead of waiting for their next look.
    /// Set once, before writing starts.
    public nonisolated(unsafe) var indexCommitted: (@Sendable () -> Void)?

    /// Largest single write the journal accepts (NBD's maximum payload is 32 MiB).
    public static let maxWriteBytes: UInt64 = 64 << 20
    public static let defaultBlockSize = 4096

    var basePath: String { path + "/base.img" }
    var baseLockPath: String { path + "/base.lock" }
    public var ownerLockPath: String { path + "/owner.lock" }

    // MARK: create

    /// Create a mirror at `path` whose base is `size` zero bytes, or a sparse copy of `image`.
    /// The directory is built beside `path` and renamed into place, so a crash leaves no half mirror.
    @discardableResult
    public static func create(at path: String, size: UInt64? = nil, from image: String? = nil,
                              blockSize: Int = defaultBlockSize, progress: ProgressObserver? = nil) throws -> Mirror {
        try create(at: path, size: size, copying: image.map { try BlockFile(path: $0, mode: .readOnly) }, blockSize: blockSize, progress: progress)
    }

    /// `create`, its base a sparse copy of any `VolumeSource` (an image, an NBD export).
    @discardableResult
    public static func create(at path: String, size: UInt64? = nil, copying image: (any VolumeSource)?,
                              blockSize: Int = defaultBlockSize, progress: ProgressObserver? = nil) throws -> Mirror {
        guard blockSize >= 512, blockSize <= 1 << 20, blockSize & (blockSize - 1) == 0 else {
            throw RewindError.invalidArgument("block size \(blockSize) must be a power of two from 512 to 1M")
        }
        if access(path, F_OK) == 0 { throw RewindError.mirrorExists(path: path) }
        var source: (any VolumeSource)?
        let volumeSize: UInt64
        if let image {
            volumeSize = try image.size()
            source = image
        } else if let size {
            volumeSize = size
        } else {
            throw RewindError.invalidArgument("give the volume size (--size) or an image to copy (--from)")
        }
        guard volumeSize > 0 else { throw RewindError.invalidArgument("the volume size must be greater than zero") }
        guard volumeSize % UInt64(blockSize) == 0 else {
            throw RewindError.invalidArgument("volume size \(volumeSize) is not a multiple of the block size \(blockSize)")
        }
        let staging = path + ".creating"
        removeTree(staging)
        guard mkdir(staging, 0o755) == 0 else { throw RewindError.io(path: staging, operation: "mkdir", errno: errno) }
        do {
            let base = try BlockFile(path: staging + "/base.img", mode: .createNew)
            try base.truncate(to: volumeSize)
            if let source { try sparseCopy(from: source, to: base, size: volumeSize, blockSize: blockSize, progress: progress) }
            try base.sync()
            try createJournal(in: staging, mirrorPath: path,
                              meta: MirrorMeta(blockSize: UInt32(blockSize), uuid: randomUUID(), volumeSize: volumeSize,
                                               now: wallClockNanoseconds()))
        } catch {
            removeTree(staging)
            throw error
        }
        guard rename(staging, path) == 0 else { throw RewindError.io(path: path, operation: "rename", errno: errno) }
        syncDirectory(containing: path)
        return try open(at: path)
    }

    /// Create `journal/` and `log/` in a mirror being built at `staging`, with header `meta`
    /// (and the other `meta` values in `extra`), synced.
    static func createJournal(in staging: String, mirrorPath: String, meta: MirrorMeta, extra: [String: [UInt8]] = [:]) throws {
        guard mkdir(staging + "/journal", 0o755) == 0 else {
            throw RewindError.io(path: staging + "/journal", operation: "mkdir", errno: errno)
        }
        try PayloadLog.create(directory: staging + "/log")
        let journal = try Journal(directory: staging + "/journal", logDirectory: staging + "/log", mirrorPath: mirrorPath, create: true)
        try journal.env.write { txn in
            try journal.writeMeta(txn, meta)
            for (key, value) in extra { try txn.put(journal.meta, Array(key.utf8), value) }
        }
        try journal.env.sync()
    }

    // MARK: open

    /// Open an existing mirror. `recover` (writers only) indexes the log's unindexed tail and
    /// finishes an interrupted compaction. Readers index a tail too when no process owns the
    /// mirror (the tail a crashed server left); a live owner's tail is its own staged work.
    /// `ownerLockHeld`: the caller holds `owner.lock` (serve), so the log's tail is its to index.
    public static func open(at path: String, recover: Bool = false, ownerLockHeld: Bool = false) throws -> Mirror {
        var st = stat()
        guard stat(path, &st) == 0 else {
            throw RewindError.notAMirror(path: path, why: "no such directory")
        }
        guard (st.st_mode & S_IFMT) == S_IFDIR else { throw RewindError.notAMirror(path: path, why: "not a directory") }
        guard access(path + "/journal/data.mdb", F_OK) == 0 else {
            throw RewindError.notAMirror(path: path, why: "journal/data.mdb is missing")
        }
        guard access(path + "/base.img", F_OK) == 0 else {
            throw RewindError.notAMirror(path: path, why: "base.img is missing")
        }
        let mirror = try Mirror(path: path)
        // The log's tail is indexed only by the owner of the mirror: a live server's tail is
        // its own staged work, which another process must neither index nor cut.
        if ownerLockHeld {
            try mirror.replayLogTail()
        } else if try mirror.hasLogTail() || recover,
                  let owner = try? FileLock(path: mirror.ownerLockPath, kind: .exclusive, holder: "") {
            defer { owner.release() }
            try mirror.replayLogTail()
        }
        if recover { try mirror.recover() }
        return mirror
    }

    private init(path: String) throws {
        self.path = path
        journal = try Journal(directory: path + "/journal", logDirectory: path + "/log", mirrorPath: path, create: false)
        base = try BlockFile(path: path + "/base.img", mode: .readWrite)
        let j = journal
        let meta = try j.env.read { try j.readMeta($0) }
        guard access(path + "/log", F_OK) == 0 else {
            throw RewindError.notAMirror(path: path, why: "log/ is missing")
        }
        blockSize = Int(meta.blockSize)
        volumeSize = meta.volumeSize
        uuid = meta.uuid
        let baseSize = try base.size()
        guard baseSize == volumeSize else {
            throw RewindError.damagedMirror(path: path, why: "base.img is \(baseSize) bytes, the volume is \(volumeSize)")
        }
    }

    /// The current header, read in its own transaction.
    public func meta() throws -> MirrorMeta {
        try journal.env.read { try journal.readMeta($0) }
    }

    /// Make everything appended so far durable (the NBD FLUSH/FUA hook). `mdb_env_sync(1)`.
    public func sync() throws {
        do { try journal.env.sync() } catch let e as LMDBError { throw RewindError.journal(e) }
    }

    /// Finish work a crash interrupted: a compaction whose target is above the horizon.
    func recover() throws {
        let m = try meta()
        if m.target > m.horizon {
            _ = try Compactor(mirror: self).finish(target: m.target, progress: nil)
        }
    }
}

/// Copy `source` into the fresh, zero-length-extended `target`, leaving holes where the
/// source has holes or all-zero blocks (like `cp --sparse=always`).
func sparseCopy(from source: any VolumeSource, to target: BlockFile, size: UInt64, blockSize: Int, progress: ProgressObserver?) throws {
    progress?.begin(phase: "copying", total: size)
    try forEachNonZeroRun(of: source, size: size, blockSize: blockSize, reached: { progress?.update(done: $0) }) { at, bytes in
        try target.write(at: at, from: bytes)
    }
    progress?.end()
}

/// Read `source`'s data extents below `size`, 1 MiB at a time, and call `body` with each run of
/// non-zero blocks (its offset and bytes): holes and all-zero blocks are skipped. `reached`
/// follows each read with the offset it reached (progress; a throw stops the walk). Returns
/// the bytes of data extents read.
@discardableResult
func forEachNonZeroRun(of source: any VolumeSource, size: UInt64, blockSize: Int, reached: (UInt64) throws -> Void = { _ in },
                       _ body: (UInt64, UnsafeRawBufferPointer) throws -> Void) throws -> UInt64 {
    let chunk = 1 << 20
    let buffer = UnsafeMutableRawBufferPointer.allocate(byteCount: chunk, alignment: 4096)
    defer { buffer.deallocate() }
    var read: UInt64 = 0
    for extent in try source.dataExtents(size: size, from: 0) {
        var at = extent.lowerBound
        while at < extent.upperBound {
            let n = Int(min(UInt64(chunk), extent.upperBound - at))
            let slice = UnsafeMutableRawBufferPointer(rebasing: buffer[0..<n])
            try source.read(at: at, into: slice)
            var b = 0
            while b < n {
                let blockEnd = min(b + blockSize, n)
                if isAllZero(UnsafeRawBufferPointer(rebasing: slice[b..<blockEnd])) { b = blockEnd; continue }
                var runEnd = blockEnd
                while runEnd < n {
                    let next = min(runEnd + blockSize, n)
                    if isAllZero(UnsafeRawBufferPointer(rebasing: slice[runEnd..<next])) { break }
                    runEnd = next
                }
                try body(at + UInt64(b), UnsafeRawBufferPointer(rebasing: slice[b..<runEnd]))
                b = runEnd
            }
            at += UInt64(n)
            read += UInt64(n)
            try reached(at)
        }
    }
    return read
}

func randomUUID() -> [UInt8] {
    var g = SystemRandomNumberGenerator()
    var u = (0..<16).map { _ in UInt8.random(in: 0...255, using: &g) }
    u[6] = (u[6] & 0x0F) | 0x40  // version 4
    u[8] = (u[8] & 0x3F) | 0x80  // RFC 4122 variant
    return u
}

func removeTree(_ path: String) {
    guard let dir = opendir(path) else { unlink(path); return }
    while let entry = readdir(dir) {
        let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
        if name == "." || name == ".." { continue }
        removeTree(path + "/" + name)
    }
    closedir(dir)
    rmdir(path)
}

public func syncDirectory(containing path: String) {
    let parent = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
    let fd = open(parent.isEmpty ? "/" : parent, O_RDONLY | O_DIRECTORY)
    if fd >= 0 { fsync(fd); close(fd) }
}
