import Foundation
import Glibc
import RewindCore
import Synchronization

/// A disk that can lose power: a `StorageFaults` layer for tests, in the manner of LevelDB's
/// FaultInjectionTestEnv and SQLite's crash-test VFS.
///
/// The real files under `root` play the page cache: every write reaches them at once. What
/// the disk would hold is tracked beside them: for each page (4 KiB) written since its file's
/// last successful `fdatasync`/`fsync`, its content at that sync (the pre-image), and the
/// file's size then. `cut()` is the power failing: from that instant every write, sync or
/// LMDB commit under `root` throws EIO and changes nothing, so no sync the engine sees
/// succeed happened after it. `reboot(using:)` then decides what the disk held: the size at
/// the last sync, the current one, or one between; and for each unsynced page, the new
/// content, the old, or a mix torn at 512-byte sectors — independently per page, so later
/// writes can survive where earlier ones are lost.
///
/// LMDB does its own I/O through a map and `pwrite`, not through this layer. Its documented
/// guarantee is taken as given: a commit fdatasyncs its data pages before writing the meta
/// page, and with `MDB_NOMETASYNC` (ours) the meta page becomes durable at the next commit or
/// `mdb_env_sync`. So the layer lets commits before the cut complete and refuses those
/// after, and at the reboot the meta pages of the last commit not followed by a sync revert
/// to what they held before it, at random. LMDB's own pages are never torn here, and
/// directory entries (a file created or unlinked) are taken as durable when made.
///
/// It can also fail chosen calls: `fail(_:pathContaining:errno:times:)`.
public final class PowerCutStorage: StorageFaults, @unchecked Sendable {
    public static let pageSize = 4096
    public static let sectorSize = 512

    /// A planned failure: the next `times` calls of `operation` ("pwrite", "fdatasync",
    /// "fsync", "ftruncate", "fallocate(PUNCH_HOLE)", "mdb_txn_commit", …) on a path
    /// containing `pathContaining` throw `errno` without running.
    struct PlannedFailure {
        var operation: String
        var pathContaining: String
        var errno: Int32
        var times: Int
    }

    struct FileState {
        /// The file's size at its last sync.
        var syncedSize: UInt64
        /// Pre-images of the pages written since: the bytes the page held at the last sync,
        /// as far as the file reached (fewer than a page at its end, none past it).
        var pages: [UInt64: [UInt8]] = [:]
    }

    struct State {
        var cut = false
        var files: [String: FileState] = [:]
        /// Per LMDB directory: the meta pages before its last commit, and whether a sync came since.
        var lmdbLastCommit: [String: (metaPages: [UInt8], synced: Bool)] = [:]
        var failures: [PlannedFailure] = []
        /// Calls refused because of `failures`, by operation.
        var injected: [String: Int] = [:]
    }

    /// What a reboot put on the disk.
    public struct RebootReport: Sendable {
        public var files = 0
        public var pagesNew = 0
        public var pagesOld = 0
        public var pagesTorn = 0
        public var sizesChanged = 0
        public var lmdbCommitsLost = 0
    }

    public let root: String
    private let state = Mutex(State())

    public init(root: String) {
        self.root = root.hasSuffix("/") ? root : root + "/"
    }

    public func covers(_ path: String) -> Bool { path.hasPrefix(root) || path + "/" == root }

    // MARK: control

    /// The power fails now.
    public func cut() { state.withLock { $0.cut = true } }

    public var isCut: Bool { state.withLock { $0.cut } }

    /// Pages written and not yet synced, over every file.
    public var unsyncedPages: Int { state.withLock { $0.files.values.reduce(0) { $0 + $1.pages.count } } }

    /// Fail the next `times` calls of `operation` on a path containing `pathContaining`.
    public func fail(_ operation: String, pathContaining: String, errno: Int32, times: Int = 1) {
        state.withLock { $0.failures.append(PlannedFailure(operation: operation, pathContaining: pathContaining, errno: errno, times: times)) }
    }

    /// How many calls a planned failure refused, by operation.
    public var injectedFailures: [String: Int] { state.withLock { $0.injected } }

    // MARK: StorageFaults

