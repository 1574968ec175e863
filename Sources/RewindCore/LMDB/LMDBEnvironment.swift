import CLMDB
import Glibc

/// One LMDB environment (a `data.mdb` + `lock.mdb` directory).
///
/// Opened with `MDB_NOTLS` so a read transaction is not tied to the thread that began it
/// (Swift tasks hop threads), and `MDB_NOMETASYNC`: each commit fdatasyncs the data pages
/// but not the meta page, so a power loss can drop at most the last commit and never
/// corrupts the tree; `sync()` (NBD FLUSH/FUA) makes everything committed durable.
public final class LMDBEnvironment: @unchecked Sendable {
    let env: OpaquePointer

    /// Address space reserved for the map. It is not allocated on disk; the file grows as
    /// pages are used. 1 TiB leaves room for any journal this machine class will hold.
    public static let defaultMapSizeBytes = 1 << 40
    static let maxNamedDatabases: UInt32 = 16

    public init(directory: String, mapSizeBytes: Int = defaultMapSizeBytes, syncEachCommit: Bool = true) throws {
        var handle: OpaquePointer?
        try check(mdb_env_create(&handle), "mdb_env_create")
        guard let handle else { throw LMDBError(code: EINVAL, operation: "mdb_env_create") }
        env = handle
        // From here a throw still runs deinit (the object is fully initialised), which closes env.
        try check(mdb_env_set_maxdbs(env, Self.maxNamedDatabases), "mdb_env_set_maxdbs")
        try check(mdb_env_set_mapsize(env, mapSizeBytes), "mdb_env_set_mapsize")
        try check(mdb_env_set_maxreaders(env, 256), "mdb_env_set_maxreaders")
        var flags = UInt32(MDB_NOTLS | MDB_NORDAHEAD)
        flags |= syncEachCommit ? UInt32(MDB_NOMETASYNC) : UInt32(MDB_NOSYNC)
        try check(mdb_env_open(env, directory, flags, 0o644), "mdb_env_open(\(directory))")
        var dead: Int32 = 0
        _ = mdb_reader_check(env, &dead)  // clear reader slots left by killed processes
    }

    deinit { mdb_env_close(env) }

    /// Flush every committed transaction to disk. The corresponding C function is `mdb_env_sync(env, 1)`.
    public func sync() throws {
        try check(mdb_env_sync(env, 1), "mdb_env_sync")
    }

    /// Bytes the environment's data file spans (last used page × page size).
    public func usedBytes() throws -> UInt64 {
        var info = MDB_envinfo()
        var stat = MDB_stat()
        try check(mdb_env_info(env, &info), "mdb_env_info")
        try check(mdb_env_stat(env, &stat), "mdb_env_stat")
        return UInt64(info.me_last_pgno + 1) * UInt64(stat.ms_psize)
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
        try check(mdb_txn_commit(txn.txn), "mdb_txn_commit")
        return result
    }

    /// Open (or with `create`, create) named databases; the handles stay valid for the
    /// environment's lifetime. Uses a write transaction only when creating, so read-only
    /// commands never wait for a live writer.
    public func openDatabases(_ names: [String], create: Bool) throws -> [LMDBDatabase] {
        let txn = try begin(readOnly: !create)
        do {
            let dbs = try names.map { try txn.openDatabase($0, create: create) }
            try check(mdb_txn_commit(txn.txn), "mdb_txn_commit")
            return dbs
        } catch {
            mdb_txn_abort(txn.txn)
            throw error
        }
    }

    /// A long-lived read transaction the caller ends with `LMDBTransaction.abort()`.
    public func beginRead() throws -> LMDBTransaction { try begin(readOnly: true) }

    private func begin(readOnly: Bool) throws -> LMDBTransaction {
        var txn: OpaquePointer?
        try check(mdb_txn_begin(env, nil, readOnly ? UInt32(MDB_RDONLY) : 0, &txn), "mdb_txn_begin")
        guard let txn else { throw LMDBError(code: EINVAL, operation: "mdb_txn_begin") }
        return LMDBTransaction(txn: txn)
    }
}
