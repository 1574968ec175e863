import ArgumentParser
import RewindCore

struct RestoreCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restore", abstract: "Materialise the volume as of a point into a new sparse image.")

    @Argument(help: "The mirror directory.") var mirror: String
    @Option(help: "The point: seq:N, time:RFC3339, bookmark:NAME, latest or oldest.", transform: parsePoint) var at: Point
    @Option(help: "The image to write.") var to: String
    @Flag(help: "Replace IMAGE if it exists.") var force = false
    @Flag(help: "Print the result as JSON.") var json = false

    struct Line: Encodable { var seq: UInt64; var image: String; var bytes: UInt64; var blocksFromJournal: UInt64 }

    func run() throws {
        try reporting {
            let m = try openMirror(mirror)
            let r = try m.restore(at: at, to: to, force: force, progress: ProgressPrinter(command: "restore"))
            if json { printJSON(Line(seq: r.seq, image: to, bytes: r.bytes, blocksFromJournal: r.blocksFromJournal)) } else {
                print("restored seq:\(r.seq) to \(to) (\(humanBytes(r.bytes)), \(r.blocksFromJournal) blocks from the journal)")
            }
        }
    }
}
