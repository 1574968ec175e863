import Glibc

/// Where `restore --to IMAGE` writes, decided before the volume is read (the planner half of
/// restore; `Mirror.restore` is the executor).
///
/// ```
/// IMAGE, as given
///   │ a symlink?      followed, as cp does: every check below is about the file it resolves
///   │                 to, and the new image replaces that file (the link keeps pointing at it);
///   │                 a symlink to a missing file is refused
///   │ in a mirror?    refused if the resolved file, or any directory above it up to /, is a
///   │                 mirror (holds journal/data.mdb and base.img)
///   │ its kind        a directory, character device, FIFO or socket is refused
///   │ served?         an existing file or device is opened read-only and flock(LOCK_SH|LOCK_NB)
///   │                 tried: it fails only while a `rewind serve` holds its exclusive lock;
///   │                 once taken it is held until the target is replaced or written
///   ▼
/// nothing there     → .file(replace: --force)   built beside it, linked into place (or renamed
///                                                over whatever appeared meanwhile, with --force)
/// a regular file    → .file(replace: true)       only with --force; renamed over it
/// a block device    → .device                     only with --force; written in place, whole
/// ```
///
/// Why a shared lock: `serve` holds an exclusive one on its source (`SourceLock`), which a
/// shared request sees just as well; two restores to one target (or a restore writing a device
/// and another probing it) then never mistake each other for a server; and held for the whole
/// restore it keeps a `serve` from starting on a file about to be replaced under it.
enum RestoreTarget {
    /// Build a new image in a temporary file beside `path` (absolute, symlinks resolved) and
    /// put it there; `replace` lets it replace a file at `path` (rename), otherwise a file that
    /// appeared meanwhile is left alone and the restore refused (link). `lock`: the existing
    /// file's, to hold until it is replaced.
    case file(path: String, replace: Bool, lock: TargetLock?)
    /// Write the volume into this block device, claimed exclusively and locked until released.
    case device(DeviceTarget)

    /// Decide where a restore of a `volumeBytes`-byte volume to `given` writes, or refuse with
    /// the reason. Errors name `given`, the path as the user wrote it.
    static func plan(_ given: String, force: Bool, volumeBytes: UInt64) throws -> RestoreTarget {
        guard !given.isEmpty else { throw RewindError.invalidArgument("the image path is empty") }
        var st = stat()
        guard lstat(given, &st) == 0 else {
            let e = errno
            // "new/" names a directory that is not there, not a file to create.
            guard e == ENOENT, !given.hasSuffix("/") else { throw RewindError.io(path: given, operation: "stat", errno: e) }
            let (directory, name) = split(given)
            let realDirectory = try resolve(directory)
            if let mirror = enclosingMirror(from: realDirectory) {
                throw RewindError.targetInsideMirror(path: given, mirror: mirror)
            }
            return .file(path: join(realDirectory, name), replace: force, lock: nil)
        }

        let path: String
        if (st.st_mode & S_IFMT) == S_IFLNK {
            guard let real = realPath(given) else {
                let e = errno
                if e == ENOENT { throw RewindError.danglingSymlink(path: given) }
                throw RewindError.io(path: given, operation: "realpath", errno: e)
            }
            path = real
            guard stat(path, &st) == 0 else { throw RewindError.io(path: path, operation: "stat", errno: errno) }
        } else {
            let (directory, name) = split(given)
            let realDirectory = try resolve(directory)
            path = join(realDirectory, name)
        }

        switch st.st_mode & S_IFMT {
        case S_IFREG, S_IFBLK:
            break
        case S_IFDIR:
            let real = realPath(path) ?? path
            if isMirror(real) { throw RewindError.targetIsMirror(path: given, mirror: real) }
            if let mirror = enclosingMirror(from: real) { throw RewindError.targetInsideMirror(path: given, mirror: mirror) }
            throw RewindError.targetNotAFile(path: given, kind: "a directory")
        case S_IFCHR: throw RewindError.targetNotAFile(path: given, kind: "a character device")
        case S_IFIFO: throw RewindError.targetNotAFile(path: given, kind: "a FIFO")
        case S_IFSOCK: throw RewindError.targetNotAFile(path: given, kind: "a socket")
        default: throw RewindError.targetNotAFile(path: given, kind: "not a regular file")
        }
        if let mirror = enclosingMirror(from: split(path).directory) {
            throw RewindError.targetInsideMirror(path: given, mirror: mirror)
        }
        let lock = try TargetLock.probe(path, given: given)
        if (st.st_mode & S_IFMT) == S_IFREG {
            guard force else { throw RewindError.fileExists(path: given) }
            return .file(path: path, replace: true, lock: lock)
        }
        guard force else { throw RewindError.deviceNeedsForce(path: given) }
        let device = try DeviceTarget.claim(path, given: given, lock: lock, volumeBytes: volumeBytes)
        return .device(device)
    }

