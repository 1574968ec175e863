import Glibc

/// An advisory `flock` on a file inside the mirror, held until `release()` or deinit.
/// Coordinates processes: `serve` and `rollback` take `owner.lock` exclusively; readers of
/// old points take `base.lock` shared, and a compaction takes it exclusively while it
/// rewrites base.img.
public final class FileLock: @unchecked Sendable {
    let fd: Int32
    public let path: String

    public enum Kind { case shared, exclusive }

    /// Take the lock, waiting at most `waitSeconds`; throws `busy` if it stays held.
    public init(path: String, kind: Kind, waitSeconds: Double = 0, holder: String) throws {
        self.path = path
        let fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw RewindError.io(path: path, operation: "open", errno: errno) }
        self.fd = fd
        let op = (kind == .shared ? LOCK_SH : LOCK_EX) | LOCK_NB
        let deadline = monotonicNanoseconds() + UInt64(waitSeconds * 1e9)
        while flock(fd, op) != 0 {
            let e = errno
            guard e == EWOULDBLOCK || e == EINTR else {
                close(fd)
                throw RewindError.io(path: path, operation: "flock", errno: e)
            }
            if monotonicNanoseconds() >= deadline {
                close(fd)
                throw RewindError.busy(path: path, why: holder)
            }
            usleep(20_000)
        }
    }

    public func release() { flock(fd, LOCK_UN) }
    deinit { close(fd) }
}

/// `serve`'s claim on its SOURCE, held for the server's whole life: an exclusive, non-blocking
/// `flock` on the source file itself — a regular file, or a block device's node — on a
/// read-only descriptor of its own (the server's read-write `BlockFile` is another). A second
/// `serve` of the same source through another mirror is refused, naming the holder's pid;
/// commands that would overwrite a source (`rewind restore --to SOURCE`) probe the same lock
/// with `checkNotServed`. The mirror's `owner.lock` keeps one process per mirror; this keeps
/// one per source.
///
/// A block device is also opened with `O_EXCL`: Linux refuses that open with EBUSY while the
/// device is mounted or another program holds it exclusively, and refuses mounting it or
/// opening it exclusively while we hold it. Non-exclusive opens, like our own read-write one,
/// still work.
///
/// The flock is advisory: it keeps rewind processes apart, not other programs that write the file.
public final class SourceLock: @unchecked Sendable {
    let fd: Int32
    public let path: String
    public let isBlockDevice: Bool
    /// Most of /proc/locks read when naming a holder (~50 bytes a lock): bounds the read on a
    /// machine with very many locks, where the holder then goes unnamed.
    static let procLocksBytesMax = 4 << 20

