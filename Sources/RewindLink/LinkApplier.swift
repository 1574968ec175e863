import Foundation
import Logging
import NIOCore
import RewindCore

/// The receiver's one writer: takes connections' frames in arrival order on a thread of its
/// own (LMDB's write transaction belongs to one thread) and applies them to the mirror.
final class LinkApplier: @unchecked Sendable {
    enum Event {
        case frame(LinkConnection, LinkFrame)
        case closed(LinkConnection)
    }

    let path: String
    let logger: Logger
    let onMirror: @Sendable (Mirror) -> Void
    private let cond = NSCondition()
    private var queue: [Event] = []
    private var queuedBytes = 0
    private var stopping = false
    private var stopped = false
    private var mirrorBox: Mirror?
    /// Open connections, closed by `stop`.
    private var connections: [ObjectIdentifier: LinkConnection] = [:]
    /// The newest batch appended and not yet synced, and the connection to ack (`runSyncer`).
    private var unsynced: (seq: UInt64, connection: LinkConnection)?
    private var syncerDone = false

    // Applier thread only.
    private var writer: JournalWriter?
    private var ownerLock: FileLock?
    private var active: LinkConnection?
    private var builder: ReplicaBuilder?
    /// A catch-up being received (`CatchUpWriter`); the writer is set aside meanwhile.
    private var catchUp: CatchUpWriter?

    /// Frames queued past this close their connection (a sender keeps to its window; seed and
    /// catch-up data are held back by `pauseQueuedBytes` first).
    static let maxQueuedBytes = 256 << 20
    /// Past this, a connection's reads pause until the applier has taken the queue: TCP's
    /// back-pressure then slows a seed's or a catch-up's sender to the pace of this disk.
    static let pauseQueuedBytes = 48 << 20
    /// Connections whose reads are paused (under `cond`).
    private var paused: [ObjectIdentifier: LinkConnection] = [:]
    /// Records applied in one append and one sync, at most.
    static let maxBatchBytes = 64 << 20

    /// Drop the log's pages once written back (serve's streaming mode): on when nothing
    /// forwards this mirror — a forwarding sender reads the records back, better from memory.
    let logOutOfCache: Bool

    /// `receive --rejoin`: a former origin's mirror is taken as a replica, and a newer
    /// generation's sender it diverged from is admitted after cutting the records after the
    /// seq that generation began at (they never reached the new origin).
    let rejoin: Bool
    /// `receive --seed-from IMAGE`: with no mirror yet, start from this earlier copy of the
    /// volume; the seed then sends only the blocks that differ from it.
    let staleCopy: String?
    /// The stale copy's tree while a seed compares it (applier thread).
    private var staleSums: BaseSums?

    init(path: String, logOutOfCache: Bool, rejoin: Bool = false, staleCopy: String? = nil, logger: Logger,
         onMirror: @escaping @Sendable (Mirror) -> Void) throws {
        self.rejoin = rejoin
        self.staleCopy = staleCopy
        self.path = path
        self.logOutOfCache = logOutOfCache
        self.logger = logger
        self.onMirror = onMirror
        if access(path, F_OK) == 0 { try open() }
    }

    var currentMirror: Mirror? { cond.withLock { mirrorBox } }

    /// Open the existing mirror as its owner; it must be a replica.
    private func open() throws {
        let lock = try FileLock(path: path + "/owner.lock", kind: .exclusive, waitSeconds: 3,
                                holder: "another rewind process (serve, receive or rollback) owns this mirror")
        let m = try Mirror.open(at: path, recover: true, ownerLockHeld: true)
        if try !m.isReplica() {
            guard rejoin else {
                lock.release()
                throw RewindError.invalidArgument("\(path) is an origin's mirror (serve writes it), not a replica; receive into a new directory, move it aside, or, for a former origin rejoining after a failover, give --rejoin")
            }
            try m.markReplica()
            logger.notice("\(path) was an origin's mirror; it is a replica from now on (--rejoin)")
        }
        ownerLock = lock
        writer = makeWriter(m)
        cond.withLock { mirrorBox = m }
    }