    // MARK: building a file

    /// Create an empty file beside `path` under a name no other restore uses:
    /// `.NAME.rewind-restore.XXXXXX` in the same directory (so the final rename stays on one
    /// file system), created with O_EXCL like `mkstemp` — two restores to one target each
    /// build their own image and neither can see the other's half-written one.
    static func createTemporary(beside path: String) throws -> (path: String, file: BlockFile) {
        let (directory, name) = split(path)
        // NAME_MAX is 255 bytes; keep room for the 23 bytes this adds.
        let stem = name.utf8.count > 200 ? String(name.prefix(50)) : name
        var lastError = RewindError.io(path: directory, operation: "open", errno: EEXIST)
        for _ in 0..<temporaryNameAttempts {
            let candidate = join(directory, "." + stem + ".rewind-restore." + randomSuffix())
            do {
                let file = try BlockFile(path: candidate, mode: .createNew)
                return (candidate, file)
            } catch let error as RewindError {
                guard case .io(_, _, EEXIST) = error else { throw error }
                lastError = error
            }
        }
        throw lastError
    }

    /// Tries at new random names before giving up: 62^6 names make one collision already rare.
    static let temporaryNameAttempts = 100

    /// Put the finished, synced image `temporary` at `path`, then sync the directory.
    /// `replace`: `rename`, atomic, so `path` holds a whole old file or a whole new one.
    /// Otherwise `link` + `unlink`, which fails if a file appeared at `path` since the plan (two
    /// restores without --force to one new name: the second is refused, not silently
    /// replacing the first); where the file system has no hard links, `rename`.
    static func install(_ temporary: String, at path: String, given: String, replace: Bool) throws {
        if replace {
            guard rename(temporary, path) == 0 else { throw RewindError.io(path: path, operation: "rename", errno: errno) }
        } else if link(temporary, path) == 0 {
            unlink(temporary)
        } else {
            let e = errno
            switch e {
            case EEXIST:
                throw RewindError.fileExists(path: given)
            case EPERM, EOPNOTSUPP, ENOSYS, EMLINK:
                guard rename(temporary, path) == 0 else { throw RewindError.io(path: path, operation: "rename", errno: errno) }
            default:
                throw RewindError.io(path: path, operation: "link", errno: e)
            }
        }
        syncDirectory(containing: path)
    }

    // MARK: paths

    /// True if `directory` is a mirror: it holds both journal/data.mdb and base.img (what
    /// `Mirror.open` requires).
    static func isMirror(_ directory: String) -> Bool {
        access(join(directory, "journal/data.mdb"), F_OK) == 0 && access(join(directory, "base.img"), F_OK) == 0
    }

    /// The first mirror among `directory` (absolute, resolved) and its ancestors up to /.
    static func enclosingMirror(from directory: String) -> String? {
        var current = directory
        while true {
            if isMirror(current) { return current }
            guard current != "/" else { return nil }
            current = split(current).directory
        }
    }

    /// `realpath` of a directory that must exist (the parent of a target).
    static func resolve(_ directory: String) throws -> String {
        guard let real = realPath(directory) else { throw RewindError.io(path: directory, operation: "realpath", errno: errno) }
        return real
    }

    /// `realpath(3)`: absolute, every symlink, `.` and `..` resolved; nil with errno set if it fails.
    static func realPath(_ path: String) -> String? {
        guard let p = realpath(path, nil) else { return nil }
        defer { free(p) }
        return String(cString: p)
    }

    /// Directory and last component: "a/b.img" → ("a", "b.img"), "b.img" → (".", "b.img"),
    /// "/b" → ("/", "b"); trailing slashes are ignored.
    static func split(_ path: String) -> (directory: String, name: String) {
        var p = Substring(path)
        while p.count > 1 && p.hasSuffix("/") { p = p.dropLast() }
        guard let slash = p.lastIndex(of: "/") else { return (".", String(p)) }
        let directory = p[..<slash]
        return (directory.isEmpty ? "/" : String(directory), String(p[p.index(after: slash)...]))
    }

