import ArgumentParser
import RewindCore
import RewindDaemon
import RewindLink

struct VerifyCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "verify",
        abstract: "Check every record's checksum; with --against, compare the volume as of a point with an image; with --peer, compare with a replication peer's copy by checksum tree.",
        discussion: "--peer ID@HOST:PORT reaches the peer's `rewind receive` over the link's mutual TLS (this unit's key pair from --home), compares at the point the peer holds (or --at), and lists the differing blocks; nothing changes on either side. Exit status 1 when blocks differ.")

    @Argument(help: "The mirror directory.") var mirror: String
    @Option(help: "The point of this mirror to compare (default: latest with --against; the seq the peer holds with --peer).", transform: parsePoint) var at: Point?
    @Option(help: "An image, or an NBD export (nbd://HOST[:PORT]/NAME, nbd+unix:///NAME?socket=PATH), to compare with byte for byte.") var against: String?
    @Option(help: "A replication peer to compare with: ID@HOST:PORT (its `rewind receive`).") var peer: String?
    @Option(help: "This unit's home directory (its key pair), with --peer.") var home: String?
    @Flag(help: "Print the result as JSON.") var json = false

    struct Failure: Encodable { var ok = false; var error: String }
    struct Success: Encodable { var ok = true; var report: VerifyReport }

    func validate() throws {
        if peer != nil && against != nil { throw ValidationError("give --against or --peer, not both") }
        if at != nil && against == nil && peer == nil { throw ValidationError("--at needs --against IMAGE or --peer PEER") }
        if home != nil && peer == nil { throw ValidationError("--home goes with --peer") }
    }

    struct PeerResult: Encodable {
        var ok: Bool
        var peer: String
        var seq: UInt64
        var peerSeq: UInt64
        var differingBlocks: Int
        var differingBytes: UInt64
        /// Byte ranges of the volume that differ, ascending.
        var ranges: [[UInt64]]
        var queries: Int
        var hashesReceived: UInt64
        var bytesSent: UInt64
        var bytesReceived: UInt64
    }

    func runPeer(_ text: String) throws {
        let target = try parsePeers([text])[0]
        let m = try openMirror(mirror)
        let r = try PeerVerify.run(mirror: m, peer: target, home: home, at: at, progress: ProgressPrinter(command: "verify"))
        let bs = UInt64(r.blockSize)
        var runs: [Range<UInt64>] = []
        for b in r.differing {
            if let last = runs.last, last.upperBound == b { runs[runs.count - 1] = last.lowerBound..<b + 1 } else { runs.append(b..<b + 1) }
        }
        let differingBytes = UInt64(r.differing.count) * bs
        if json {
            printJSON(PeerResult(ok: r.differing.isEmpty, peer: "\(target.id)@\(target.address)", seq: r.seq, peerSeq: r.peerSeq, differingBlocks: r.differing.count,
                                 differingBytes: differingBytes, ranges: runs.map { [$0.lowerBound * bs, UInt64($0.count) * bs] },
                                 queries: r.queries, hashesReceived: r.hashesReceived, bytesSent: r.bytesSent, bytesReceived: r.bytesReceived))
        } else {
            let exchanged = "\(r.queries) questions, \(r.hashesReceived) hashes received; \(r.bytesSent) bytes sent, \(r.bytesReceived) received"
            let points = r.seq == r.peerSeq ? "seq:\(r.seq)" : "seq:\(r.seq) here and seq:\(r.peerSeq)"
            if r.differing.isEmpty {
                print("ok: \(points) \(r.seq == r.peerSeq ? "is" : "are") identical on \(target) (\(exchanged))")
            } else {
                print("\(points) \(r.seq == r.peerSeq ? "differs" : "differ") on \(target): \(r.differing.count) blocks (\(humanBytes(differingBytes))) in \(runs.count) ranges (\(exchanged))")
                for run in runs.prefix(20) {
                    print("  bytes \(run.lowerBound * bs)+\(UInt64(run.count) * bs) (blocks \(run.lowerBound)…\(run.upperBound - 1))")
                }
                if runs.count > 20 { print("  … \(runs.count - 20) more ranges (--json lists them all)") }
            }
        }
        if !r.differing.isEmpty { throw ExitCode(1) }
    }

    func run() throws {
        do {
            if let peer { return try runPeer(peer) }
            let m = try openMirror(mirror)
            let source = try against.map(volumeSource)
            let r = try m.verify(at: at, comparingWith: source, progress: ProgressPrinter(command: "verify"))
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
