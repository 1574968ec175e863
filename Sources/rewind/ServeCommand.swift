import ArgumentParser
import Foundation
import RewindCore
import RewindDaemon

struct ServeCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Serve SOURCE over NBD; every write-nature command is also journalled into its mirror.")

    @Argument(help: "The volume: a raw image or block device (created sparse with --size if missing).") var source: String?
    @Option(help: "Create SOURCE of this size if it does not exist.", transform: parseSize) var size: UInt64?
    @OptionGroup var common: DaemonOptionGroup

    func run() async throws {
        try await reportingAsync {
            let file = try common.readConfig(for: .serve)
            guard let path = source ?? file?.source else {
                throw ValidationError("give SOURCE (or `source = \"...\"` in the config file)")
            }
            var o = ServeOptions(source: path)
            var set: Set<String> = []
            if let size { o.size = size; set.insert("size") }
            try common.apply(to: &o, set: &set)
            if let file { o.apply(config: file, setOnCommandLine: set) }
            try common.finish(&o)
            // A fenced volume stops with exit status 3 (its reason is already in the log).
            guard try await ServeDaemon.run(o, progress: ProgressPrinter(command: "serve")) else { throw ExitCode(3) }
        }
    }
}
