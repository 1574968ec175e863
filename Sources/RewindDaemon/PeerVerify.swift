import Logging
import NIOPosix
import RewindCore
import RewindLink

/// `rewind verify MIRROR --peer ID@HOST:PORT`: compare this mirror with a peer's copy by
/// checksum tree, changing nothing (`LinkInspection`).
public enum PeerVerify {
    public static func run(mirror: Mirror, peer: LinkPeer, home: String?, at point: Point?,
                           progress: ProgressObserver?) throws -> InspectionReport {
        let identity = try UnitIdentity.forCommand(home: home)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        defer { try? group.syncShutdownGracefully() }
        var logger = Logger(label: "rewind.verify")
        logger.logLevel = .warning
        do {
            return try LinkInspection.compare(mirror: mirror, peer: peer, identity: identity, at: point,
                                              group: group, logger: logger, progress: progress)
        } catch let e as LinkError {
            throw RewindError.invalidArgument("comparing with \(peer): \(e.description)")
        }
    }
}
