import ArgumentParser
import RewindCore

/// rewind: continuous data protection and block replication for NBD volumes.
struct Rewind: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rewind",
        abstract: "Continuous data protection for block volumes: a mirror (base image + LMDB journal) you can bring back to any moment.",
        version: "0.1.0",
        subcommands: [InitCommand.self, TimelineCommand.self, BookmarkCommand.self, BookmarksCommand.self,
                      RestoreCommand.self, RollbackCommand.self, CompactCommand.self, VerifyCommand.self,
                      StatusCommand.self])
}

tuneAllocatorForLargeBuffers()
Rewind.main()
