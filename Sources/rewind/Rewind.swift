import ArgumentParser
import RewindCore

/// rewind: continuous data protection and block replication for NBD volumes.
@main
struct Rewind: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rewind",
        abstract: "Continuous data protection for block volumes: a mirror (base image + LMDB journal) you can bring back to any moment.",
        version: "0.1.0",
        subcommands: [ServeCommand.self, InitCommand.self, TimelineCommand.self, BookmarkCommand.self, BookmarksCommand.self,
                      RestoreCommand.self, RollbackCommand.self, CompactCommand.self, VerifyCommand.self,
                      StatusCommand.self])

    static func main() async {
        tuneAllocatorForLargeBuffers()
        do {
            var command = try parseAsRoot()
            if var asyncCommand = command as? AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch {
            exit(withError: error)
        }
    }
}
