import Foundation
import Logging
import NIOCore
import NIOPosix
import NIOSSL
import RewindCore

/// Streams one mirror's journal to one peer, on a thread of its own: connect (mutual TLS,
/// the peer's ID pinned), `hello`, then from the peer's durable seq on, batches of records
/// read from the mirror — the journal is the link's buffer; nothing is held in memory beyond
/// the window of unacknowledged bytes. A peer with no mirror is seeded first. Any failure
/// closes the connection; the sender reconnects with backoff and resumes from what the peer
/// then says it holds, so no record is lost or sent twice into its journal.
public final class LinkSender: @unchecked Sendable {
    public let peer: LinkPeer
    let mirror: Mirror
    let context: NIOSSLContext
    let group: EventLoopGroup
    let logger: Logger
    private let lock = NSCondition()
    private var stopping = false
    private var channel: Channel?
    private var inbox: LinkInbox?
    private var thread: Thread?
    private var current = LinkSenderStatus()
    private var ackHook: (@Sendable (UInt64) -> Void)?

    /// Unacknowledged payload in flight, at most.
    public static let windowBytes = 32 << 20
    /// One `records` frame, at most (a single larger record goes alone).
    public static let batchBytes = 4 << 20
    public static let batchRecords = 2048
    /// How often an idle sender looks for new records, when no commit nudges it.
    static let pollSeconds = 0.05

    /// Records kept for this peer while it is behind, at most (`--peer-keep-size`; nil: all).
    let keepBytes: UInt64?
    /// Below this much free space on the journal's file system, none (`--peer-min-free`).
    let minFreeBytes: UInt64?

    public init(mirror: Mirror, peer: LinkPeer, context: NIOSSLContext, group: EventLoopGroup, logger: Logger,
                keepBytes: UInt64? = nil, minFreeBytes: UInt64? = nil) {
        self.keepBytes = keepBytes
        self.minFreeBytes = minFreeBytes
        self.mirror = mirror
        self.peer = peer
        self.context = context
        self.group = group
        self.logger = logger
    }

    public var status: LinkSenderStatus { lock.withLock { current } }

    /// Called with each durable seq the peer acknowledges (`SyncGate`); set before `start()`.
    public func onAck(_ hook: @escaping @Sendable (UInt64) -> Void) { lock.withLock { ackHook = hook } }

    /// New records are readable: send them now rather than at the next look.
    public func nudge() { lock.withLock { inbox }?.nudge() }

    /// The acknowledgement mode shown for this peer (status, peers table).
    public func setMode(_ mode: String) { update { $0.mode = mode } }

    private func acked(_ seq: UInt64) {
        let hook: (@Sendable (UInt64) -> Void)? = lock.withLock {
            current.durableSeq = seq
            current.heard = wallClockNanoseconds()
            return ackHook
        }
        hook?(seq)
    }

    public func start() {
        // Until the peer first answers, it holds every record from the oldest point on; a peer
        // known already keeps its position and takes this run's bounds at once.
        if let old = try? mirror.peerRecords().first(where: { $0.id == peer.id }) {
            var now = old
            now.keepBytes = keepBytes
            now.minFreeBytes = minFreeBytes
            now.address = peer.address
            if now != old { try? mirror.recordPeer(now, sync: true) }
        } else if let m = try? mirror.meta() {
            try? mirror.recordPeer(PeerRecord(id: peer.id, address: peer.address, durableSeq: m.oldestPoint,
                                              updated: 0, state: "connecting", keepBytes: keepBytes,
                                              minFreeBytes: minFreeBytes), sync: true)
        }
        let t = Thread { [self] in run() }
        t.name = "rewind-link \(peer.shortID)"
        lock.withLock { thread = t }
        t.start()
    }

    /// Stop streaming: close the connection and wait for the thread.
    public func stop() {
        let (c, t): (Channel?, Thread?) = lock.withLock {
            stopping = true
            lock.broadcast()
            return (channel, thread)
        }
        c?.close(promise: nil)
        guard t != nil else { return }
        lock.withLock { while current.state != "stopped" { lock.wait() } }
    }

    private var isStopping: Bool { lock.withLock { stopping } }

    /// Set by `syncOnce`: the session ends once the peer holds the newest record.
    private var untilCaughtUp = false