    static func join(_ directory: String, _ name: String) -> String {
        directory.hasSuffix("/") ? directory + name : directory + "/" + name
    }

    private static func randomSuffix() -> String {
        let alphabet = Array("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        var g = SystemRandomNumberGenerator()
        return String((0..<6).map { _ in alphabet[Int.random(in: 0..<alphabet.count, using: &g)] })
    }
}

/// A read-only descriptor on an existing target holding a shared `flock` (see `RestoreTarget`
/// for why shared). Closed, and so unlocked, on deinit.
final class TargetLock {
    private let fd: Int32

    private init(fd: Int32) { self.fd = fd }
    deinit { close(fd) }

    /// Open `path` read-only and take the lock without waiting. Throws `targetServed` while a
    /// `rewind serve` holds its exclusive lock on it.
    static func probe(_ path: String, given: String) throws -> TargetLock {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw RewindError.io(path: path, operation: "open", errno: errno) }
        while flock(fd, LOCK_SH | LOCK_NB) != 0 {
            let e = errno
            if e == EINTR { continue }
            close(fd)
            if e == EWOULDBLOCK { throw RewindError.targetServed(path: given) }
            throw RewindError.io(path: path, operation: "flock", errno: e)
        }
        return TargetLock(fd: fd)
    }
}

/// A block device a restore writes into: opened `O_WRONLY | O_EXCL` (the kernel refuses while
/// it is mounted or another process holds it exclusively, and refuses others while we do) and
/// locked like a served source's lock probe for the whole write, so a `serve` cannot start on it.
final class DeviceTarget {
    /// The device as resolved (I/O errors name it).
    let path: String
    /// Its capacity (`lseek(SEEK_END)`), at least the volume's size.
    let capacityBytes: UInt64
    private let fd: Int32
    private let lock: TargetLock

    private init(path: String, fd: Int32, capacityBytes: UInt64, lock: TargetLock) {
        self.path = path; self.fd = fd; self.capacityBytes = capacityBytes; self.lock = lock
    }

    deinit { close(fd) }

    /// Claim the device at `path`. Throws `deviceInUse` (EBUSY) and `deviceTooSmall`.
    static func claim(_ path: String, given: String, lock: TargetLock, volumeBytes: UInt64) throws -> DeviceTarget {
        let fd = open(path, O_WRONLY | O_EXCL | O_CLOEXEC)
        guard fd >= 0 else {
            let e = errno
            if e == EBUSY { throw RewindError.deviceInUse(path: given) }
            throw RewindError.io(path: path, operation: "open", errno: e)
        }
        let end = lseek(fd, 0, SEEK_END)
        guard end >= 0 else {
            let e = errno
            close(fd)
            throw RewindError.io(path: path, operation: "lseek", errno: e)
        }
        guard UInt64(end) >= volumeBytes else {
            close(fd)
            throw RewindError.deviceTooSmall(path: given, bytes: UInt64(end), volumeBytes: volumeBytes)
        }
        return DeviceTarget(path: path, fd: fd, capacityBytes: UInt64(end), lock: lock)
    }

    /// Write all of `buffer` at `offset`, looping over short writes (`pwrite`).
    func write(at offset: UInt64, from buffer: UnsafeRawBufferPointer) throws {
        guard let base = buffer.baseAddress else { return }
        var done = 0
        while done < buffer.count {
            let n = pwrite(fd, base + done, buffer.count - done, off_t(offset) + off_t(done))
            if n < 0 {
                if errno == EINTR { continue }
                throw RewindError.io(path: path, operation: "pwrite", errno: errno)
            }
            done += n
        }
    }

    /// Flush the device's written pages and its cache. The corresponding C function is `fsync`.
    func sync() throws {
        guard fsync(fd) == 0 else { throw RewindError.io(path: path, operation: "fsync", errno: errno) }
    }
}

extension Mirror {
    /// Whether a restore to `path` writes into a block device (following symlinks, as restore
    /// does) rather than building an image file. For the CLI's report.
    public static func restoreTargetIsBlockDevice(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFBLK
    }
}