    /// The replica's writer: records are durable once the log is synced (what an ack says);
    /// the index is committed on a thread of its own, soon after (`requestCommit`), so LMDB's
    /// sync is off the ack's path — as on serve's write path.
    private func makeWriter(_ m: Mirror) -> JournalWriter {
        let w = JournalWriter(mirror: m)
        w.keepsLogOutOfCache = logOutOfCache
        w.indexOnThread(policy: .init(intervalNanoseconds: 100_000_000, maxChanges: 65536, maxBlocks: 16384),
                        onFailure: { [logger] e in logger.error("indexing received records failed: \(e); records are refused until a restart") },
                        readVolume: { _, _ in throw LinkError("a replicated record needs no read-modify-write") })
        return w
    }

    /// Why this receiver stores nothing more (its journal failed); a restart recovers. Under `cond`.
    private var failed: String?
    private var failure: String? { cond.withLock { failed } }

    func start() {
        if let m = currentMirror { onMirror(m) }
        let t = Thread { [self] in run() }
        t.name = "rewind-receive"
        t.start()
        let s = Thread { [self] in runSyncer() }
        s.name = "rewind-receive-sync"
        s.start()
    }

    /// Syncs the log behind the applier and acks what each sync covered, so the next batch is
    /// written while the last one is synced (as serve's log syncer does).
    private func runSyncer() {
        while true {
            let next: (seq: UInt64, connection: LinkConnection, mirror: Mirror)? = cond.withLock {
                while unsynced == nil && !stopping { cond.wait() }
                guard let u = unsynced, let m = mirrorBox else { return nil }
                unsynced = nil
                return (u.seq, u.connection, m)
            }
            guard let next else { break }
            do {
                try next.mirror.journal.log.sync()
                next.connection.channel.writeAndFlush(LinkSeq(.ack, seq: next.seq).frame, promise: nil)
            } catch {
                let why = "syncing received records failed: \(error)"
                cond.withLock { if failed == nil { failed = why } }
                logger.critical("\(why); this receiver refuses every stream until it is restarted")
                next.connection.refuse(why)
            }
        }
        cond.withLock { syncerDone = true; cond.broadcast() }
    }

    private var refusalsLogged: [String: UInt64] = [:]

    /// Whether a refusal is logged at error level: once a minute for the same host and reason.
    func shouldLog(refusal key: String) -> Bool {
        cond.withLock {
            let now = monotonicNanoseconds()
            if let last = refusalsLogged[key], now - last < 60_000_000_000 { return false }
            if refusalsLogged.count > 1024 { refusalsLogged.removeAll() }
            refusalsLogged[key] = now
            return true
        }
    }

    func register(_ c: LinkConnection) {
        cond.withLock { connections[ObjectIdentifier(c)] = c }
    }

    func stop() {
        let open = cond.withLock { Array(connections.values) }
        for c in open { c.channel.close(promise: nil) }
        cond.withLock { stopping = true; cond.broadcast() }
        cond.withLock { while !stopped || !syncerDone { cond.wait() } }
    }

    func enqueue(_ e: Event) {
        var overflow: LinkConnection?
        cond.withLock {
            if case let .closed(c) = e { connections[ObjectIdentifier(c)] = nil }
            if case let .frame(c, f) = e {
                if queuedBytes > Self.maxQueuedBytes { overflow = c; return }
                queuedBytes += f.body.readableBytes
                if queuedBytes > Self.pauseQueuedBytes && paused[ObjectIdentifier(c)] == nil {
                    paused[ObjectIdentifier(c)] = c
                    c.channel.setOption(ChannelOptions.autoRead, value: false).whenComplete { _ in }
                }
            }
            queue.append(e)
            cond.broadcast()  // the applier and the syncer wait on it
        }
        if let overflow {
            logger.error("link from \(overflow.shortPeer): more than \(Self.maxQueuedBytes >> 20) MiB queued; closing")
            overflow.channel.close(promise: nil)
        }
    }

