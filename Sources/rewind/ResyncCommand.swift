import ArgumentParser
import Logging
import RewindCore
import RewindDaemon
import RewindLink

struct ResyncCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "resync",
        abstract: "Make a replication peer's copy equal to this mirror, sending only what differs.",
        discussion: "Reaches the peer's `rewind receive` over the link (this unit's key pair from --home). A peer without a mirror is seeded; one behind this mirror's oldest point is caught up as one point — from the blocks recorded as changed for it, or, without such a record, by comparing checksum trees and sending only the differing blocks — then sent the records after; the result is checked by checksum tree. For a peer that no running server streams to (a running one does this itself).")

    @Argument(help: "The mirror directory.") var mirror: String
    @Option(help: "The peer: ID@HOST:PORT (its `rewind receive`).") var peer: String
    @Option(help: "This unit's home directory (its key pair).") var home: String?
    @Flag(help: "Print the result as JSON.") var json = false

    struct Result: Encodable {
        var ok: Bool
        var peer: String
        var before: UInt64?
        var seq: UInt64
        var bytesSent: UInt64
        var checksumBytesReceived: UInt64
        var differingBlocks: Int
    }

    func run() throws {
        let target = try parsePeers([peer])[0]
        try reporting {
            let m = try openMirror(mirror)
            let r = try PeerResync.run(mirror: m, peer: target, home: home, logLevel: json ? .warning : .info)
            let ok = r.check.differing.isEmpty
            if json {
                printJSON(Result(ok: ok, peer: "\(target.id)@\(target.address)", before: r.before, seq: r.after, bytesSent: r.bytesSent,
                                 checksumBytesReceived: r.checksumBytesReceived, differingBlocks: r.check.differing.count))
            } else if ok {
                let from = r.before.map { "seq:\($0)" } ?? "no mirror"
                print("ok: \(target) holds seq:\(r.after) (it held \(from)); \(r.bytesSent) bytes sent\(r.checksumBytesReceived > 0 ? ", \(r.checksumBytesReceived) bytes of checksums received" : ""); identical by checksum tree")
            } else {
                print("\(target) holds seq:\(r.after), but \(r.check.differing.count) blocks differ from this mirror's seq:\(r.after): its copy is damaged; move its mirror aside and run resync again (it is then seeded)")
            }
            if !ok { throw RewindError.invalidArgument("the peer's copy differs after the resync") }
        }
    }
}
