import Glibc

/// Fault injection for crash tests, in the manner of SQLite's and ztest's: with
/// `REWIND_CRASH_AT=NAME` (or `NAME:N` for the Nth time it is reached) in the environment,
/// the process SIGKILLs itself at that named step. Unset, a hit costs one comparison.
enum CrashPoint {
    private static let spec: (name: String, count: Int)? = {
        guard let raw = getenv("REWIND_CRASH_AT") else { return nil }
        let text = String(cString: raw)
        let parts = text.split(separator: ":")
        let count = parts.count == 2 ? Int(parts[1]) ?? 1 : 1
        return (String(parts[0]), count)
    }()
    nonisolated(unsafe) private static var hits = 0

    /// Names, in the order a compaction and a rollback reach them.
    static let names = ["compact.target-recorded", "compact.folded", "compact.base-synced", "compact.index-chunk-deleted",
                        "compact.records-deleted", "rollback.target-recorded", "rollback.source-reverted",
                        "rollback.index-chunk-deleted", "rollback.records-deleted"]

    static func hit(_ name: String) {
        guard let spec, spec.name == name else { return }
        hits += 1
        if hits >= spec.count { kill(getpid(), SIGKILL) }
    }
}
