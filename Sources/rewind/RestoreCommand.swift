import ArgumentParser
import RewindCore

struct RestoreCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "restore", abstract: "Materialise the volume as of a point into a new sparse image (or, with --force, into a block device).",
        discussion: """
            IMAGE must lie outside every mirror and must not be the source of a running \
            `rewind serve`. A symlink is followed: the file it points at is replaced and the \
            link kept. An existing file is replaced only with --force; an existing block \
            device is written in place, whole, only with --force.
            """)

    @Argument(help: "The mirror directory.") var mirror: String
    @Option(help: "The point: seq:N, time:RFC3339, bookmark:NAME, latest or oldest.", transform: parsePoint) var at: Point
    @Option(help: "The image to write: a new file, or with --force an existing file or block device.") var to: String
    @Flag(help: "Snap the point back to the newest FLUSH point at or before it.") var consistent = false
    @Option(help: "Lay this overlay (from `rewind export --overlay`, at the same point) over the point: the tested volume as an image.") var overlay: String?
    @Flag(help: "Replace IMAGE if it is a file, or overwrite its contents if it is a block device.") var force = false
    @Flag(help: "Print the result as JSON.") var json = false

    /// `blocksFromJournal` is left out for a device (written whole, not counted); `device` only
    /// appears for one, so a file's line is unchanged.
    struct Line: Encodable { var seq: UInt64; var image: String; var bytes: UInt64; var blocksFromJournal: UInt64?; var device: Bool? }

    func run() throws {
        try reporting {
            let (m, _) = try openMirrorCaughtUp(mirror)
            let device = Mirror.restoreTargetIsBlockDevice(to)
            let r = try m.restore(at: at.consistent(consistent), to: to, force: force, overlay: overlay,
                                  progress: ProgressPrinter(command: "restore"))
            if json {
                printJSON(Line(seq: r.seq, image: to, bytes: r.bytes, blocksFromJournal: device ? nil : r.blocksFromJournal,
                               device: device ? true : nil))
            } else if device {
                print("restored seq:\(r.seq) onto the block device \(to) (\(humanBytes(r.bytes)) written)")
            } else {
                print("restored seq:\(r.seq) to \(to) (\(humanBytes(r.bytes)), \(r.blocksFromJournal) blocks from the journal)")
            }
        }
    }
}
