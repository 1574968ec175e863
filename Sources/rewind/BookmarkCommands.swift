import ArgumentParser
import RewindCore

struct BookmarkCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bookmark", abstract: "Name a point in time (works while the mirror is being served).")

    @Argument(help: "The mirror directory.") var mirror: String
    @Argument(help: "The bookmark's name.") var name: String
    @Option(help: "The point to name (default: while a server runs, the newest point a completed FLUSH made durable; else latest).", transform: parsePoint) var at: Point?
    @Flag(help: "Snap the point back to the newest FLUSH point at or before it.") var consistent = false
    @Flag(help: "Move an existing bookmark of this name.") var force = false
    @Flag(help: "Remove the bookmark instead.") var delete = false
    @Flag(help: "Print the result as JSON.") var json = false

    struct Line: Encodable { var name: String; var seq: UInt64 }

    func run() throws {
        try reporting {
            let (m, durable) = try openMirrorCaughtUp(mirror)
            if delete {
                try m.deleteBookmark(name)
                if !json { print("removed bookmark \(name)") }
                return
            }
            let point = at ?? durable.map { .seq($0.flushed) } ?? .latest
            let seq = try m.setBookmark(name, at: point.consistent(consistent), replace: force)
            if json { printJSON(Line(name: name, seq: seq)) } else { print("bookmark \(name) = seq:\(seq)") }
        }
    }
}

struct BookmarksCommand: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "bookmarks", abstract: "List the bookmarks.")

    @Argument(help: "The mirror directory.") var mirror: String
    @Flag(help: "JSON Lines, one bookmark per line.") var json = false

    struct Line: Encodable { var name: String; var seq: UInt64; var time: String }

    func run() throws {
        try reporting {
            let m = try openMirror(mirror)
            for b in try m.bookmarks() {
                let line = Line(name: b.name, seq: b.seq, time: formatRFC3339(b.time))
                if json { printJSON(line) } else { print("\(b.name)\tseq:\(b.seq)\t\(line.time)") }
            }
        }
    }
}
