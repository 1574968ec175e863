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
