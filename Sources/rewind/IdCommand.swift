import ArgumentParser
import RewindLink

struct IdCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "id",
        abstract: "Print this unit's ID (the SHA-256 of its public key), creating its key pair on first use.",
        discussion: "Peers name this unit by its ID (`--peer-id ID`, `--replicate-to ID@HOST:PORT`). The key pair and a self-signed certificate live in --home (default $REWIND_HOME, else ~/.local/state/rewind).")

    @Option(help: "The unit's home directory.") var home: String?
    @Flag(help: "Print as one JSON object.") var json = false

    struct Line: Encodable { var id: String; var home: String }

    func run() throws {
        let dir = UnitIdentity.homeDirectory(home)
        do {
            let identity = try UnitIdentity.loadOrCreate(home: dir)
            if json { printJSON(Line(id: identity.id, home: dir)) } else { print(identity.id) }
        } catch let e as IdentityError {
            printError(e.description)
            throw ExitCode(1)
        }
    }
}
