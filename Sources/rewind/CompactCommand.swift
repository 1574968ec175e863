import ArgumentParser
import RewindCore

struct CompactCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "compact", abstract: "Fold records older than the retention window (or up to a point) into the base.")

    @Argument(help: "The mirror directory.") var mirror: String
    @Option(help: "Keep this much history (e.g. 7d).", transform: parseDuration) var keepAge: UInt64?
    @Option(help: "Keep at most this much journal payload (e.g. 10G).", transform: parseSize) var keepSize: UInt64?
    @Option(help: "Fold every record up to and including this point.", transform: parsePoint) var to: Point?
    @Flag(help: "Print the result as JSON.") var json = false

    func validate() throws {
        if to == nil && keepAge == nil && keepSize == nil { throw ValidationError("give --keep-age, --keep-size or --to") }
        if to != nil && (keepAge != nil || keepSize != nil) { throw ValidationError("--to cannot be combined with --keep-age/--keep-size") }
    }

    func run() throws {
        try reporting {
            let m = try openMirror(mirror, recover: true)
            let progress = ProgressPrinter(command: "compact")
            let report: CompactionReport?
            if let to { report = try m.compact(to: to, progress: progress) } else {
                report = try m.compact(keepAgeNanoseconds: keepAge, keepBytes: keepSize, progress: progress)
            }
            guard let r = report, r.toHorizon > r.fromHorizon else {
                if json { print("{\"recordsRemoved\":0}") } else {
                    print("nothing to compact: every record is inside the window")
                }
                return
            }
            if json { printJSON(r) } else {
                var line = "compacted seq:\(r.fromHorizon)..seq:\(r.toHorizon): \(r.recordsRemoved) records, \(humanBytes(r.bytesFolded)) folded, \(r.blocksWritten) blocks written into the base"
                if !r.bookmarksRemoved.isEmpty { line += "; bookmarks removed: \(r.bookmarksRemoved.joined(separator: " "))" }
                print(line)
            }
        }
    }
}
