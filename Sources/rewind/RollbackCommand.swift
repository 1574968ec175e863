import ArgumentParser
import RewindCore

struct RollbackCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "rollback",
        abstract: "Cut the mirror back to a point, discarding later records; with --source, revert the source in place.")

    @Argument(help: "The mirror directory.") var mirror: String
    @Option(help: "The point to go back to.", transform: parsePoint) var at: Point
    @Option(help: ArgumentHelp("Also revert this source image, rewriting only the blocks changed after the point.",
                               discussion: "An interrupted rollback is finished by running it again as it was started: the same point, and --source naming the same file (or none).")) var source: String?
    @Flag(help: "Confirm: the records after the point are deleted.") var yes = false
    @Flag(help: "Print the result as JSON.") var json = false

    func validate() throws {
        if !yes { throw ValidationError("rollback deletes every record after the point; add --yes to confirm") }
    }

    func run() throws {
        try reporting {
            let m = try openMirror(mirror)
            try m.refuseIfReplica()  // its records are the origin's: cutting them would diverge
            let r = try m.rollback(to: at, source: source, progress: ProgressPrinter(command: "rollback"))
            if json { printJSON(r) } else {
                var line = "rolled back from seq:\(r.fromSeq) to seq:\(r.toSeq): \(r.recordsRemoved) records removed"
                if source != nil { line += ", \(r.sourceBlocksRewritten) source blocks rewritten" }
                if !r.bookmarksRemoved.isEmpty { line += ", bookmarks removed: \(r.bookmarksRemoved.joined(separator: " "))" }
                print(line)
            }
        }
    }
}