    /// One session on the caller's thread (`rewind resync`): connect, then seed, catch up
    /// (from the peer's dirty set, or by checksum tree) or stream, until the peer holds this
    /// mirror's newest record. Returns what the peer held at first and holds now.
    public func syncOnce() throws -> (before: UInt64?, after: UInt64) {
        lock.withLock { untilCaughtUp = true }
        var first: UInt64?
        lock.withLock { firstDurable = nil }
        try session()
        first = lock.withLock { firstDurable }
        return (first, status.durableSeq ?? 0)
    }

    /// The durable seq the peer named on connecting (nil: it had no mirror).
    private var firstDurable: UInt64?

    private func run() {
        var backoff = LinkTiming.firstBackoff
        var lastError = ""
        while !isStopping {
            let started = Date()
            do {
                try session()
            } catch {
                if isStopping { break }
                let why = "\(error)"
                // A session that streamed starts the count of repeated failures afresh.
                if status.state == "streaming" { lastError = "" }
                update { $0.state = "connecting: \(why)"; $0.connected = false }
                try? recordPeer(sync: false)
                // One line per distinct failure, not one per retry.
                if why != lastError {
                    logger.warning("link to \(peer): \(why); reconnecting (backoff up to \(Int(LinkTiming.longestBackoff)) s)")
                    lastError = why
                }
            }
            if Date().timeIntervalSince(started) > 10 { backoff = LinkTiming.firstBackoff }
            lock.withLock { _ = stopping ? true : lock.wait(until: Date(timeIntervalSinceNow: backoff)) }
            backoff = min(backoff * 2, LinkTiming.longestBackoff)
        }
        try? recordPeer(sync: true, state: "stopped")
        lock.withLock {
            current.state = "stopped"
            current.connected = false
            lock.broadcast()  // `stop` waits for it
        }
    }

    private func update(_ body: (inout LinkSenderStatus) -> Void) {
        lock.withLock { body(&current) }
    }

    /// Write this peer's entry in the peers table; `state` overrides the status's. Before the
    /// peer has answered, the entry keeps the position it had (read back only then).
    private func recordPeer(sync: Bool, state: String? = nil) throws {
        let s = status
        let state = state ?? s.state
        guard s.durableSeq != nil || state == "stopped" || state == "seeding" else { return }
        var durable = s.durableSeq, heard = s.heard
        if durable == nil || heard == nil, let old = try mirror.peerRecords().first(where: { $0.id == peer.id }) {
            durable = durable ?? old.durableSeq
            heard = heard ?? old.updated
        }
        try mirror.recordPeer(PeerRecord(id: peer.id, address: peer.address, durableSeq: durable ?? 0,
                                         updated: heard ?? 0, state: state, mode: s.mode, keepBytes: keepBytes,
                                         minFreeBytes: minFreeBytes), sync: sync)
        // A dirty set the peer's acks have passed (it streamed past what was folded) is spent.
        if let d = durable, let dirty = try? mirror.peerDirty(peer.id), d >= dirty.through { mirror.removePeerDirty(peer.id) }
    }

    // MARK: one connection

    private func connect(_ inbox: LinkInbox) throws -> Channel {
        try Self.connect(peer: peer, context: context, group: group, inbox: inbox)
    }