    /// Take the lock, or throw `busy` (another process holds it, or the block device is
    /// mounted or held exclusively) without waiting.
    public init(path: String) throws {
        self.path = path
        // stat first: opening a FIFO would block, and O_EXCL without O_CREAT means something
        // only for a block device.
        var st = stat()
        guard stat(path, &st) == 0 else { throw RewindError.io(path: path, operation: "stat", errno: errno) }
        let type = st.st_mode & S_IFMT
        guard type == S_IFREG || type == S_IFBLK else {
            throw RewindError.invalidArgument("\(path) is neither a regular file nor a block device")
        }
        let block = type == S_IFBLK
        isBlockDevice = block
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | (block ? O_EXCL : 0))
        guard fd >= 0 else {
            let e = errno
            if block && e == EBUSY {
                // Another serve holds its own exclusive open too: name it rather than a mount.
                let other = SourceLock.probe(path)
                if other.held { throw SourceLock.busy(path, holder: other.holder) }
                throw RewindError.busy(path: path, why: "the block device is mounted, or another program holds it open exclusively (O_EXCL)")
            }
            throw RewindError.io(path: path, operation: "open", errno: e)
        }
        var opened = stat()
        guard fstat(fd, &opened) == 0, opened.st_dev == st.st_dev, opened.st_ino == st.st_ino else {
            close(fd)
            throw RewindError.invalidArgument("\(path) was replaced while rewind opened it; start again")
        }
        while flock(fd, LOCK_EX | LOCK_NB) != 0 {
            let e = errno
            if e == EINTR { continue }
            close(fd)
            if e == EWOULDBLOCK {
                throw SourceLock.busy(path, holder: SourceLock.flockHolder(device: UInt64(st.st_dev), inode: UInt64(st.st_ino)))
            }
            throw RewindError.io(path: path, operation: "flock", errno: e)
        }
        self.fd = fd
    }

    /// The locked file's identity, for the mirror's record of its source (`SourceIdentity`).
    public func identity() throws -> SourceIdentity {
        try SourceIdentity(describing: fd, path: path)
    }

    public func release() { flock(fd, LOCK_UN) }
    deinit { close(fd) }

    /// Throws `busy` when a `serve` holds `path`'s lock: for commands that would overwrite a
    /// source. A missing path, or one that is neither a regular file nor a block device, is
    /// not served. A shared, non-blocking probe: it never waits and never blocks a server.
    public static func checkNotServed(_ path: String) throws {
        let state = probe(path)
        if state.held { throw busy(path, holder: state.holder) }
    }

    /// Whether another process holds an exclusive flock on `path`, and who if /proc/locks names it.
    static func probe(_ path: String) -> (held: Bool, holder: (pid: Int32, exclusive: Bool)?) {
        var st = stat()
        guard stat(path, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG || (st.st_mode & S_IFMT) == S_IFBLK else {
            return (false, nil)
        }
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NOCTTY | O_NONBLOCK)
        guard fd >= 0 else { return (false, nil) }
        defer { close(fd) }
        var r = flock(fd, LOCK_SH | LOCK_NB)
        while r != 0 && errno == EINTR { r = flock(fd, LOCK_SH | LOCK_NB) }
        if r == 0 {
            flock(fd, LOCK_UN)
            return (false, nil)
        }
        guard errno == EWOULDBLOCK, fstat(fd, &st) == 0 else { return (false, nil) }
        return (true, flockHolder(device: UInt64(st.st_dev), inode: UInt64(st.st_ino)))
    }

    /// A `serve` holds its source's flock exclusively; a `restore` writing over an existing
    /// file or device holds a shared one (`RestoreTarget`), which also keeps a serve out.
    static func busy(_ path: String, holder: (pid: Int32, exclusive: Bool)?) -> RewindError {
        guard let holder else { return RewindError.busy(path: path, why: "another rewind serve has it open") }
        return RewindError.busy(path: path, why: holder.exclusive
            ? "another rewind serve has it open (pid \(holder.pid))"
            : "another process holds a shared lock on it, as rewind restore does while it writes there (pid \(holder.pid))")
    }

    /// A process holding a `flock` on the file (`device`, `inode`: its `st_dev` and `st_ino`),
    /// from /proc/locks — an exclusive holder if there is one, else a shared one — or nil. A
    /// line reads `1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF` (WRITE exclusive, READ
    /// shared; major and minor in hex); a waiter's has `->` after the id, and a pid outside
    /// our pid namespace shows as 0.
    static func flockHolder(device: UInt64, inode: UInt64) -> (pid: Int32, exclusive: Bool)? {
        let fd = open("/proc/locks", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        var text: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        while text.count < procLocksBytesMax {
            let n = chunk.withUnsafeMutableBytes { read(fd, $0.baseAddress, $0.count) }
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { break }
            text.append(contentsOf: chunk[0..<n])
        }
        let (major, minor) = deviceMajorMinorParts(device)
        var shared: Int32?
        for line in text.split(separator: UInt8(ascii: "\n")) {
            let f = line.split(separator: UInt8(ascii: " ")).map { String(decoding: $0, as: UTF8.self) }
            guard f.count >= 6, f[1] == "FLOCK", f[3] == "WRITE" || f[3] == "READ" else { continue }
            let id = f[5].split(separator: ":")
            guard id.count == 3, UInt64(id[0], radix: 16) == major, UInt64(id[1], radix: 16) == minor,
                  UInt64(id[2]) == inode, let pid = Int32(f[4]), pid > 0 else { continue }
            if f[3] == "WRITE" { return (pid, true) }
            shared = shared ?? pid
        }
        guard let shared else { return nil }
        return (pid: shared, exclusive: false)
    }
}

public func monotonicNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

public func wallClockNanoseconds() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}
