import Foundation
import Glibc

/// A point in use: while a `Pin` is held, no compaction folds past its seq, so an export (or a
/// `NAME@POINT` connection of `serve`) keeps reading exactly that point.
///
/// Pins are files in `MIRROR/pins/`, one per holder, each under an exclusive `flock` its
/// process holds for as long as it reads the point. The kernel drops the lock when the process
/// ends however it ends (SIGKILL included), so a dead holder is recognised at once — the lock
/// can be taken — and its file is removed by the next reader of the pins; nobody has to
/// clean up by hand, and a reused pid cannot keep a pin alive.
///
/// `pins.lock` orders pinning against compaction: a new pin is created, and its point checked
/// against the header's target, under it; a compaction reads the pins and records its target
/// under it. So either the compaction sees the pin, or the pin sees the compaction's target
/// (and is refused as before the horizon).
public final class Pin: @unchecked Sendable {
    public let seq: UInt64
    public let path: String
    private let fd: Int32
    private var released = false
    private let lock = NSLock()

    /// What `status` shows of a pin.
    public struct Info: Sendable, Equatable, Codable {
        public var seq: UInt64
        public var pid: Int32
        /// When it was taken (ns since 1970).
        public var since: UInt64
        /// Who holds it: `export vol.img@bookmark:x`.
        public var holder: String
    }

    fileprivate init(seq: UInt64, path: String, fd: Int32) {
        self.seq = seq
        self.path = path
        self.fd = fd
    }

    /// Give the point up: its file is removed, then the lock dropped.
    public func release() {
        lock.lock()
        defer { lock.unlock() }
        guard !released else { return }
        released = true
        unlink(path)
        close(fd)
    }

    deinit { release() }
}

extension Mirror {
    var pinsDirectory: String { path + "/pins" }
    var pinsLockPath: String { path + "/pins.lock" }

    /// Pin `point` for `holder`: resolved, checked against the restorable window and recorded,
    /// in one step that no compaction can cut through (see `Pin`).
    public func pin(_ point: Point, holder: String) throws -> Pin {
        let order = try FileLock(path: pinsLockPath, kind: .exclusive, waitSeconds: 60,
                                 holder: "a compaction is choosing its target")
        defer { order.release() }
        // Resolved in a transaction begun after the lock: it sees any target recorded before it.
        let (seq, meta) = try journal.env.read { txn in (try resolve(point, txn), try journal.readMeta(txn)) }
        if meta.pendingRollback != MirrorMeta.none && seq > meta.pendingRollback {
            throw RewindError.interruptedRollback(target: meta.pendingRollback)
        }
        if mkdir(pinsDirectory, 0o755) != 0 && errno != EEXIST {
            throw RewindError.io(path: pinsDirectory, operation: "mkdir", errno: errno)
        }
        let name = String(format: "%020llu-%d-%08x", seq, getpid(), UInt32.random(in: 0...UInt32.max))
        // Created under a name `livePins` ignores, locked and written, then renamed into place:
        // a `.pin` file is never seen unlocked while its holder lives.
        let staging = pinsDirectory + "/." + name + ".new", path = pinsDirectory + "/" + name + ".pin"
        let fd = Glibc.open(staging, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw RewindError.io(path: staging, operation: "open", errno: errno) }
        let info = Pin.Info(seq: seq, pid: getpid(), since: wallClockNanoseconds(), holder: holder)
        let body = (try? JSONEncoder().encode(info)) ?? Data()
        _ = body.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
        guard flock(fd, LOCK_EX | LOCK_NB) == 0, rename(staging, path) == 0 else {
            let e = errno
            close(fd); unlink(staging)
            throw RewindError.io(path: path, operation: "pin", errno: e)
        }
        return Pin(seq: seq, path: path, fd: fd)
    }

    /// The pins held by live processes, oldest point first. Files of dead holders (their lock
    /// free) are removed on the way; an unreadable file of a live holder still counts.
    public func livePins() throws -> [Pin.Info] {
        guard let dir = opendir(pinsDirectory) else {
            if errno == ENOENT { return [] }
            throw RewindError.io(path: pinsDirectory, operation: "opendir", errno: errno)
        }
        defer { closedir(dir) }
        var pins: [Pin.Info] = []
        while let entry = readdir(dir) {
            let name = withUnsafeBytes(of: entry.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            guard name.hasSuffix(".pin"), let seq = UInt64(name.prefix(20)) else { continue }
            let path = pinsDirectory + "/" + name
            let fd = Glibc.open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { continue }  // released meanwhile
            defer { close(fd) }
            if flock(fd, LOCK_SH | LOCK_NB) == 0 {
                unlink(path)  // nobody holds it: its process ended without releasing it
                continue
            }
            var bytes = [UInt8](repeating: 0, count: 4096)
            let n = read(fd, &bytes, bytes.count)
            if n > 0, var info = try? JSONDecoder().decode(Pin.Info.self, from: Data(bytes[0..<n])) {
                info.seq = seq  // the name is what compaction goes by
                pins.append(info)
            } else {
                pins.append(Pin.Info(seq: seq, pid: 0, since: 0, holder: "unknown holder (\(name))"))
            }
        }
        return pins.sorted { $0.seq < $1.seq }
    }

    /// Run `body` (which records a compaction's target) with pinning held off, after checking
    /// that `target` folds past no live pin.
    func withPinsChecked<T>(target: UInt64, peersYield: Bool = false, _ body: () throws -> T) throws -> T {
        try withPinsHeldOff({ holds in
            if let pin = holds.first(where: { !peersYield || $0.pid != 0 }), pin.seq < target {
                throw RewindError.pinned(target: target, pin: pin)
            }
        }, body)
    }

    /// Run `body` (which records a rollback's target) with pinning held off, after checking
    /// that no live pin reads a point after `target`, which the rollback removes.
    func withPinsChecked<T>(rollbackTo target: UInt64, _ body: () throws -> T) throws -> T {
        try withPinsHeldOff({ pins in
            if let pin = pins.last, pin.seq > target {
                throw RewindError.invalidArgument("seq:\(pin.seq) is in use by \(pin.heldBy), and a rollback to seq:\(target) removes it; stop that export first")
            }
        }, body)
    }

    private func withPinsHeldOff<T>(_ check: ([Pin.Info]) throws -> Void, _ body: () throws -> T) throws -> T {
        let order = try FileLock(path: pinsLockPath, kind: .exclusive, waitSeconds: 60,
                                 holder: "an export is pinning its point")
        defer { order.release() }
        try check(try retentionHolds())
        return try body()
    }
}

extension Pin.Info {
    public var summary: String { "seq:\(seq) held by \(heldBy)" }
    /// Who holds it, with its pid (none for a replication peer, which holds it across restarts).
    public var heldBy: String { pid == 0 ? holder : "\(holder) (pid \(pid))" }
}