    /// A connection to `peer` over mutual TLS (its ID pinned), its frames into `inbox`.
    static func connect(peer: LinkPeer, context: NIOSSLContext, group: EventLoopGroup, inbox: LinkInbox) throws -> Channel {
        let seen = PresentedIdentity()
        let bootstrap = ClientBootstrap(group: group)
            .connectTimeout(.seconds(10))
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    let tls = try NIOSSLClientHandler(context: context, serverHostname: nil,
                                                      customVerificationCallback: LinkTLS.verifier(allowed: [peer.id], seen: seen))
                    try channel.pipeline.syncOperations.addHandlers([
                        tls,
                        IdleStateHandler(readTimeout: .seconds(Int64(LinkTiming.silenceSeconds))),
                        ByteToMessageHandler(LinkFrameDecoder()),
                        MessageToByteHandler(LinkFrameEncoder()),
                        LinkInboxHandler(inbox: inbox, seen: seen, expected: peer.id),
                    ])
                }
            }
        do {
            return try bootstrap.connect(host: peer.host, port: peer.port).wait()
        } catch {
            let text = "\(error)"
            for known in ["Connection refused", "Connection timed out", "No route to host", "Network is unreachable"] where text.contains(known) {
                throw LinkError("cannot connect: \(known.lowercased())")
            }
            throw LinkError("cannot connect: \(text)")
        }
    }

    private func session() throws {
        let inbox = LinkInbox()
        let channel = try connect(inbox)
        lock.withLock { self.channel = channel; self.inbox = inbox }
        defer {
            channel.close(promise: nil)
            lock.withLock { self.channel = nil; self.inbox = nil }
        }
        if isStopping { return }
        let m = try mirror.meta()
        channel.writeAndFlush(LinkHello(volumeUUID: m.uuid, volumeSize: m.volumeSize, blockSize: m.blockSize,
                                        generation: m.generation, lastSeq: m.lastSeq,
                                        generationStart: try mirror.generationStart()).frame, promise: nil)
        guard let answer = try inbox.next(waiting: 10) else { throw LinkError("no answer to hello within 10 s") }
        var durable: UInt64
        switch answer.kind {
        case .welcome:
            durable = try LinkSeq(answer).seq
            lock.withLock { firstDurable = durable }
            let newest = try mirror.meta().lastSeq
            guard durable <= newest else {
                throw LinkError("the peer holds seq:\(durable), past this mirror's newest seq:\(newest): they have diverged")
            }
        case .needSeed:
            // A body of [1]: the peer holds a stale copy to start from; only differences are sent.
            durable = try seed(channel, inbox, stale: answer.body.getInteger(at: answer.body.readerIndex, as: UInt8.self) == 1)
        case .refuse:
            throw LinkError("refused by the peer: \(try LinkRefusal(answer).reason)")
        default:
            throw LinkError("the peer answered hello with a \(answer.kind) frame")
        }
        if durable < (try mirror.meta().horizon) {
            acked(durable)
            durable = try catchUp(channel, inbox, from: durable)
        }
        update { $0.state = "streaming"; $0.connected = true }
        acked(durable)
        try recordPeer(sync: true)
        logger.info("link to \(peer): streaming from seq:\(durable + 1)")
        try stream(channel, inbox, from: durable)
    }

    /// Send base.img as of the horizon (pinned meanwhile), then wait for the peer to ack it.
    private func seed(_ channel: Channel, _ inbox: LinkInbox, stale: Bool = false) throws -> UInt64 {
        guard let seed = try mirror.seed() else { throw LinkError("a compaction is unfinished; seeding waits for it") }
        let pin = try mirror.pin(.seq(seed.horizon), holder: "seeding replication peer \(peer.shortID)…")
        defer { pin.release() }
        update { $0.state = "seeding"; $0.connected = true }
        try? recordPeer(sync: false)
        logger.info("link to \(peer): the peer has no mirror; seeding it with the volume as of seq:\(seed.horizon)")
        channel.writeAndFlush(LinkSeedBegin.frame(seed), promise: nil)
        var sent: UInt64 = 0, frames = 0
        var lastReport = Date()
        var total: UInt64 = 0
        var pinged = Date()
        func send(_ frame: LinkFrame, data: Int) throws {
            // The receiver only answers: a keepalive every few seconds keeps it heard from.
            pingIfQuiet(channel, &pinged)
            frames += 1
            update { $0.bytesSent += UInt64(frame.body.readableBytes + LinkFrame.overheadBytes) }
            // Every 8th frame is waited for: at most ~8 MiB queued in the channel.
            if frames % 8 == 0 { try channel.writeAndFlush(frame).wait() } else { channel.writeAndFlush(frame, promise: nil) }
            sent += UInt64(data)
        }
        if stale {
            total = try seedDifferences(channel, inbox, horizon: seed.horizon, send: send)
        } else {
            total = try mirror.forEachBaseDataRun(reached: { at in
                if isStopping { throw LinkError("stopped") }
                if Date().timeIntervalSince(lastReport) >= 5 {
                    logger.info("link to \(peer): seeding, \(at) of \(seed.volumeSize) bytes scanned, \(sent) sent")
                    lastReport = Date()
                }
                if let f = try inbox.next(waiting: 0) {
                    if f.kind == .refuse { throw LinkError("refused by the peer: \(try LinkRefusal(f).reason)") }
                    if f.kind != .keepalive { throw LinkError("a \(f.kind) frame while seeding") }
                }
            }) { offset, bytes in
                try send(LinkSeedData.frame(offset: offset, bytes: bytes), data: bytes.count)
            }
        }
        try channel.writeAndFlush(LinkSeedData.endFrame(bytesSent: sent)).wait()
        try awaitAck(seed.horizon, of: "the seed", channel, inbox)
        mirror.removePeerDirty(peer.id)  // a seeded peer starts afresh
        if stale {
            logger.info("link to \(peer): seeded from its stale copy, \(sent) bytes of data sent (\(total) bytes of blocks differed)")
        } else {
            logger.info("link to \(peer): seeded, \(sent) bytes of base sent (\(total - sent) of its \(total) allocated bytes were zeros)")
        }
        return seed.horizon
    }

    /// Seeding a peer that starts from a stale copy of the volume: its tree's root comes back
    /// (it hashes its copy first), the trees are compared top-down on this connection, and only
    /// the differing blocks go: data, or a range of zeros. Returns the data bytes compared.
    private func seedDifferences(_ channel: Channel, _ inbox: LinkInbox, horizon: UInt64,
                                 send: (LinkFrame, Int) throws -> Void) throws -> UInt64 {
        logger.info("link to \(peer): the peer holds a stale copy; comparing checksum trees")
        // The peer hashes its copy first: keep the link alive meanwhile.
        func next(_ what: String) throws -> LinkFrame {
            var silent = Date()
            while true {
                if isStopping { throw LinkError("stopped") }
                if Date().timeIntervalSince(silent) > 600 { throw LinkError("no \(what) from the peer within 600 s") }
                guard let f = try inbox.next(waiting: Double(LinkTiming.keepaliveSeconds)) else {
                    channel.writeAndFlush(LinkFrame(.keepalive), promise: nil)
                    continue
                }
                if f.kind == .keepalive { silent = Date(); continue }
                if f.kind == .refuse { throw LinkError("refused by the peer: \(try LinkRefusal(f).reason)") }
                return f
            }
        }
        let ready = try LinkInspectReady(try next("tree root"))
        let snapshot = try Snapshot(mirror: mirror, point: .seq(horizon))
        defer { snapshot.close() }
        let tree = try PointTree(snapshot: snapshot, progress: LogProgress(logger: logger, prefix: "link to \(peer)"))
        var received: UInt64 = 0
        let differing = try LinkInspection.compareOverLink(tree, remoteRoot: ready.root, send: { q in
            update { $0.bytesSent += UInt64(q.body.readableBytes + LinkFrame.overheadBytes) }
            channel.writeAndFlush(q, promise: nil)
        }, answer: {
            let answer = try next("tree answer")
            received += UInt64(answer.body.readableBytes + LinkFrame.overheadBytes)
            return answer
        }).differing
        update { $0.checksumBytesReceived += received }
        var blocks = DirtySet()
        for b in differing { blocks.insert(b) }
        let runs = try snapshot.catchUpRuns(for: blocks)
        let bs = UInt64(mirror.blockSize)
        logger.info("link to \(peer): \(differing.count) blocks of its copy differ; sending those")
        let piece = Self.batchBytes / Int(bs)
        var buffer = [UInt8](repeating: 0, count: piece * Int(bs))
        for run in runs {
            if run.zero {
                try send(LinkSeedData.zeroFrame(offset: run.blocks.lowerBound * bs, length: UInt64(run.blocks.count) * bs), 0)
                continue
            }
            var at = run.blocks.lowerBound
            while at < run.blocks.upperBound {
                let n = Int(min(UInt64(piece), run.blocks.upperBound - at))
                try buffer.withUnsafeMutableBytes { raw in
                    let slice = UnsafeMutableRawBufferPointer(rebasing: raw[0..<n * Int(bs)])
                    try snapshot.read(at: at * bs, into: slice)
                    try send(LinkSeedData.frame(offset: at * bs, bytes: UnsafeRawBufferPointer(slice)), n * Int(bs))
                }
                at += UInt64(n)
            }
        }
        return UInt64(differing.count) * bs
    }

    /// The peer holds `from`, folded here since: send the blocks changed after it (its dirty
    /// set, `PeerDirty`) as of the horizon, pinned meanwhile, as one catch-up (`CatchUp`); the
    /// peer applies it as one point and acks the horizon. Returns it.
    private func catchUp(_ channel: Channel, _ inbox: LinkInbox, from: UInt64) throws -> UInt64 {
        let horizon = try mirror.meta().horizon
        let pin = try mirror.pin(.seq(horizon), holder: "catching up replication peer \(peer.shortID)…")
        defer { pin.release() }
        let m = try mirror.meta()
        guard m.horizon == horizon, m.target <= m.horizon else { throw LinkError("a compaction moved the oldest point; catching up again") }
        let snapshot = try Snapshot(mirror: mirror, point: .seq(horizon))
        defer { snapshot.close() }
        let blocks: DirtySet
        if let dirty = try mirror.peerDirty(peer.id), dirty.through == horizon, dirty.from <= from {
            blocks = dirty.blocks
        } else {
            // No record of what changed since (lost, or never kept): find it by comparing
            // checksum trees, this mirror's at the horizon with the peer's at its seq (K8).
            blocks = try resyncBlocks(peerAt: from, snapshot)
        }
        let dirty = PeerDirty(from: from, through: horizon, blocks: blocks)
        let exact = try snapshot.catchUpRuns(for: dirty.blocks)
        // One begin frame lists the runs: past what it holds, the closest runs are joined (the
        // blocks between them are sent too: unchanged since the peer's seq, so still correct).
        let runs = CatchUp.coalesce(exact, maxRuns: LinkCatchUpBegin.maxRuns)
        let bs = mirror.blockSize
        let dataBlocks = runs.reduce(UInt64(0)) { $0 + ($1.zero ? 0 : UInt64($1.blocks.count)) }
        if runs.count < exact.count {
            logger.info("link to \(peer): the catch-up's \(exact.count) runs joined into \(runs.count), to fit one frame")
        }
        update { $0.state = "catching up"; $0.connected = true }
        logger.info("link to \(peer): the peer holds seq:\(from), folded here since; catching it up to seq:\(horizon) as one point: \(dirty.blocks.count) blocks changed, \(dataBlocks * UInt64(bs)) bytes of data")
        channel.writeAndFlush(LinkCatchUpBegin(from: from, seq: horizon, timestamp: m.horizonTime, runs: runs).frame, promise: nil)
        let hasher = PayloadHasher(blockSize: bs)
        CatchUp.encodeRuns(runs, blockSize: bs).withUnsafeBytes { hasher.update($0) }
        var sent: UInt64 = 0, frames = 0
        var lastReport = Date()
        var pinged = Date()
        try snapshot.forEachCatchUpData(runs, maxBytes: Self.batchBytes) { piece in
            if isStopping { throw LinkError("stopped") }
            pingIfQuiet(channel, &pinged)
            if let f = try inbox.next(waiting: 0) {
                if f.kind == .refuse { throw LinkError("refused by the peer: \(try LinkRefusal(f).reason)") }
                if f.kind != .keepalive { throw LinkError("a \(f.kind) frame while catching up") }
            }
            hasher.update(piece)
            let frame = LinkCatchUpData.frame(piece)
            frames += 1
            // Every 8th frame is waited for: at most ~32 MiB queued in the channel.
            if frames % 8 == 0 { try channel.writeAndFlush(frame).wait() } else { channel.writeAndFlush(frame, promise: nil) }
            sent += UInt64(piece.count)
            update { $0.bytesSent += UInt64(piece.count + LinkFrame.overheadBytes) }
            if Date().timeIntervalSince(lastReport) >= 5 {
                logger.info("link to \(peer): catching up, \(sent) of \(dataBlocks * UInt64(bs)) bytes sent")
                lastReport = Date()
            }
        }
        try channel.writeAndFlush(LinkCatchUpData.endFrame(checksum: hasher.checksum)).wait()
        try awaitAck(horizon, of: "the catch-up", channel, inbox)
        acked(horizon)
        try recordPeer(sync: true, state: "streaming")
        mirror.removePeerDirty(peer.id)
        logger.info("link to \(peer): caught up to seq:\(horizon) (\(sent) bytes of data sent)")
        return horizon
    }

    /// The blocks where the peer's point `seq` differs from `snapshot`, by checksum tree over
    /// an inspection connection beside this one (the receiver answers it from its newest
    /// indexed point, which reaches `seq` within its index's commit interval).
    private func resyncBlocks(peerAt seq: UInt64, _ snapshot: Snapshot) throws -> DirtySet {
        update { $0.state = "resyncing: comparing checksums" }
        logger.info("link to \(peer): the peer holds seq:\(seq), before this mirror's oldest point seq:\(snapshot.seq), with no record of the blocks changed since; comparing checksum trees")
        let tree = try PointTree(snapshot: snapshot, progress: LogProgress(logger: logger, prefix: "link to \(peer)"))
        for attempt in 1...50 {
            let report = try LinkInspection.compare(tree: tree, peer: peer, context: context, group: group, logger: logger)
            if report.peerSeq == seq {
                var out = DirtySet()
                for b in report.differing { out.insert(b) }
                logger.info("link to \(peer): \(out.count) blocks differ (\(report.queries) questions, \(report.bytesSent + report.bytesReceived) bytes of checksums exchanged)")
                update { $0.bytesSent += report.bytesSent; $0.checksumBytesReceived += report.bytesReceived }
                return out
            }
            guard report.peerSeq < seq, attempt < 50 else {
                throw LinkError("the peer compared at seq:\(report.peerSeq), not at seq:\(seq) it holds")
            }
            Thread.sleep(forTimeInterval: 0.1)  // its index commits within 100 ms
        }
        throw LinkError("the peer's index did not reach seq:\(seq)")
    }

    /// Forward one of this mirror's catch-up records to a peer that holds the seq it follows.
    private func forwardCatchUp(_ channel: Channel, _ inbox: LinkInbox, _ record: ReplicatedRecord) throws {
        logger.info("link to \(peer): forwarding the catch-up seq:\(record.offset)→seq:\(record.seq) as one point")
        var pinged = Date()
        var frames = 0
        try mirror.forEachCatchUpData(seq: record.seq, maxBytes: Self.batchBytes, runs: { runs in
            channel.writeAndFlush(LinkCatchUpBegin(from: record.offset, seq: record.seq, timestamp: record.timestamp, runs: runs).frame,
                                  promise: nil)
        }, data: { piece in
            if isStopping { throw LinkError("stopped") }
            pingIfQuiet(channel, &pinged)
            if let f = try inbox.next(waiting: 0) {
                if f.kind == .refuse { throw LinkError("refused by the peer: \(try LinkRefusal(f).reason)") }
                if f.kind != .keepalive { throw LinkError("a \(f.kind) frame while forwarding a catch-up") }
            }
            let frame = LinkCatchUpData.frame(piece)
            frames += 1
            if frames % 8 == 0 { try channel.writeAndFlush(frame).wait() } else { channel.writeAndFlush(frame, promise: nil) }
            update { $0.bytesSent += UInt64(piece.count + LinkFrame.overheadBytes) }
        })
        try channel.writeAndFlush(LinkCatchUpData.endFrame(checksum: record.checksum)).wait()
        try awaitAck(record.seq, of: "the forwarded catch-up", channel, inbox)
        acked(record.seq)
        update { $0.sentSeq = record.seq }
    }

    /// Wait (up to 600 s) for the peer to ack `seq`, the end of a seed or a catch-up: it syncs
    /// and indexes first, so keepalives go meanwhile to keep the link from falling silent.
    private func awaitAck(_ seq: UInt64, of what: String, _ channel: Channel, _ inbox: LinkInbox) throws {
        let deadline = Date(timeIntervalSinceNow: 600)
        var pinged = Date()
        while Date() < deadline {
            pingIfQuiet(channel, &pinged)
            guard let f = try inbox.next(waiting: 1) else { continue }
            switch f.kind {
            case .ack:
                let acked = try LinkSeq(f).seq
                guard acked == seq else { throw LinkError("the peer acked seq:\(acked) for \(what) to seq:\(seq)") }
                return
            case .keepalive: continue
            case .refuse: throw LinkError("refused by the peer: \(try LinkRefusal(f).reason)")
            default: throw LinkError("a \(f.kind) frame where \(what)'s ack was due")
            }
        }
        throw LinkError("the peer did not ack \(what) within 600 s")
    }

    /// A keepalive when none went for `LinkTiming.keepaliveSeconds`: the receiver answers it,
    /// so a long seed or catch-up, during which it sends nothing else, is never taken for a
    /// silent link (30 s) by this end.
    private func pingIfQuiet(_ channel: Channel, _ last: inout Date) {
        guard Date().timeIntervalSince(last) >= Double(LinkTiming.keepaliveSeconds) else { return }
        channel.writeAndFlush(LinkFrame(.keepalive), promise: nil)
        last = Date()
    }

    /// Send records from `durable` + 1 on, keeping at most `windowBytes` unacknowledged.
    private func stream(_ channel: Channel, _ inbox: LinkInbox, from durable: UInt64) throws {
        var next = durable + 1
        var inflight: [(last: UInt64, bytes: Int)] = []
        var unacked = 0
        var lastSent = Date(), lastRecorded = Date.distantPast
        while !isStopping {
            // Acknowledgements first: they open the window.
            while let f = try inbox.next(waiting: 0) { try handle(f, &inflight, &unacked, sent: next - 1) }
            // The position, once a second even while batches go out back to back: retention
            // holds at it, and a stale one would let it fold what the peer is about to ack.
            if Date().timeIntervalSince(lastRecorded) >= 1 {
                try recordPeer(sync: true)
                lastRecorded = Date()
            }
            if lock.withLock({ untilCaughtUp }), inflight.isEmpty, let d = status.durableSeq, d >= (try mirror.meta().lastSeq) {
                try recordPeer(sync: true)
                return
            }
            if unacked < Self.windowBytes {
                let batch = try mirror.replicatedRecords(from: next, maxRecords: Self.batchRecords, maxBytes: Self.batchBytes)
                if let first = batch.first, first.kind == .catchUp {
                    // This mirror was caught up itself (a cascade): once the peer holds what
                    // precedes it, it is forwarded as a catch-up too.
                    while !inflight.isEmpty, let f = try inbox.next(waiting: 1) { try handle(f, &inflight, &unacked, sent: next - 1) }
                    guard inflight.isEmpty else { continue }
                    try forwardCatchUp(channel, inbox, first)
                    next = first.seq + 1
                    continue
                }
                if let last = batch.last {
                    let frame = LinkRecords.frame(batch)
                    let bytes = frame.body.readableBytes
                    channel.writeAndFlush(frame, promise: nil)
                    inflight.append((last.seq, bytes))
                    unacked += bytes
                    next = last.seq + 1
                    lastSent = Date()
                    update { $0.sentSeq = last.seq; $0.bytesSent += UInt64(bytes + LinkFrame.overheadBytes) }
                    continue
                }
            }
            if Date().timeIntervalSince(lastSent) >= Double(LinkTiming.keepaliveSeconds) {
                channel.writeAndFlush(LinkFrame(.keepalive), promise: nil)
                lastSent = Date()
            }
            if let f = try inbox.next(waiting: Self.pollSeconds) { try handle(f, &inflight, &unacked, sent: next - 1) }
        }
    }

    private func handle(_ f: LinkFrame, _ inflight: inout [(last: UInt64, bytes: Int)], _ unacked: inout Int, sent: UInt64) throws {
        switch f.kind {
        case .ack:
            let seq = try LinkSeq(f).seq
            guard seq <= sent else { throw LinkError("the peer acked seq:\(seq), beyond the last sent (seq:\(sent))") }
            while let first = inflight.first, first.last <= seq {
                unacked -= first.bytes
                inflight.removeFirst()
            }
            acked(seq)
        case .keepalive:
            update { $0.heard = wallClockNanoseconds() }
        case .refuse:
            throw LinkError("refused by the peer: \(try LinkRefusal(f).reason)")
        default:
            throw LinkError("an unexpected \(f.kind) frame from the peer")
        }
    }
}

/// What a sender reports (status, metrics).
public struct LinkSenderStatus: Sendable, Equatable {
    public var state = "connecting"
    public var connected = false
    /// The newest seq the peer acknowledged as durable (nil: not heard from yet).
    public var durableSeq: UInt64?
    public var sentSeq: UInt64?
    /// When the peer was last heard (ns since 1970).
    public var heard: UInt64?
    /// Frame bytes sent (records; the TLS records around them are not counted).
    public var bytesSent: UInt64 = 0
    /// Frame bytes of checksums the peer sent back in resyncs (its tree's differing subtrees).
    public var checksumBytesReceived: UInt64 = 0
    public var mode = "async"
}