    private func run() {
        while true {
            let events: [Event] = cond.withLock {
                while queue.isEmpty && !stopping { cond.wait() }
                let e = queue
                queue.removeAll()
                queuedBytes = 0
                for c in paused.values { c.channel.setOption(ChannelOptions.autoRead, value: true).whenComplete { _ in } }
                paused.removeAll()
                return e
            }
            if events.isEmpty { break }
            var batch: [ReplicatedRecord] = []
            var batchBytes = 0
            var batchFrom: LinkConnection?
            for e in events {
                switch e {
                case let .frame(c, f) where f.kind == .records && c === active && writer != nil:
                    do {
                        let records = try LinkRecords.decode(f)
                        batch += records
                        batchBytes += f.body.readableBytes
                        batchFrom = c
                        if batchBytes >= Self.maxBatchBytes { flush(&batch, &batchBytes, c) }
                    } catch {
                        fail(c, "\(error)")
                        batch.removeAll(); batchBytes = 0
                    }
                default:
                    if let from = batchFrom { flush(&batch, &batchBytes, from); batchFrom = nil }
                    handle(e)
                }
            }
            if let from = batchFrom { flush(&batch, &batchBytes, from) }
        }
        builder?.abandon()
        catchUp?.abandon()
        if failure == nil { try? writer?.commit() }
        writer = nil
        ownerLock?.release()
        cond.withLock { stopped = true; cond.broadcast() }
    }

    /// Append a batch and hand it to the syncer, which acks it once durable; a bad record
    /// resets the connection.
    private func flush(_ batch: inout [ReplicatedRecord], _ bytes: inout Int, _ c: LinkConnection) {
        defer { batch.removeAll(keepingCapacity: true); bytes = 0 }
        guard c === active, let writer, let last = batch.last else { return }
        do {
            try writer.appendReplicated(batch)
        } catch {
            // Checked before anything is written: the batch was refused whole.
            fail(c, "records seq:\(batch[0].seq)…\(last.seq) refused: \(error)")
            return
        }
        writer.requestCommit()
        cond.withLock {
            unsynced = (last.seq, c)
            cond.broadcast()
        }
    }

    /// Log, tell the sender, and close: it reconnects and resumes from the durable seq.
    private func fail(_ c: LinkConnection, _ why: String) {
        logger.error("link from \(c.shortPeer): \(why); resetting the link")
        c.refuse(why)
        if c === active { active = nil }
    }

    private func handle(_ e: Event) {
        switch e {
        case let .closed(c):
            if c === active {
                logger.info("link from \(c.shortPeer): closed")
                active = nil
                if let b = builder { b.abandon(); builder = nil; staleSums = nil; logger.warning("seed from \(c.shortPeer) abandoned unfinished; the next connection seeds again") }
                if catchUp != nil {
                    abandonCatchUp()
                    logger.warning("catch-up from \(c.shortPeer) abandoned unfinished; this mirror stays at its previous point")
                }
            }
        case let .frame(c, f):
            if f.kind == .hello { hello(c, f); return }
            guard c === active else { return }  // a replaced connection's late frames
            do {
                switch f.kind {
                case .seedBegin: try seedBegin(c, LinkSeedBegin.decode(f))
                case .seedData:
                    guard let builder else { throw LinkError("seed data without a seed") }
                    let (offset, bytes) = try LinkSeedData.decode(f)
                    try bytes.withUnsafeReadableBytes { try builder.write(at: offset, $0) }
                case .seedEnd: try seedEnd(c, LinkSeedData.decodeEnd(f))
                case .seedZero:
                    guard let builder, staleSums != nil else { throw LinkError("seed zeros without a seed from a stale copy") }
                    let (offset, length) = try LinkSeedData.decodeZero(f)
                    try builder.zero(at: offset, length: length)
                case .treeQuery:
                    guard let sums = staleSums else { throw LinkError("a tree question without a seed from a stale copy") }
                    c.channel.writeAndFlush(try LinkTreeAnswer(answering: LinkTreeQuery(f), from: sums).frame, promise: nil)
                case .catchUpBegin: try catchUpBegin(c, LinkCatchUpBegin(f))
                case .catchUpData:
                    guard let catchUp else { throw LinkError("catch-up data without a catch-up") }
                    try f.body.withUnsafeReadableBytes { try catchUp.write($0) }
                case .catchUpEnd: try catchUpEnd(c, LinkCatchUpData.decodeEnd(f))
                case .records: throw LinkError("records before the mirror exists")
                default: throw LinkError("an unexpected \(f.kind) frame")
                }
            } catch {
                if let b = builder { b.abandon(); builder = nil; staleSums = nil }
                if catchUp != nil { abandonCatchUp() }
                fail(c, "\(error)")
            }
        }
    }

