import ArgumentParser
import RewindCore

struct PromoteCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "promote",
        abstract: "Fail over: make a replica's mirror an origin, its newest point (or --at POINT) written to SOURCE.",
        discussion: "Stop `rewind receive` first. Then `rewind serve SOURCE --mirror MIRROR` continues the volume with the same UUID and the next seq; the generation is raised, so the old origin's stream is refused by this unit and its peers. The old origin rejoins as a receiver of the new one (its mirror moved aside: it is seeded again).")

    @Argument(help: "The replica's mirror directory.") var mirror: String
    @Option(help: "The new source image: a new file, or with --force an existing file or block device.") var to: String
    @Option(help: "The point to continue from (default: the newest); records after it are removed.", transform: parsePoint) var at: Point?
    @Flag(help: "Overwrite SOURCE if it exists.") var force = false
    @Flag(help: "Print the result as JSON.") var json = false

    func run() throws {
        try reporting {
            let m = try openMirror(mirror)
            let r = try m.promote(at: at ?? .latest, to: to, force: force, progress: ProgressPrinter(command: "promote"))
            if json { printJSON(r) } else {
                var line = "promoted \(mirror) at seq:\(r.seq) to generation \(r.generation); \(to) holds the volume (\(humanBytes(r.bytes)))"
                if r.recordsRemoved > 0 { line += "; \(r.recordsRemoved) later records removed" }
                print(line)
                print("continue with: rewind serve \(shellWord(to)) --mirror \(shellWord(mirror))")
            }
        }
    }
}
