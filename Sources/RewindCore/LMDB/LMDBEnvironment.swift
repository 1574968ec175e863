import CLMDB
import CLMDBGuard
import Foundation
import Glibc
import Synchronization

/// One LMDB environment (a `data.mdb` + `lock.mdb` directory).
///
/// Opened with `MDB_NOTLS` so a read transaction is not tied to the thread that began it
/// (Swift tasks hop threads), and `MDB_NOMETASYNC`: each commit fdatasyncs the data pages
/// but not the meta page, so a power loss can drop at most the last commit and never
/// corrupts the tree; `sync()` makes everything committed durable. (An NBD FLUSH syncs the
/// payload log instead: see `JournalWriter`.)
public final class LMDBEnvironment: @unchecked Sendable {
    let env: OpaquePointer
    let directory: String
    /// Read transactions kept reset between `readPooled` calls (each keeps its reader slot).
    private let idleReads = Mutex<[IdleRead]>([])
    /// A reset read transaction; only ever used by one caller at a time.
    private struct IdleRead: @unchecked Sendable { let txn: OpaquePointer }
    /// At most this many are kept; more at once are begun and aborted as usual.
    static let idleReadsMax = 16

    /// Bounds of the map (address space, not disk: the file grows as pages are used).
    static let minMapSizeBytes: UInt64 = 1 << 30
    static let maxMapSizeBytes: UInt64 = 64 << 40
    /// The map when the file system's size cannot be read.
    static let fallbackMapSizeBytes = 1 << 40

    /// The map for an environment in `directory`: the size of the file system that holds it,
    /// in whole GiB, within [1 GiB, 64 TiB]. LMDB's map is a ceiling on the data file, and
    /// growing it needs every transaction of the process closed — a served volume's readers
    /// never are — so it is sized once per open to what the data file can ever reach: the
    /// data file cannot outgrow its file system. It follows the file system: a file system
    /// grown while a server runs is used from the next start (until then a full map is a full
    /// journal, handled by the journal-full policy), and the map never stops a journal that
    /// still has disk to grow into. (Until format 3 the map was a fixed 1 TiB.)
    public static func mapSizeBytes(forDirectory directory: String) -> Int {
        var fs = statvfs()
        guard statvfs(directory, &fs) == 0 else { return fallbackMapSizeBytes }
        let bytes = UInt64(fs.f_blocks).multipliedReportingOverflow(by: UInt64(fs.f_frsize))
        guard !bytes.overflow else { return Int(maxMapSizeBytes) }
        let gib = minMapSizeBytes
        let rounded = bytes.partialValue / gib * gib + (bytes.partialValue % gib == 0 ? 0 : gib)
        return Int(min(max(rounded, minMapSizeBytes), maxMapSizeBytes))
    }
    static let maxNamedDatabases: UInt32 = 16

    /// `mustExist`: the environment is an existing one (a mirror's journal): a missing, empty
    /// or truncated data.mdb is reported as damage instead of being created or mapped.
    /// `mapSizeBytes`: nil sizes the map to the directory's file system (`mapSizeBytes(forDirectory:)`).
    public init(directory: String, mapSizeBytes: Int? = nil, syncEachCommit: Bool = true,
                mustExist: Bool = false) throws {
        self.directory = directory
        var handle: OpaquePointer?
        try check(mdb_env_create(&handle), "mdb_env_create")
        guard let handle else { throw LMDBError(code: EINVAL, operation: "mdb_env_create") }
        env = handle
        // From here a throw still runs deinit (the object is fully initialised), which closes env.
        _ = rewind_mdb_set_assert(env)  // a failed LMDB assertion in a guarded read is an error
        try check(mdb_env_set_maxdbs(env, Self.maxNamedDatabases), "mdb_env_set_maxdbs")
        try check(mdb_env_set_mapsize(env, mapSizeBytes ?? Self.mapSizeBytes(forDirectory: directory)), "mdb_env_set_mapsize")
        try check(mdb_env_set_maxreaders(env, 256), "mdb_env_set_maxreaders")
        var flags = UInt32(MDB_NOTLS | MDB_NORDAHEAD)
        flags |= syncEachCommit ? UInt32(MDB_NOMETASYNC) : UInt32(MDB_NOSYNC)
        _ = Self.faultGuardInstalled
        try LMDBFileCheck.check(directory + "/data.mdb", mustExist: mustExist)
        try check(mdb_env_open(env, directory, flags, 0o644), "mdb_env_open(\(directory))")
        _ = findMap()
        var dead: Int32 = 0
        _ = mdb_reader_check(env, &dead)  // clear reader slots left by killed processes
    }

    deinit {
        for idle in idleReads.withLock({ $0 }) { mdb_txn_abort(idle.txn) }
        mdb_env_close(env)
    }

    /// Flush every committed transaction to disk. The corresponding C function is `mdb_env_sync(env, 1)`.
    public func sync() throws {
        guard let layer = Storage.layer(for: directory) else { return try check(mdb_env_sync(env, 1), "mdb_env_sync") }
        try layer.lmdbSync(directory) { try check(mdb_env_sync(env, 1), "mdb_env_sync") }
    }

