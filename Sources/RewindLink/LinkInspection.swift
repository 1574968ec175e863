import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import RewindCore

/// What comparing a mirror with a peer's copy found (`rewind verify --peer`).
public struct InspectionReport: Sendable, Equatable {
    /// The point of this mirror compared.
    public var seq: UInt64
    /// The peer's point it was compared with (its newest indexed seq).
    public var peerSeq: UInt64
    /// Blocks whose content differs, ascending.
    public var differing: [UInt64]
    public var blockSize: Int
    /// Questions asked and hashes received, and the frame bytes each way (TLS not counted).
    public var queries: Int
    public var hashesReceived: UInt64
    public var bytesSent: UInt64
    public var bytesReceived: UInt64
}

/// The client end of an inspection: connects to a peer's `rewind receive` over the link's
/// mutual TLS, learns the point it holds, builds this mirror's tree at that point and finds
/// the differing blocks top-down (`TreeComparison`). Changes nothing on either side.
public enum LinkInspection {
    public static func compare(mirror: Mirror, peer: LinkPeer, identity: UnitIdentity, at point: Point?,
                               group: EventLoopGroup, logger: Logger, progress: ProgressObserver? = nil) throws -> InspectionReport {
        let m = try mirror.meta()
        return try exchange(peer: peer, context: try LinkTLS.clientContext(identity), group: group, logger: logger,
                            uuid: m.uuid, size: m.volumeSize, blockSize: m.blockSize) { peerSeq in
            if point == nil, peerSeq > m.lastSeq {
                throw LinkError("the peer holds seq:\(peerSeq), after this mirror's newest seq:\(m.lastSeq); compare another point of this mirror with --at (e.g. --at latest)")
            }
            if point == nil, peerSeq < m.oldestPoint {
                throw LinkError("the peer holds seq:\(peerSeq), before this mirror's oldest point seq:\(m.oldestPoint); compare another point of this mirror with --at (e.g. --at oldest)")
            }
            let snapshot = try Snapshot(mirror: mirror, point: point ?? .seq(peerSeq))
            return (try PointTree(snapshot: snapshot, progress: progress), { snapshot.close() })
        }
    }

    /// Compare a tree already built (a sender's resync) with the peer's newest point.
    static func compare(tree: PointTree, peer: LinkPeer, context: NIOSSLContext, group: EventLoopGroup,
                        logger: Logger) throws -> InspectionReport {
        let m = try tree.snapshot.mirror.meta()
        return try exchange(peer: peer, context: context, group: group, logger: logger,
                            uuid: m.uuid, size: m.volumeSize, blockSize: m.blockSize) { _ in (tree, {}) }
    }

    /// One inspection connection: inspect, then `local(peerSeq)` gives the tree to compare
    /// (and what to do when done), then the top-down exchange.
    private static func exchange(peer: LinkPeer, context: NIOSSLContext, group: EventLoopGroup, logger: Logger,
                                 uuid: [UInt8], size: UInt64, blockSize: UInt32,
                                 local: (UInt64) throws -> (PointTree, () -> Void)) throws -> InspectionReport {
        let inbox = LinkInbox()
        let channel = try LinkSender.connect(peer: peer, context: context, group: group, inbox: inbox)
        defer { channel.close(promise: nil) }
        // Keep both ends from closing on silence while either builds its tree.
        let keepalive = channel.eventLoop.scheduleRepeatedTask(initialDelay: .seconds(Int64(LinkTiming.keepaliveSeconds)),
                                                               delay: .seconds(Int64(LinkTiming.keepaliveSeconds))) { _ in
            channel.writeAndFlush(LinkFrame(.keepalive), promise: nil)
        }
        defer { keepalive.cancel() }
        var sent: UInt64 = 0, received: UInt64 = 0
        func send(_ f: LinkFrame) throws {
            sent += UInt64(f.body.readableBytes + LinkFrame.overheadBytes)
            do {
                try channel.writeAndFlush(f).wait()
            } catch {
                // Closed under us (a TLS refusal, most often): the inbox knows why.
                while try inbox.next(waiting: 2) != nil {}
                throw LinkError("the connection closed")
            }
        }
        /// The next frame that is not a keep-alive; silence past `LinkTiming.silenceSeconds` ends it.
        func answer(_ what: String) throws -> LinkFrame {
            while true {
                guard let f = try inbox.next(waiting: Double(LinkTiming.silenceSeconds)) else {
                    throw LinkError("no \(what) from the peer within \(LinkTiming.silenceSeconds) s")
                }
                if f.kind == .keepalive { continue }
                received += UInt64(f.body.readableBytes + LinkFrame.overheadBytes)
                if f.kind == .refuse { throw LinkError("refused by the peer: \(try LinkRefusal(f).reason)") }
                return f
            }
        }
        try send(LinkInspect(volumeUUID: uuid, volumeSize: size, blockSize: blockSize).frame)
        let ready = try LinkInspectReady(try answer("answer to inspect"))
        logger.debug("peer \(peer) holds seq:\(ready.seq); comparing")
        let (tree, done) = try local(ready.seq)
        defer { done() }
        let found = try compareOverLink(tree, remoteRoot: ready.root, send: send, answer: { try answer("tree answer") },
                                        visited: { level, nodes in logger.debug("level \(level): \(nodes) differing nodes") })
        return InspectionReport(seq: tree.seq, peerSeq: ready.seq, differing: found.differing, blockSize: tree.shape.blockSize,
                                queries: found.queries, hashesReceived: found.hashes, bytesSent: sent, bytesReceived: received)
    }