    public func modify(_ path: String, fd: Int32, _ range: Range<UInt64>, operation: String, _ body: () throws -> Void) throws {
        try state.withLock { s in
            try Self.refuse(&s, path, operation)
            if !range.isEmpty {
                var st = stat()
                let size = fstat(fd, &st) == 0 ? UInt64(st.st_size) : 0
                var file = s.files[path] ?? FileState(syncedSize: size)
                let page = UInt64(Self.pageSize)
                // A hole punched over a hole changes nothing: only the data under a punch needs
                // its pre-image (compaction punches a log file's whole dead prefix, up to 256 MiB).
                let spans = operation.hasPrefix("fallocate(PUNCH_HOLE") ? Self.dataSpans(fd, range, size: size) : [range]
                for span in spans where !span.isEmpty {
                    for p in span.lowerBound / page...(span.upperBound - 1) / page where file.pages[p] == nil {
                        file.pages[p] = Self.readPage(fd, p, size: size)
                    }
                }
                s.files[path] = file
            }
            try body()
        }
    }

    public func sync(_ path: String, fd: Int32, operation: String, _ body: () throws -> Void) throws {
        try state.withLock { s in
            try Self.refuse(&s, path, operation)
            try body()
            // sync_file_range writes pages out but is no barrier: nothing becomes durable.
            if operation == "fdatasync" || operation == "fsync" { s.files[path] = nil }
        }
    }

    public func lmdbCommit(_ directory: String, _ body: () throws -> Void) throws {
        try state.withLock { s in
            try Self.refuse(&s, directory + "/data.mdb", "mdb_txn_commit")
            let before = Self.metaPages(directory)
            try body()
            s.lmdbLastCommit[directory] = (before, false)
        }
    }

    public func lmdbSync(_ directory: String, _ body: () throws -> Void) throws {
        try state.withLock { s in
            try Self.refuse(&s, directory + "/data.mdb", "mdb_env_sync")
            try body()
            s.lmdbLastCommit[directory]?.synced = true
        }
    }

    /// Throw if the power is off, or a planned failure matches.
    private static func refuse(_ s: inout State, _ path: String, _ operation: String) throws {
        if s.cut { throw RewindError.io(path: path, operation: operation, errno: EIO) }
        guard let i = s.failures.firstIndex(where: { $0.operation == operation && path.contains($0.pathContaining) }) else { return }
        let e = s.failures[i].errno
        s.failures[i].times -= 1
        if s.failures[i].times <= 0 { s.failures.remove(at: i) }
        s.injected[operation, default: 0] += 1
        throw RewindError.io(path: path, operation: operation, errno: e)
    }

    /// The parts of `range` that hold data (`SEEK_DATA` / `SEEK_HOLE`); all of it if the file
    /// system cannot say.
    static func dataSpans(_ fd: Int32, _ range: Range<UInt64>, size: UInt64) -> [Range<UInt64>] {
        let seekData: Int32 = 3, seekHole: Int32 = 4  // Linux's SEEK_DATA, SEEK_HOLE (_GNU_SOURCE: not in Glibc's module)
        var spans: [Range<UInt64>] = []
        var at = range.lowerBound
        let end = min(range.upperBound, size)
        while at < end {
            let data = lseek(fd, off_t(at), seekData)
            if data < 0 { return errno == ENXIO ? spans : [range] }  // ENXIO: only a hole follows
            if UInt64(data) >= end { break }
            let hole = lseek(fd, data, seekHole)
            if hole < 0 { return [range] }
            let span = UInt64(data)..<min(end, max(UInt64(data), UInt64(hole)))
            if !span.isEmpty { spans.append(span) }
            at = UInt64(hole)
        }
        return spans
    }

    // MARK: reboot

