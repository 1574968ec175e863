import ArgumentParser
import Foundation
import RewindCore

/// rewind: continuous data protection and block replication for NBD volumes.
@main
struct Rewind: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rewind",
        abstract: "Continuous data protection for block volumes: a mirror (base image + LMDB journal) you can bring back to any moment.",
        version: "0.1.0",
        subcommands: [ServeCommand.self, TapCommand.self, InitCommand.self, TimelineCommand.self, BookmarkCommand.self, BookmarksCommand.self,
                      RestoreCommand.self, RollbackCommand.self, ExportCommand.self, CompactCommand.self, VerifyCommand.self,
                      StatusCommand.self, IdCommand.self, ReceiveCommand.self, PromoteCommand.self, ResyncCommand.self,
                      ForgetPeerCommand.self])

    static func main() async {
        tuneAllocatorForLargeBuffers()
        defer { reportPeakMemory() }
        do {
            var command = try parseAsRoot()
            if var asyncCommand = command as? AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch {
            reportPeakMemory()
            exit(withError: error)
        }
    }

    /// For benchmarks: with REWIND_PEAK_RSS_FILE set, write this process's peak resident size
    /// (VmHWM, KiB) there at exit. rusage from the parent would inherit the parent's peak.
    static func reportPeakMemory() {
        guard let path = ProcessInfo.processInfo.environment["REWIND_PEAK_RSS_FILE"],
              let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
              let line = status.split(separator: "\n").first(where: { $0.hasPrefix("VmHWM:") }) else { return }
        let kib = line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "0"
        try? String(kib).write(toFile: path, atomically: false, encoding: .utf8)
    }
}