    /// The top-down comparison (`TreeComparison`) of `tree` with a peer's whose root is
    /// `remoteRoot`: each question sent as a `treeQuery` frame, its answer the next frame
    /// `answer` returns. Shared by verify, resync and the seed of a stale copy.
    static func compareOverLink(_ tree: PointTree, remoteRoot: UInt64, send: (LinkFrame) throws -> Void, answer: () throws -> LinkFrame,
                                visited: (Int, Int) -> Void = { _, _ in }) throws -> (differing: [UInt64], queries: Int, hashes: UInt64) {
        var queries = 0
        var hashes: UInt64 = 0
        let differing = try TreeComparison.differingBlocks(local: tree, remoteRoot: remoteRoot, ask: { level, parents in
            try send(LinkTreeQuery(level: UInt8(level), parents: parents).frame)
            let all = try LinkTreeAnswer(try answer()).hashes
            queries += 1
            hashes += UInt64(all.count)
            return try LinkTreeAnswer.split(all, parents: parents, level: level, shape: tree.shape)
        }, visited: visited)
        return (differing, queries, hashes)
    }
}

/// The receiving end of an inspection, on a thread of its own beside the applier: pins the
/// mirror's newest indexed point (a `Snapshot`: compaction waits, the applier goes on),
/// builds its tree, and answers questions until the client closes.
final class LinkInspector: @unchecked Sendable {
    let connection: LinkConnection
    let inbox = LinkInbox()
    let mirror: @Sendable () -> Mirror?
    let logger: Logger

    init(connection: LinkConnection, mirror: @escaping @Sendable () -> Mirror?, logger: Logger) {
        self.connection = connection
        self.mirror = mirror
        self.logger = logger
    }

    func start() {
        let t = Thread { [self] in
            do {
                try run()
            } catch {
                logger.warning("inspection from \(connection.shortPeer): \(error)")
                connection.refuse("\(error)")
            }
        }
        t.name = "rewind-inspect"
        t.start()
    }

    private func run() throws {
        guard let first = try inbox.next(waiting: Double(LinkTiming.silenceSeconds)) else { throw LinkError("no inspect frame") }
        let asked = try LinkInspect(first)
        guard let m = mirror() else { throw LinkError("this receiver has no mirror yet") }
        let meta = try m.meta()
        guard asked.volumeUUID == meta.uuid, asked.volumeSize == meta.volumeSize, asked.blockSize == meta.blockSize else {
            throw LinkError("the client's volume \(formatUUID(asked.volumeUUID)) (\(asked.volumeSize) bytes in blocks of \(asked.blockSize)) is not this mirror's \(formatUUID(meta.uuid)) (\(meta.volumeSize) in blocks of \(meta.blockSize))")
        }
        let snapshot = try Snapshot(mirror: m, point: .latest)
        defer { snapshot.close() }
        let tree = try PointTree(snapshot: snapshot)
        logger.info("inspection from \(connection.shortPeer): comparing at seq:\(snapshot.seq)")
        connection.channel.writeAndFlush(LinkInspectReady(seq: snapshot.seq, root: try tree.root()).frame, promise: nil)
        var asked_ = 0
        while true {
            let f: LinkFrame?
            do { f = try inbox.next(waiting: Double(LinkTiming.silenceSeconds)) } catch {
                logger.info("inspection from \(connection.shortPeer): done (\(asked_) questions)")
                return
            }
            guard let f else { throw LinkError("nothing asked for \(LinkTiming.silenceSeconds) s") }
            let answer = try LinkTreeAnswer(answering: LinkTreeQuery(f), from: tree)
            asked_ += 1
            connection.channel.writeAndFlush(answer.frame, promise: nil)
        }
    }
}
