import ArgumentParser
import RewindCore

struct ForgetPeerCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "forget-peer",
        abstract: "Stop keeping anything for a replication peer that is gone for good.",
        discussion: "A peer a mirror streamed to holds retention back at the newest seq it acked (or its --peer-keep-size), and keeps its dirty set, until it returns. For a peer that will not return (decommissioned, replaced), this removes its entry and its dirty set: retention may then fold past it. Should it return, it is caught up by checksum tree (or seeded). Refused while a server or receiver runs on the mirror: stop it, and start it again without --replicate-to for that peer.")

    @Argument(help: "The mirror directory.") var mirror: String
    @Argument(help: "The peer's ID (`rewind id` on it; the first 8 or more hex digits are enough when they name one peer).") var id: String
    @Flag(help: "Print the result as JSON.") var json = false

    struct Result: Encodable {
        var id: String
        var address: String
        var durableSeq: UInt64
        var dirtyBlocks: Int?
    }

    func run() throws {
        try reporting {
            let m = try openMirror(mirror)
            guard let owner = try? FileLock(path: m.ownerLockPath, kind: .exclusive, holder: "forget-peer") else {
                throw RewindError.invalidArgument("a running rewind owns \(mirror); stop it first (and start it again without --replicate-to for that peer)")
            }
            defer { owner.release() }
            let peers = try m.peerRecords()
            let key = id.lowercased()
            let matches = key.count >= 8 ? peers.filter { $0.id.hasPrefix(key) } : peers.filter { $0.id == key }
            guard let peer = matches.first, matches.count == 1 else {
                if matches.count > 1 { throw RewindError.invalidArgument("\(id) names \(matches.count) peers of \(mirror); give more of the ID") }
                let known = peers.map { String($0.id.prefix(16)) + "…" }.joined(separator: ", ")
                throw RewindError.invalidArgument("\(mirror) keeps nothing for a peer \(id) (its peers: \(known.isEmpty ? "none" : known))")
            }
            let dirty = try? m.peerDirty(peer.id)
            m.forgetPeer(peer.id)
            if json {
                printJSON(Result(id: peer.id, address: peer.address, durableSeq: peer.durableSeq, dirtyBlocks: dirty.map { Int($0.blocks.count) }))
            } else {
                print("forgot peer \(peer.id) at \(peer.address): it held seq:\(peer.durableSeq)\(dirty.map { "; its dirty set of \($0.blocks.count) blocks removed" } ?? ""); retention no longer waits for it")
            }
        }
    }
}
