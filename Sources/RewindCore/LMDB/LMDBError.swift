import CLMDB
import CLMDBGuard
import Glibc

/// An LMDB return code turned into a typed error; `operation` names the C call that failed.
public struct LMDBError: Error, CustomStringConvertible, Sendable {
    public let code: Int32
    public let operation: String

    public var description: String {
        if code == REWIND_MDB_FAULT {
            let signal = switch rewind_mdb_last_fault_signal() {
            case SIGBUS: "SIGBUS: a page past the end of the file"
            case SIGABRT: "its own consistency check failed"
            default: "SIGSEGV: a page pointer into nowhere"
            }
            return "the journal's index journal/data.mdb is damaged: LMDB \(operation) faulted (\(signal))"
        }
        if code == MDB_MAP_RESIZED {
            return "LMDB \(operation) failed: the journal's index grew past this process's map (its file system grew while this process ran): run the command again (\(code))"
        }
        let text = String(cString: mdb_strerror(code))
        if isCorrupted { return "the journal's index journal/data.mdb is damaged: LMDB \(operation) failed: \(text) (\(code))" }
        return "LMDB \(operation) failed: \(text) (\(code))"
    }

    /// The map (the journal's address-space reservation) is full: MDB_MAP_FULL.
    public var isMapFull: Bool { code == MDB_MAP_FULL }
    /// The environment is not an LMDB file or is of another version: MDB_INVALID / MDB_VERSION_MISMATCH.
    public var isInvalid: Bool { code == MDB_INVALID || code == MDB_VERSION_MISMATCH }
    public var isCorrupted: Bool {
        code == MDB_CORRUPTED || code == MDB_PAGE_NOTFOUND || code == REWIND_MDB_FAULT || code == MDB_INVALID || code == MDB_BAD_TXN
    }
}

@inline(__always)
func check(_ rc: Int32, _ operation: String) throws {
    if rc != 0 { throw LMDBError(code: rc, operation: operation) }
}