    /// `mdb_txn_commit`, through the storage layer covering the environment if a test
    /// installed one (`Storage`); the handle is gone either way.
    static func commit(_ txn: OpaquePointer) throws {
        guard Storage.active, let directory = directory(of: txn), let layer = Storage.layer(for: directory) else {
            return try check(mdb_txn_commit(txn), "mdb_txn_commit")
        }
        var ran = false
        do {
            try layer.lmdbCommit(directory) {
                ran = true
                try check(mdb_txn_commit(txn), "mdb_txn_commit")
            }
        } catch {
            if !ran { mdb_txn_abort(txn) }
            throw error
        }
        if !ran {
            mdb_txn_abort(txn)
            throw LMDBError(code: EIO, operation: "mdb_txn_commit")
        }
    }

    /// The directory of the environment `txn` belongs to (`mdb_env_get_path`).
    private static func directory(of txn: OpaquePointer) -> String? {
        var path: UnsafePointer<CChar>?
        guard let env = mdb_txn_env(txn), mdb_env_get_path(env, &path) == 0, let path else { return nil }
        return String(cString: path)
    }

    /// Drop this process's page-table entries for the map (`madvise(MADV_DONTNEED)` on a
    /// shared file mapping; the page cache keeps the data). LMDB reads through the map, so
    /// without this a long-running writer's resident size grows with the journal.
    /// LMDB does not expose its map's address (`me_mapaddr` is set only with MDB_FIXEDMAP),
    /// so it is found once in /proc/self/maps by the data file's path.
    /// `releaseMappedPages()` once this process's file-backed resident memory passes `limit`
    /// bytes. Each page a writer's index update faults in maps the whole page-cache folio
    /// around it — up to 2 MiB of recently written journal on Linux 6.x — so a once-a-second
    /// release let a random-write load map 650 MiB; this check costs one `pread` of
    /// /proc/self/statm. Returns true if it released.
    @discardableResult
    public func releaseMappedPages(ifResidentAbove limit: Int) -> Bool {
        guard Self.residentFileBytes() > limit else { return false }
        return releaseMappedPages() == 0
    }

