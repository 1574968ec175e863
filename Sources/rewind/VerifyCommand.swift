import ArgumentParser
import RewindCore

struct VerifyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Check every record's checksum; with --against, compare the volume as of a point with an image.")

    @Argument(help: "The mirror directory.") var mirror: String
    @Option(help: "The point to compare (default latest).", transform: parsePoint) var at: Point?
    @Option(help: "An image to compare with, byte for byte.") var against: String?
    @Flag(help: "Print the result as JSON.") var json = false

    struct Failure: Encodable { var ok = false; var error: String }
    struct Success: Encodable { var ok = true; var report: VerifyReport }

    func validate() throws {
        if at != nil && against == nil { throw ValidationError("--at needs --against IMAGE") }
    }

    func run() throws {
        do {
            let m = try openMirror(mirror)
            let r = try m.verify(at: at, against: against, progress: ProgressPrinter(command: "verify"))
            if json { printJSON(Success(report: r)) } else {
                var line = "ok: \(r.records) records, \(humanBytes(r.payloadBytes)) of payload and \(r.indexEntries) index entries verified"
                if let seq = r.comparedAt, let against { line += "; seq:\(seq) equals \(against)" }
                print(line)
            }
        } catch let e where engineMessage(e) != nil {
            let message = engineMessage(e) ?? ""
            if json { printJSON(Failure(error: message)) }
            printError(message)
            throw ExitCode(1)
        }
    }
}
