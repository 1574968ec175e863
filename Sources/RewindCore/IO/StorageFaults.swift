import Synchronization

/// The one seam through which every change to the bytes of the mirror's and the source's
/// files passes — `BlockFile`'s writes, hole punches, truncations and syncs, the payload log's
/// directory syncs, LMDB's commits and syncs — so a test can stand between the engine and
/// the disk: keep what was written since the last sync, lose a random part of it at a
/// simulated power cut, or fail a chosen call with EIO or ENOSPC (`PowerCutStorage` in
/// RewindWorkload, after LevelDB's FaultInjectionTestEnv and SQLite's crash-test VFS).
///
/// In production no layer is installed, and each call costs one relaxed atomic load.
/// A layer handles only the paths it `covers` (a test's own directory): tests running beside
/// it are untouched.
public protocol StorageFaults: AnyObject, Sendable {
    /// Whether this layer stands between `path` and the disk.
    func covers(_ path: String) -> Bool
    /// `body` changes `range` of the file at `path` (a write, a hole punched, a truncation:
    /// the range the size moved over). The layer runs it, or throws instead.
    func modify(_ path: String, fd: Int32, _ range: Range<UInt64>, operation: String, _ body: () throws -> Void) throws
    /// `body` syncs the file at `path` (`fdatasync`, `fsync`, `sync_file_range`: `operation`).
    func sync(_ path: String, fd: Int32, operation: String, _ body: () throws -> Void) throws
    /// `body` commits an LMDB write transaction of the environment in `directory`; if the
    /// layer throws without running it, the transaction is aborted.
    func lmdbCommit(_ directory: String, _ body: () throws -> Void) throws
    /// `body` is `mdb_env_sync` of the environment in `directory`.
    func lmdbSync(_ directory: String, _ body: () throws -> Void) throws
}

public enum Storage {
    private static let anyInstalled = Atomic<Bool>(false)
    private static let layers = Mutex<[any StorageFaults]>([])

    /// Stand `layer` between the engine and the paths it covers, until `remove`.
    public static func install(_ layer: any StorageFaults) {
        layers.withLock { $0.append(layer) }
        anyInstalled.store(true, ordering: .releasing)
    }

    public static func remove(_ layer: any StorageFaults) {
        let empty = layers.withLock { list -> Bool in
            list.removeAll { $0 === layer }
            return list.isEmpty
        }
        if empty { anyInstalled.store(false, ordering: .releasing) }
    }

    /// Whether any layer is installed.
    @inline(__always)
    static var active: Bool { anyInstalled.load(ordering: .relaxed) }

    /// The layer covering `path`, if any (nil at once when none is installed).
    @inline(__always)
    static func layer(for path: @autoclosure () -> String) -> (any StorageFaults)? {
        guard active else { return nil }
        let p = path()
        return layers.withLock { $0.first { $0.covers(p) } }
    }

    /// Run a change to `path` through its layer, if any.
    @inline(__always)
    static func modify(_ path: String, fd: Int32, _ range: Range<UInt64>, _ operation: String, _ body: () throws -> Void) throws {
        guard let layer = layer(for: path) else { return try body() }
        try layer.modify(path, fd: fd, range, operation: operation, body)
    }

    /// Run a sync of `path` through its layer, if any.
    @inline(__always)
    static func sync(_ path: String, fd: Int32, _ operation: String, _ body: () throws -> Void) throws {
        guard let layer = layer(for: path) else { return try body() }
        try layer.sync(path, fd: fd, operation: operation, body)
    }
}
