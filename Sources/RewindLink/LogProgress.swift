import Foundation
import Logging
import RewindCore

/// Progress of long work inside a daemon (hashing a stale copy, rebuilding base.sums, building
/// a point's checksum tree), as log lines: the start, then at most one line every 5 s with the
/// fraction done, then the end with the time it took.
final class LogProgress: ProgressObserver, @unchecked Sendable {
    private let logger: Logger
    private let prefix: String
    private var phase = ""
    private var total: UInt64 = 0
    private var started = Date()
    private var lastLine = Date()

    init(logger: Logger, prefix: String) {
        self.logger = logger
        self.prefix = prefix
    }

    func begin(phase: String, total: UInt64) {
        self.phase = phase
        self.total = total
        started = Date()
        lastLine = started
        logger.info("\(prefix): \(phase)…")
    }

    func update(done: UInt64) {
        guard Date().timeIntervalSince(lastLine) >= 5 else { return }
        lastLine = Date()
        let percent = total > 0 ? String(format: " (%.0f %%)", Double(done) * 100 / Double(total)) : ""
        logger.info("\(prefix): \(phase): \(done) of \(total)\(percent)")
    }

    func end() {
        logger.info("\(prefix): \(phase): done in \(String(format: "%.1f", Date().timeIntervalSince(started))) s")
    }
}