    private func hello(_ c: LinkConnection, _ f: LinkFrame) {
        let hello: LinkHello
        do { hello = try LinkHello(f) } catch {
            logger.error("link from \(c.shortPeer): refused: \(error)")
            c.refuse("\(error)")
            return
        }
        if let failed = failure {
            c.refuse("the receiver cannot store records: \(failed)")
            return
        }
        var local: LinkVolume?
        if let m = currentMirror {
            do {
                try m.journal.log.sync()  // what the welcome names is durable
                let meta = try m.meta()
                // Records the log holds durably count, indexed or not (the index follows).
                local = LinkVolume(uuid: meta.uuid, size: meta.volumeSize, blockSize: meta.blockSize,
                                   generation: meta.generation, durableSeq: writer?.lastSeq ?? meta.lastSeq)
            } catch {
                logger.error("link from \(c.shortPeer): refused: this mirror cannot be read: \(error)")
                c.refuse("the receiver's mirror cannot be read")
                return
            }
        }
        var answer = LinkAdmission.answer(hello, local: local)
        if answer.kind == .refuse, rejoin, let m = currentMirror, let l = local, hello.volumeUUID == l.uuid,
           hello.volumeSize == l.size, hello.blockSize == l.blockSize, hello.generation > l.generation,
           l.durableSeq > hello.generationStart {
            // A former origin rejoining: what it wrote after the failover point never reached
            // the new origin; cut it, then follow the new generation from that point.
            do {
                try writer?.commit()
                writer = nil
                let cut = try m.rollback(to: .seq(hello.generationStart), source: nil, ownerLockHeld: true)
                writer = makeWriter(m)
                logger.notice("link from \(c.shortPeer): rejoining: seq:\(hello.generationStart + 1)…seq:\(l.durableSeq) of generation \(l.generation), written after the failover point and never replicated, are cut (\(cut.recordsRemoved) records)")
                local?.durableSeq = hello.generationStart
                answer = LinkAdmission.answer(hello, local: local)
            } catch {
                if writer == nil { writer = makeWriter(m) }
                logger.error("link from \(c.shortPeer): refused: cannot rejoin at seq:\(hello.generationStart): \(error)")
                c.refuse("the receiver cannot rejoin at seq:\(hello.generationStart): \(error)")
                return
            }
        }
        if answer.kind == .needSeed, staleCopy != nil {
            var body = ByteBuffer()
            body.writeInteger(UInt8(1))  // a stale copy to compare: only differences, please
            answer = LinkFrame(.needSeed, body: body)
        }
        if answer.kind == .refuse {
            let why = (try? LinkRefusal(answer).reason) ?? "refused"
            if shouldLog(refusal: c.peerID + " " + why) {
                logger.error("link from \(c.shortPeer): refused: \(why)")
            } else {
                logger.debug("link from \(c.shortPeer): refused: \(why)")
            }
            c.refuse(why)
            return
        }
        // Admitted: only now does it replace the connection streaming so far.
        if let old = active, old !== c {
            logger.info("link from \(c.shortPeer) replaces the one from \(old.shortPeer)")
            old.channel.close(promise: nil)
        }
        if let b = builder { b.abandon(); builder = nil; staleSums = nil }
        if catchUp != nil { abandonCatchUp() }
        active = nil
        if let m = currentMirror, let local, hello.generation > local.generation {
            do {
                // The header is rewritten outside the index thread: it commits and stops first.
                try writer?.commit()
                writer = nil
                try m.adoptGeneration(hello.generation, start: hello.generationStart)
                writer = makeWriter(m)
                logger.notice("link from \(c.shortPeer): the sender's generation \(hello.generation) (continuing from seq:\(hello.generationStart)) replaces generation \(local.generation)")
            } catch {
                if writer == nil { writer = makeWriter(m) }
                logger.error("link from \(c.shortPeer): refused: cannot record the sender's generation: \(error)")
                c.refuse("the receiver cannot record the new generation")
                return
            }
        }
        active = c
        if answer.kind == .welcome {
            logger.info("link from \(c.shortPeer): resuming after seq:\(local?.durableSeq ?? 0) (the sender has seq:\(hello.lastSeq))")
        }
        c.channel.writeAndFlush(answer, promise: nil)
    }

