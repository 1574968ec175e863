import CLMDB

/// An LMDB return code turned into a typed error; `operation` names the C call that failed.
public struct LMDBError: Error, CustomStringConvertible, Sendable {
    public let code: Int32
    public let operation: String

    public var description: String {
        let text = String(cString: mdb_strerror(code))
        return "LMDB \(operation) failed: \(text) (\(code))"
    }

    /// The map (the journal's address-space reservation) is full: MDB_MAP_FULL.
    public var isMapFull: Bool { code == MDB_MAP_FULL }
    /// The environment is not an LMDB file or is of another version: MDB_INVALID / MDB_VERSION_MISMATCH.
    public var isInvalid: Bool { code == MDB_INVALID || code == MDB_VERSION_MISMATCH }
    public var isCorrupted: Bool { code == MDB_CORRUPTED || code == MDB_PAGE_NOTFOUND }
}

@inline(__always)
func check(_ rc: Int32, _ operation: String) throws {
    if rc != 0 { throw LMDBError(code: rc, operation: operation) }
}
