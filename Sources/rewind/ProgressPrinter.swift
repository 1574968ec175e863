import Foundation
import RewindCore

/// Prints progress on stderr once work has run for a second: a rewriting line on a terminal,
/// a line every five seconds otherwise (logs, CI).
final class ProgressPrinter: ProgressObserver {
    private let command: String
    private var phase = ""
    private var total: UInt64 = 0
    private var started: UInt64 = 0
    private var lastPrint: UInt64 = 0
    private var printed = false
    private let tty = isatty(2) != 0

    init(command: String) { self.command = command }

    func begin(phase: String, total: UInt64) {
        self.phase = phase; self.total = total
        started = monotonicNanoseconds(); lastPrint = started; printed = false
    }

    func update(done: UInt64) {
        let now = monotonicNanoseconds()
        guard now - started > 1_000_000_000, now - lastPrint > (tty ? 200_000_000 : 5_000_000_000) || !printed else { return }
        lastPrint = now
        printed = true
        let pct = total > 0 ? min(100, Double(done) * 100 / Double(total)) : 0
        let line = String(format: "%@: %@ %.0f%% (%llu of %llu)", command, phase, pct, done, total)
        FileHandle.standardError.write(Data((tty ? "\r\u{1B}[K" + line : line + "\n").utf8))
    }

    func end() {
        if printed && tty { FileHandle.standardError.write(Data("\r\u{1B}[K\(command): \(phase) done\n".utf8)) }
        printed = false
    }
}