    /// Resident file-backed and shared memory of this process (`/proc/self/statm`, third field),
    /// read with one `pread` of a descriptor kept open (under a microsecond).
    static func residentFileBytes() -> Int {
        guard statmDescriptor >= 0 else { return 0 }
        let pages: Int? = withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 128) { buf in
            let n = pread(statmDescriptor, buf.baseAddress, buf.count, 0)
            guard n > 0 else { return nil }
            let fields = buf[0..<n].split(separator: UInt8(ascii: " "))
            return fields.count > 2 ? Int(String(decoding: fields[2], as: UTF8.self)) : nil
        }
        return (pages ?? 0) * osPageSize
    }
    private static let statmDescriptor = open("/proc/self/statm", O_RDONLY | O_CLOEXEC)
    /// The kernel's page size (what `madvise` and `posix_fadvise` work in).
    static let osPageSize = Int(sysconf(Int32(_SC_PAGESIZE)))

    @discardableResult
    public func releaseMappedPages() -> Int32 {
        guard findMap() else { return ENOENT }
        var info = MDB_envinfo()
        var stat = MDB_stat()
        guard mdb_env_info(env, &info) == 0, mdb_env_stat(env, &stat) == 0 else { return EINVAL }
        let used = min(mapLength, Int(info.me_last_pgno + 1) * Int(stat.ms_psize))
        return madvise(UnsafeMutableRawPointer(bitPattern: mapStart), used, MADV_DONTNEED) == 0 ? 0 : errno
    }

    private var mapStart = 0
    private var mapLength = 0

    private func findMap() -> Bool {
        if mapStart == 0 {
            guard let (start, end) = Self.findMapping(of: directory + "/data.mdb") else { return false }
            (mapStart, mapLength) = (start, end - start)
        }
        return true
    }

    static func findMapping(of path: String) -> (Int, Int)? {
        guard let f = fopen("/proc/self/maps", "r") else { return nil }
        defer { fclose(f) }
        var line = [CChar](repeating: 0, count: 4096)
        let resolved = realpath(path, nil).map { p -> String in defer { free(p) }; return String(cString: p) } ?? path
        while fgets(&line, Int32(line.count), f) != nil {
            let text = String(decoding: line.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
                .trimmingCharacters(in: .newlines)
            guard text.hasSuffix(" " + resolved) else { continue }
            let range = text.prefix { $0 != " " }.split(separator: "-")
            if range.count == 2, let a = Int(range[0], radix: 16), let b = Int(range[1], radix: 16) { return (a, b) }
        }
        return nil
    }

    /// The map's size in this process (`mdb_env_info`).
    public func mapBytes() throws -> Int {
        var info = MDB_envinfo()
        try check(mdb_env_info(env, &info), "mdb_env_info")
        return Int(info.me_mapsize)
    }

    /// Bytes the environment's data file spans (last used page × page size).
    public func usedBytes() throws -> UInt64 {
        var info = MDB_envinfo()
        var stat = MDB_stat()
        try check(mdb_env_info(env, &info), "mdb_env_info")
        try check(mdb_env_stat(env, &stat), "mdb_env_stat")
        return UInt64(info.me_last_pgno + 1) * UInt64(stat.ms_psize)
    }

    /// `read` for callers that run many short reads (an export's requests): the transaction
    /// is taken from a pool of reset ones and renewed (`mdb_txn_renew`: no allocation, the
    /// reader slot kept), and reset again after — it holds no snapshot between calls.
    public func readPooled<T>(_ body: (LMDBTransaction) throws -> T) throws -> T {
        var txn: OpaquePointer
        if let idle = idleReads.withLock({ $0.popLast() }) {
            txn = idle.txn
            let rc = mdb_txn_renew(txn)
            guard rc == 0 else {
                mdb_txn_abort(txn)
                throw LMDBError(code: rc, operation: "mdb_txn_renew")
            }
        } else {
            txn = try begin(readOnly: true).txn
        }
        defer {
            mdb_txn_reset(txn)
            let reset = IdleRead(txn: txn)
            let kept = idleReads.withLock { idle -> Bool in
                guard idle.count < Self.idleReadsMax else { return false }
                idle.append(reset)
                return true
            }
            if !kept { mdb_txn_abort(txn) }
        }
        return try body(LMDBTransaction(txn: txn, mapBounds: dataFileBounds()))
    }

    /// Run `body` in a read-only transaction, aborted afterwards. Readers never block the writer.
    public func read<T>(_ body: (LMDBTransaction) throws -> T) throws -> T {
        let txn = try begin(readOnly: true)
        defer { mdb_txn_abort(txn.txn) }
        return try body(txn)
    }

    /// Run `body` in a write transaction: committed if it returns, aborted if it throws.
    /// Begins and commits on the calling thread, in one synchronous call.
    public func write<T>(_ body: (LMDBTransaction) throws -> T) throws -> T {
        let txn = try begin(readOnly: false)
        let result: T
        do {
            result = try body(txn)
        } catch {
            mdb_txn_abort(txn.txn)
            throw error
        }
        try Self.commit(txn.txn)
        return result
    }

    /// Open (or with `create`, create) named databases; the handles stay valid for the
    /// environment's lifetime. Uses a write transaction only when creating, so read-only
    /// commands never wait for a live writer.
    public func openDatabases(_ names: [String], create: Bool) throws -> [LMDBDatabase] {
        let txn = try begin(readOnly: !create)
        do {
            let dbs = try names.map { try txn.openDatabase($0, create: create) }
            try Self.commit(txn.txn)
            return dbs
        } catch {
            mdb_txn_abort(txn.txn)
            throw error
        }
    }

    /// A write transaction the caller ends with `LMDBTransaction.commit()` or `abort()`, on
    /// the same thread (LMDB's writer lock is a mutex owned by the thread that took it).
    public func beginWrite() throws -> LMDBTransaction { try begin(readOnly: false) }

    /// A long-lived read transaction the caller ends with `LMDBTransaction.abort()`.
    public func beginRead() throws -> LMDBTransaction { try begin(readOnly: true) }

    private func begin(readOnly: Bool) throws -> LMDBTransaction {
        var txn: OpaquePointer?
        // Only a read transaction's begin is guarded: a write transaction's takes LMDB's writer
        // mutex first, and a jump out of it would leave the mutex held.
        let rc = readOnly ? rewind_mdb_txn_begin(env, UInt32(MDB_RDONLY), &txn) : mdb_txn_begin(env, nil, 0, &txn)
        try check(rc, "mdb_txn_begin")
        guard let txn else { throw LMDBError(code: EINVAL, operation: "mdb_txn_begin") }
        return LMDBTransaction(txn: txn, mapBounds: readOnly ? dataFileBounds() : (nil, nil))
    }

    /// SIGBUS/SIGSEGV inside a guarded LMDB read become `REWIND_MDB_FAULT` (see CLMDB's shim).
    /// Installed once per process, before the first environment is opened.
    static let faultGuardInstalled: Bool = rewind_mdb_install_fault_guard() == 0

    /// Where the data file lies in the map now: [map start, map start + file size). A read
    /// transaction sees only pages that existed when it began, all inside this range.
    private func dataFileBounds() -> (UnsafePointer<CChar>?, UnsafePointer<CChar>?) {
        var fd: Int32 = -1
        var st = stat()
        guard mapStart != 0, mdb_env_get_fd(env, &fd) == 0, fstat(fd, &st) == 0,
              let start = UnsafePointer<CChar>(bitPattern: mapStart) else { return (nil, nil) }
        return (start, start + min(Int(st.st_size), mapLength))
    }
}