    /// Put on the real files what the disk held at the cut (see the type's comment), and
    /// start again with power on and every file as the disk now holds it. Call it once the
    /// engine has let go of every file (the mirror closed).
    @discardableResult
    public func reboot<R: RandomNumberGenerator>(using rng: inout R) -> RebootReport {
        state.withLock { s in
            var report = RebootReport()
            for (path, file) in s.files.sorted(by: { $0.key < $1.key }) {
                let fd = open(path, O_RDWR | O_CLOEXEC)
                guard fd >= 0 else { continue }  // unlinked since: directory entries are durable when made
                defer { close(fd) }
                report.files += 1
                var st = stat()
                let current = fstat(fd, &st) == 0 ? UInt64(st.st_size) : 0
                // The new content of each unsynced page, read before the size changes.
                var newContent: [UInt64: [UInt8]] = [:]
                for p in file.pages.keys { newContent[p] = Self.readPage(fd, p, size: current) }
                var size = current
                if file.syncedSize != current {
                    let lo = min(file.syncedSize, current), hi = max(file.syncedSize, current)
                    switch Int.random(in: 0..<3, using: &rng) {
                    case 0: size = file.syncedSize
                    case 1: size = current
                    default: size = lo + UInt64.random(in: 0...(hi - lo) / UInt64(Self.sectorSize), using: &rng) * UInt64(Self.sectorSize)
                    }
                    if size != current { report.sizesChanged += 1 }
                    _ = ftruncate(fd, off_t(size))
                }
                let page = UInt64(Self.pageSize)
                for p in file.pages.keys.sorted() where p * page < size {
                    let old = file.pages[p] ?? [], new = newContent[p] ?? []
                    var bytes = [UInt8](repeating: 0, count: Int(min(page, size - p * page)))
                    // Bytes r of `from` (zeros past its end) into `bytes`, clipped to its length.
                    func take(_ from: [UInt8], _ r: Range<Int>) {
                        let r = r.clamped(to: 0..<bytes.count)
                        guard !r.isEmpty else { return }
                        let copied = r.clamped(to: 0..<from.count)
                        bytes.withUnsafeMutableBytes { dst in
                            if !copied.isEmpty {
                                from.withUnsafeBytes { src in
                                    dst.baseAddress!.advanced(by: copied.lowerBound)
                                        .copyMemory(from: src.baseAddress!.advanced(by: copied.lowerBound), byteCount: copied.count)
                                }
                            }
                            let zeroFrom = copied.isEmpty ? r.lowerBound : copied.upperBound
                            if zeroFrom < r.upperBound {
                                dst.baseAddress!.advanced(by: zeroFrom).initializeMemory(as: UInt8.self, repeating: 0, count: r.upperBound - zeroFrom)
                            }
                        }
                    }
                    switch Int.random(in: 0..<3, using: &rng) {
                    case 0:
                        take(new, 0..<Self.pageSize)
                        report.pagesNew += 1
                    case 1:
                        take(old, 0..<Self.pageSize)
                        report.pagesOld += 1
                    default:
                        for sector in stride(from: 0, to: Self.pageSize, by: Self.sectorSize) {
                            take(Bool.random(using: &rng) ? new : old, sector..<sector + Self.sectorSize)
                        }
                        report.pagesTorn += 1
                    }
                    _ = bytes.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, off_t(p * page)) }
                }
                _ = fsync(fd)
            }
            for (directory, last) in s.lmdbLastCommit where !last.synced && Bool.random(using: &rng) {
                let fd = open(directory + "/data.mdb", O_RDWR | O_CLOEXEC)
                guard fd >= 0 else { continue }
                _ = last.metaPages.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
                _ = fsync(fd)
                close(fd)
                report.lmdbCommitsLost += 1
            }
            s = State()
            return report
        }
    }

    /// Page `p` of the file as far as `size` reaches (empty past it).
    private static func readPage(_ fd: Int32, _ p: UInt64, size: UInt64) -> [UInt8] {
        let start = p * UInt64(pageSize)
        guard start < size else { return [] }
        var bytes = [UInt8](repeating: 0, count: Int(min(UInt64(pageSize), size - start)))
        let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, off_t(start)) }
        if n >= 0 && n < bytes.count { bytes.removeLast(bytes.count - n) }
        return bytes
    }

    /// LMDB's two meta pages (the first two pages of data.mdb).
    private static func metaPages(_ directory: String) -> [UInt8] {
        let fd = open(directory + "/data.mdb", O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { return [] }
        defer { close(fd) }
        var bytes = [UInt8](repeating: 0, count: 2 * pageSize)
        let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, 0) }
        return n == bytes.count ? bytes : []
    }
}
