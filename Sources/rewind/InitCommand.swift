import ArgumentParser
import RewindCore
import RewindDaemon

struct InitCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "init", abstract: "Create a mirror: a zero volume of --size, or a copy of --from IMAGE or NBD-URI.")

    @Argument(help: "The mirror directory to create.") var mirror: String
    @Option(help: "Volume size (bytes, or with K M G T).", transform: parseSize) var size: UInt64?
    @Option(help: "Image, or NBD export (nbd://HOST[:PORT]/NAME, nbd+unix:///NAME?socket=PATH), whose content becomes the base (its holes and zero blocks stay holes).") var from: String?
    @Option(help: "Block size in bytes: a power of two from 512 to 1M.") var blockSize: Int = Mirror.defaultBlockSize
    @Flag(help: "Print the result as JSON.") var json = false

    func validate() throws {
        if (size == nil) == (from == nil) { throw ValidationError("give exactly one of --size and --from") }
    }

    func run() throws {
        try reporting {
            let source = try from.map(volumeSource)
            let m = try Mirror.create(at: mirror, size: size, copying: source, blockSize: blockSize,
                                      progress: ProgressPrinter(command: "init"))
            let s = try m.status()
            if json { printJSON(s) } else {
                print("created mirror \(mirror): volume \(s.volumeSize) bytes (\(humanBytes(s.volumeSize))), block size \(s.blockSize), uuid \(s.uuid)")
            }
        }
    }
}
