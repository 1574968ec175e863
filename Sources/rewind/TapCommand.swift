import ArgumentParser
import Foundation
import RewindCore
import RewindDaemon

struct TapCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "tap",
        abstract: "Stand between NBD clients and an existing NBD server: forward every command, journal the writes the upstream completed.")

    @Option(help: "The NBD server to protect: nbd://HOST[:PORT]/NAME or nbd+unix:///NAME?socket=PATH.") var upstream: String?
    @Option(help: "At start, compare the mirror with the upstream and journal what differs: auto (after a stop that was not clean, or a journal that moved since), full (always) or none.")
    var check: String?
    @OptionGroup var common: DaemonOptionGroup

    func run() async throws {
        try await reportingAsync {
            let file = try common.readConfig(for: .tap)
            guard let uri = upstream ?? file?.values.upstream else {
                throw ValidationError("give --upstream NBD-URI (or `upstream = \"...\"` in the config file)")
            }
            var o = ServeOptions(source: uri)
            var set: Set<String> = []
            if let check {
                guard let c = TapDaemon.Check(rawValue: check) else { throw ValidationError("invalid --check \"\(check)\": use auto, full or none") }
                o.check = c
                set.insert("check")
            }
            try common.apply(to: &o, set: &set)
            if let file { o.apply(config: file, setOnCommandLine: set) }
            try common.finish(&o)
            guard try await TapDaemon.run(o, progress: ProgressPrinter(command: "tap")) else { throw ExitCode(3) }
        }
    }
}