    private func seedBegin(_ c: LinkConnection, _ seed: ReplicaSeed) throws {
        guard currentMirror == nil, builder == nil else { throw LinkError("a seed for a mirror that exists") }
        let b = try ReplicaBuilder(path: path, seed: seed, stale: staleCopy)
        builder = b
        logger.info("link from \(c.shortPeer): seeding \(path): volume \(formatUUID(seed.uuid)), \(seed.volumeSize) bytes, as of seq:\(seed.horizon)\(staleCopy.map { " from the stale copy \($0)" } ?? "")")
        if staleCopy != nil {
            // Hash the copy, then answer the sender's questions: only the differences follow.
            let sums = try b.staleSums(progress: LogProgress(logger: logger, prefix: "link from \(c.shortPeer)"))
            staleSums = sums
            c.channel.writeAndFlush(LinkInspectReady(seq: seed.horizon, root: try sums.node(level: sums.tree.top, index: 0)).frame, promise: nil)
        }
    }

    private func seedEnd(_ c: LinkConnection, _ sent: UInt64) throws {
        guard let b = builder else { throw LinkError("a seed end without a seed") }
        staleSums = nil
        guard b.bytesWritten == sent else { throw LinkError("the seed ended after \(b.bytesWritten) bytes; the sender sent \(sent)") }
        builder = nil
        _ = try b.finish()
        try open()
        logger.info("link from \(c.shortPeer): seeded \(path) (\(sent) bytes of data) as of seq:\(b.seed.horizon)")
        c.channel.writeAndFlush(LinkSeq(.ack, seq: b.seed.horizon).frame, promise: nil)
        if let m = currentMirror { onMirror(m) }
    }

    /// A catch-up: the writer (and its index thread) is set aside — committed first, so the
    /// mirror's newest record is the durable seq the welcome named — and the catch-up written
    /// on its own, applied as one point at its end.
    private func catchUpBegin(_ c: LinkConnection, _ begin: LinkCatchUpBegin) throws {
        guard let m = currentMirror, catchUp == nil, builder == nil else { throw LinkError("a catch-up without a mirror, or inside another") }
        try writer?.commit()
        writer = nil
        do {
            catchUp = try CatchUpWriter(mirror: m, from: begin.from, seq: begin.seq, timestamp: begin.timestamp, runs: begin.runs)
        } catch {
            writer = makeWriter(m)
            throw error
        }
        let blocks = begin.runs.reduce(UInt64(0)) { $0 + UInt64($1.blocks.count) }
        logger.info("link from \(c.shortPeer): catching up from seq:\(begin.from) to seq:\(begin.seq) as one point (\(blocks) blocks in \(begin.runs.count) runs)")
    }

    private func catchUpEnd(_ c: LinkConnection, _ checksum: UInt64) throws {
        guard let cu = catchUp, let m = currentMirror else { throw LinkError("a catch-up end without a catch-up") }
        try cu.finish(checksum: checksum)
        catchUp = nil
        writer = makeWriter(m)
        logger.info("link from \(c.shortPeer): caught up to seq:\(cu.seq)")
        c.channel.writeAndFlush(LinkSeq(.ack, seq: cu.seq).frame, promise: nil)
    }

    private func abandonCatchUp() {
        catchUp?.abandon()
        catchUp = nil
        if writer == nil, let m = currentMirror { writer = makeWriter(m) }
    }
}
