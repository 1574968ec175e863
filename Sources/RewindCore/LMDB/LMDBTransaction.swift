import CLMDB
import CLMDBGuard
import Glibc

/// A named database handle; valid for the environment's lifetime once opened.
public struct LMDBDatabase: Sendable {
    let dbi: MDB_dbi
}

/// One LMDB transaction. Values returned by `get` point into the map and stay valid
/// until the transaction ends or (in a write transaction) the next update.
///
/// Every read goes through CLMDB's guarded calls: a fault inside LMDB (a damaged page) comes
/// back as an error, and in a read transaction a key or value that does not lie inside the
/// data file (`mapBounds`) is refused as MDB_CORRUPTED before anyone reads it.
public struct LMDBTransaction {
    let txn: OpaquePointer
    /// [start, end) of the data file in the map for a read transaction; (nil, nil) otherwise.
    let mapBounds: (UnsafePointer<CChar>?, UnsafePointer<CChar>?)

    init(txn: OpaquePointer, mapBounds: (UnsafePointer<CChar>?, UnsafePointer<CChar>?) = (nil, nil)) {
        self.txn = txn
        self.mapBounds = mapBounds
    }

    public func abort() { mdb_txn_abort(txn) }

    /// Commit a write transaction (`mdb_txn_commit`); the handle is gone either way.
    public func commit() throws { try LMDBEnvironment.commit(txn) }

    public func openDatabase(_ name: String, create: Bool) throws -> LMDBDatabase {
        var dbi: MDB_dbi = 0
        try check(rewind_mdb_dbi_open(txn, name, create ? UInt32(MDB_CREATE) : 0, &dbi), "mdb_dbi_open(\(name))")
        return LMDBDatabase(dbi: dbi)
    }

    /// The value under `key`, or nil. The corresponding C function is `mdb_get`.
    public func get(_ db: LMDBDatabase, _ key: UnsafeRawBufferPointer) throws -> UnsafeRawBufferPointer? {
        var k = MDB_val(mv_size: key.count, mv_data: UnsafeMutableRawPointer(mutating: key.baseAddress))
        var v = MDB_val()
        let rc = rewind_mdb_get(txn, db.dbi, &k, &v, mapBounds.0, mapBounds.1)
        if rc == MDB_NOTFOUND { return nil }
        try check(rc, "mdb_get")
        return UnsafeRawBufferPointer(start: v.mv_data, count: v.mv_size)
    }

    public func get(_ db: LMDBDatabase, _ key: [UInt8]) throws -> UnsafeRawBufferPointer? {
        try key.withUnsafeBytes { try get(db, $0) }
    }

    /// Store `value` under `key`. `append` (MDB_APPEND) requires the key to sort last and
    /// packs pages full, which keeps sequential tables dense.
    public func put(_ db: LMDBDatabase, _ key: UnsafeRawBufferPointer, _ value: UnsafeRawBufferPointer, append: Bool = false) throws {
        var k = MDB_val(mv_size: key.count, mv_data: UnsafeMutableRawPointer(mutating: key.baseAddress))
        var v = MDB_val(mv_size: value.count, mv_data: UnsafeMutableRawPointer(mutating: value.baseAddress))
        try check(mdb_put(txn, db.dbi, &k, &v, append ? UInt32(MDB_APPEND) : 0), "mdb_put")
    }

    public func put(_ db: LMDBDatabase, _ key: [UInt8], _ value: [UInt8], append: Bool = false) throws {
        try key.withUnsafeBytes { k in try value.withUnsafeBytes { v in try put(db, k, v, append: append) } }
    }

    /// Delete `key`; returns false if it was not there.
    @discardableResult
    public func delete(_ db: LMDBDatabase, _ key: [UInt8]) throws -> Bool {
        try key.withUnsafeBytes { kb in
            var k = MDB_val(mv_size: kb.count, mv_data: UnsafeMutableRawPointer(mutating: kb.baseAddress))
            let rc = mdb_del(txn, db.dbi, &k, nil)
            if rc == MDB_NOTFOUND { return false }
            try check(rc, "mdb_del")
            return true
        }
    }

    public func cursor(_ db: LMDBDatabase) throws -> LMDBCursor {
        var c: OpaquePointer?
        try check(rewind_mdb_cursor_open(txn, db.dbi, &c), "mdb_cursor_open")
        guard let c else { throw LMDBError(code: EINVAL, operation: "mdb_cursor_open") }
        return LMDBCursor(cursor: c, mapBounds: mapBounds)
    }

    /// Number of entries in `db`.
    public func count(_ db: LMDBDatabase) throws -> Int {
        var stat = MDB_stat()
        try check(rewind_mdb_stat(txn, db.dbi, &stat), "mdb_stat")
        return stat.ms_entries
    }
}

/// A cursor over one database. Close it before its transaction ends.
public final class LMDBCursor {
    let cursor: OpaquePointer
    let mapBounds: (UnsafePointer<CChar>?, UnsafePointer<CChar>?)
    public typealias Entry = (key: UnsafeRawBufferPointer, value: UnsafeRawBufferPointer)

    init(cursor: OpaquePointer, mapBounds: (UnsafePointer<CChar>?, UnsafePointer<CChar>?)) {
        self.cursor = cursor
        self.mapBounds = mapBounds
    }
    deinit { mdb_cursor_close(cursor) }

    private func op(_ operation: MDB_cursor_op, key: UnsafeRawBufferPointer? = nil) throws -> Entry? {
        var k = MDB_val(mv_size: key?.count ?? 0, mv_data: UnsafeMutableRawPointer(mutating: key?.baseAddress))
        var v = MDB_val()
        let rc = rewind_mdb_cursor_get(cursor, &k, &v, operation, mapBounds.0, mapBounds.1)
        if rc == MDB_NOTFOUND { return nil }
        try check(rc, "mdb_cursor_get")
        return (UnsafeRawBufferPointer(start: k.mv_data, count: k.mv_size),
                UnsafeRawBufferPointer(start: v.mv_data, count: v.mv_size))
    }

    public func first() throws -> Entry? { try op(MDB_FIRST) }
    public func last() throws -> Entry? { try op(MDB_LAST) }
    public func next() throws -> Entry? { try op(MDB_NEXT) }
    public func previous() throws -> Entry? { try op(MDB_PREV) }
    /// The first entry whose key is >= `key`. The corresponding C operation is `MDB_SET_RANGE`.
    public func seek(atLeast key: [UInt8]) throws -> Entry? {
        try key.withUnsafeBytes { try op(MDB_SET_RANGE, key: $0) }
    }
    /// Delete the entry the cursor is on. The corresponding C function is `mdb_cursor_del`.
    public func deleteCurrent() throws {
        try check(mdb_cursor_del(cursor, 0), "mdb_cursor_del")
    }
}
