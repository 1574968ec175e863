import Logging
import NIOPosix
import RewindCore
import RewindLink

/// `rewind resync MIRROR --peer ID@HOST:PORT`: make a peer's copy equal to this mirror's
/// newest point — seeded if it has none, caught up from its dirty set or, without one, by
/// checksum tree (only differing blocks sent, as one point), then the records after — and
/// check it by checksum tree. For a mirror no running server streams to that peer.
public enum PeerResync {
    public struct Report: Sendable {
        public var before: UInt64?
        public var after: UInt64
        public var bytesSent: UInt64
        /// Checksums the peer sent back when compared by tree (frame bytes).
        public var checksumBytesReceived: UInt64
        public var check: InspectionReport
    }

    public static func run(mirror: Mirror, peer: LinkPeer, home: String?, logLevel: Logger.Level = .info) throws -> Report {
        let identity = try UnitIdentity.forCommand(home: home)
        // A running server (or receiver) that streams to this peer does it itself.
        if let owner = try? FileLock(path: mirror.ownerLockPath, kind: .exclusive, holder: "") {
            owner.release()
        } else if try mirror.peerRecords().contains(where: { $0.id == peer.id }) {
            throw RewindError.invalidArgument("a running rewind streams \(mirror.path) to \(peer) and catches it up itself (`rewind status` shows how); resync is for a peer nothing streams to now")
        }
        // A peer this mirror did not stream to before is not kept after: its entry would hold
        // retention for a peer nothing streams to.
        let known = try mirror.peerRecords().contains { $0.id == peer.id }
        defer { if !known { mirror.forgetPeer(peer.id) } }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        var logger = Logger(label: "rewind.resync")
        logger.logLevel = logLevel
        let sender = LinkSender(mirror: mirror, peer: peer, context: try LinkTLS.clientContext(identity), group: group, logger: logger)
        do {
            let (before, after) = try sender.syncOnce()
            let check = try LinkInspection.compare(mirror: mirror, peer: peer, identity: identity, at: .seq(after),
                                                   group: group, logger: logger)
            return Report(before: before, after: after, bytesSent: sender.status.bytesSent,
                          checksumBytesReceived: sender.status.checksumBytesReceived, check: check)
        } catch let e as LinkError {
            throw RewindError.invalidArgument("resyncing \(peer): \(e.description)")
        }
    }
}
