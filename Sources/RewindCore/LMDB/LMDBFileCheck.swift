import Glibc

/// Checks an existing `data.mdb` against its own meta pages before LMDB maps it.
///
/// LMDB maps the whole file and trusts it: a truncated file makes the first read of a page
/// past its end a SIGBUS inside liblmdb. Both meta pages are read with `pread`; the newer
/// valid one (highest transaction id, as LMDB picks) names the last page in use, and the file
/// must reach it. Layout (LMDB 0.9, 64-bit; `MDB_page` header 16 bytes, then `MDB_meta`):
/// ```
/// page offset  16  4  mm_magic     0xBEEFC0DE
///              20  4  mm_version   1
///              40  4  mm_dbs[FREE_DBI].md_pad: the page size
///             136  8  mm_last_pg   last page in use
///             144  8  mm_txnid     transaction id
/// ```
/// Meta page 0 is at offset 0, meta page 1 at one page size.
enum LMDBFileCheck {
    static let magic: UInt32 = 0xBEEF_C0DE
    static let dataVersion: UInt32 = 1

    struct Meta { var pageSize: UInt64; var lastPage: UInt64; var txnid: UInt64 }

    /// Throws `damagedMirror` naming the file when it cannot hold what its meta pages say.
    /// A missing file is left to LMDB (a new environment); `mustExist` refuses a missing or empty one.
    static func check(_ file: String, mustExist: Bool) throws {
        let mirror = mirrorPath(of: file)
        let fd = open(file, O_RDONLY | O_CLOEXEC)
        if fd < 0 {
            guard mustExist || errno != ENOENT else { return }
            throw RewindError.io(path: file, operation: "open", errno: errno)
        }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw RewindError.io(path: file, operation: "fstat", errno: errno) }
        let size = UInt64(st.st_size)
        if size == 0 {
            guard mustExist else { return }
            throw RewindError.damagedMirror(path: mirror, why: "journal/data.mdb is empty")
        }
        let first = read(fd, at: 0)
        let pageSize = first?.pageSize ?? 4096
        let second = read(fd, at: pageSize)
        guard let newest = [first, second].compactMap({ $0 }).max(by: { $0.txnid < $1.txnid }) else {
            throw RewindError.damagedMirror(path: mirror, why: "journal/data.mdb has no valid LMDB meta page (\(size) bytes)")
        }
        // LMDB writes transaction t's meta to page t % 2, and with MDB_NOMETASYNC at most the
        // last of those writes can be lost, so the pages hold two consecutive transactions.
        // Anything else is a damaged meta page, which LMDB would follow silently: back to an
        // older transaction, or to one that never was.
        if let a = first, let b = second {
            guard a.txnid % 2 == 0 || a.txnid == 0, b.txnid % 2 == 1,
                  a.txnid &+ 1 == b.txnid || b.txnid &+ 1 == a.txnid else {
                throw RewindError.damagedMirror(path: mirror, why: "journal/data.mdb's meta pages name transactions \(a.txnid) and \(b.txnid), not two consecutive ones: one of them is damaged")
            }
        } else {
            let bad = first == nil ? 0 : 1
            throw RewindError.damagedMirror(path: mirror, why: "journal/data.mdb's meta page \(bad) is damaged (LMDB would fall back to transaction \(newest.txnid) of page \(1 - bad))")
        }
        let needed = (newest.lastPage &+ 1) &* newest.pageSize
        guard newest.lastPage < UInt64(Int.max) / newest.pageSize, size >= needed else {
            throw RewindError.damagedMirror(path: mirror, why: "journal/data.mdb is \(size) bytes but its meta page (transaction \(newest.txnid)) says it holds \(needed): the file is truncated or its meta page damaged")
        }
    }

    private static func read(_ fd: Int32, at offset: UInt64) -> Meta? {
        var buf = [UInt8](repeating: 0, count: 152)
        let n = buf.withUnsafeMutableBytes { pread(fd, $0.baseAddress, $0.count, off_t(offset)) }
        guard n == buf.count else { return nil }
        return buf.withUnsafeBytes { raw -> Meta? in
            guard raw.loadLE(at: 16, as: UInt32.self) == magic, raw.loadLE(at: 20, as: UInt32.self) == dataVersion else { return nil }
            let pageSize = UInt64(raw.loadLE(at: 40, as: UInt32.self))
            guard pageSize >= 512, pageSize <= 65536, pageSize & (pageSize - 1) == 0 else { return nil }
            return Meta(pageSize: pageSize, lastPage: raw.loadLE(at: 136, as: UInt64.self), txnid: raw.loadLE(at: 144, as: UInt64.self))
        }
    }

    /// MIRROR for MIRROR/journal/data.mdb (errors name the mirror, as every other does).
    private static func mirrorPath(of file: String) -> String {
        var parts = file.split(separator: "/", omittingEmptySubsequences: false)
        if parts.count >= 2 { parts.removeLast(2) }
        let joined = parts.joined(separator: "/")
        return joined.isEmpty ? (file.hasPrefix("/") ? "/" : ".") : joined
    }
}
