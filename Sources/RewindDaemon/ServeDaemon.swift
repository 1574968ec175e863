import Foundation
import Logging
import Metrics
import NIOCore
import NIOPosix
import Prometheus
import RewindCore
import RewindLink
import RewindNBD
import ServiceLifecycle

/// `rewind serve`: open (or create) the source and its mirror, bring the source up to the
/// journal after an unclean stop, then serve NBD until SIGTERM/SIGINT, when in-flight
/// requests are answered, source and journal synced and the journal closed cleanly.
public enum ServeDaemon {
    /// Serve until SIGTERM/SIGINT. Returns false when the volume was fenced (writes refused
    /// after a failure): the caller exits non-zero, so a service manager sees the failure.
    /// Run by systemd (`NOTIFY_SOCKET`), it is told of readiness once every listener is bound,
    /// kept by the watchdog, told of a fence and of the stop, and given the reason of a
    /// refused start (`SystemdNotifier`).
    public static func run(_ options: ServeOptions, progress: ProgressObserver?) async throws -> Bool {
        guard let notifier = SystemdNotifier.takeFromEnvironment() else {
            return try await serve(options, progress: progress, notifier: nil)
        }
        do {
            return try await serve(options, progress: SystemdStartProgress(notifier: notifier, passingTo: progress),
                                   notifier: notifier)
        } catch {
            // The same reason is the `rewind: error:` line on stderr, which systemd journals.
            notifier.notify([.status("\(notifier.isReady ? "failed" : "refused"): \(error)")])
            throw error
        }
    }

    static func serve(_ options: ServeOptions, progress: ProgressObserver?, notifier: SystemdNotifier?) async throws -> Bool {
        DaemonSupport.bootstrapLogging(level: options.logLevel)
        let logger = Logger(label: "rewind.serve")
        let registry = DaemonSupport.bootstrapMetrics(options.metrics != nil)
        let metrics = ServeMetrics()

        let addresses = try DaemonSupport.listenAddresses(options.listen)
        let identity = options.replicateTo.isEmpty ? nil : try Replication.context(home: options.home).0

        // The volume: source, mirror, ownership, recovery.
        let prepared = try prepare(options, logger: logger, progress: progress)
        metrics.logger = logger
        var tuning = ServePipeline.Tuning.serve
        tuning.keepsLogOutOfCache = options.replicateTo.isEmpty
        let writer = ServePipeline(mirror: prepared.mirror, source: prepared.source, sourceSyncedSeq: prepared.syncedSeq,
                                   tuning: tuning, onFull: options.onFull, observer: metrics)
        let links = try ReplicationSetup(options, identity: identity, mirror: prepared.mirror, writer: writer, logger: logger)
        writer.start()
        let pool = NIOThreadPool(numberOfThreads: 4)
        pool.start()
        let group = MultiThreadedEventLoopGroup(numberOfThreads: max(1, System.coreCount))
        let volume = try ServeVolume(source: prepared.source, writer: writer, pool: pool,
                                     canFastZero: probeZeroRange(near: options.source))
        let exportName = options.export ?? URL(fileURLWithPath: options.source).lastPathComponent
        let export = NBDExport(name: exportName, description: options.description ?? "rewind: \(options.source)", target: volume)
        let catalog = PointCatalog(primary: export, mirror: prepared.mirror, pool: pool, logger: logger) { [writer] in
            _ = try? writer.durablePoint(timeoutSeconds: 5)
        }
        let server = NBDServer(catalog: catalog, group: group, maxConnections: options.maxConnections, observer: metrics,
                               logger: logger)
        // Other processes (bookmark, timeline, restore, export) ask for the durable point here.
        let control = startControlServer(prepared.mirror, writer: writer, logger: logger)
        let bound: [String]
        do {
            bound = try await server.start(addresses)
        } catch {
            control?.stop()
            writer.stop()
            recordCleanStop(prepared, writer: writer, logger: logger)
            try? await group.shutdownGracefully()
            if let e = error as? ListenError { throw RewindError.invalidArgument(e.description) }  // names its address
            throw RewindError.invalidArgument("cannot listen on \(addresses.map(\.description).joined(separator: ", ")): \(error)")
        }
        var metricsChannel: Channel?
        if let address = options.metrics, let registry {
            metricsChannel = try await startMetricsServer(address, registry: registry, group: group)
        }
        announce(options: options, mirror: prepared.mirror, export: exportName, bound: bound,
                 metrics: metricsChannel.flatMap { c in c.localAddress.map { "\($0.ipAddress ?? "127.0.0.1"):\($0.port ?? 0)" } })
        // Every listener is bound and accepting: a Type=notify unit becomes active now, never before.
        let servingStatus = "serving \(options.source) on \(bound.joined(separator: ", "))"
        notifier?.notify([.ready, .status(servingStatus), .mainPID(getpid())])

        try await runServices(server: server, writer: writer, mirror: prepared.mirror, options: options, metrics: metrics,
                              pool: pool, group: group, links: links, notifier: notifier, servingStatus: servingStatus, logger: logger)
        control?.stop()
        try? await metricsChannel?.close()
        try? await pool.shutdownGracefully()
        try? await group.shutdownGracefully()
        try? await links.group?.shutdownGracefully()
        recordCleanStop(prepared, writer: writer, logger: logger)
        prepared.lock.release()
        prepared.sourceLock.release()
        let lastSeq = (try? prepared.mirror.meta().lastSeq) ?? 0
        if let why = writer.fenceReason {
            logger.error("stopped; writes were refused since: \(why); the journal holds seq:\(lastSeq), and the next start brings the source to it")
            return false
        }
        let syncs = writer.syncs
        logger.info("stopped cleanly; journal at seq:\(lastSeq); syncs: \(ServePipeline.SyncKind.allCases.map { "\($0.rawValue) \(syncs[$0] ?? 0)" }.joined(separator: ", "))")
        return true
    }

    /// Run a serving daemon's services (serve's and tap's alike) until SIGTERM/SIGINT: the NBD
    /// server and its writer, the pin watch, the replication links, retention, systemd's
    /// notifications.
    static func runServices(server: NBDServer, writer: ServePipeline, mirror: Mirror, options: ServeOptions, metrics: ServeMetrics,
                            pool: NIOThreadPool, group: any EventLoopGroup, links: ReplicationSetup, notifier: SystemdNotifier?,
                            servingStatus: String, logger: Logger) async throws {
        var services: [any Service] = [ServeService(server: server, writer: writer, logger: logger),
                                       PinWatchService(mirror: mirror, options: options, metrics: metrics, logger: logger)]
        if let replication = links.replication { services.append(ReplicationService(replication: replication, gate: links.gate)) }
        if options.keepAgeNanoseconds != nil || options.keepBytes != nil {
            services.append(RetentionService(mirror: mirror, writer: writer, options: options, pool: pool, metrics: metrics, logger: logger))
        }
        if let notifier {
            // Last: the group shuts services down in reverse order, so STOPPING=1 precedes the drain.
            services.append(SystemdNotifyService(notifier: notifier, probe: LivenessProbe(group: group, pool: pool, writer: writer),
                                                 servingStatus: servingStatus, logger: logger))
        }
        let serviceGroup = ServiceGroup(configuration: .init(services: services.map { .init(service: $0) },
                                                             gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await serviceGroup.run()
    }

    /// The control socket (`ControlSocket`); a failure to bind it is logged, not fatal: other
    /// commands then read the index as committed.
    static func startControlServer(_ mirror: Mirror, writer: ServePipeline, logger: Logger) -> ControlServer? {
        do {
            return try ControlServer(mirror: mirror) { [writer] request in
                guard request == "durable" else { return "error unknown request \"\(request.prefix(40))\"" }
                do {
                    let point = try writer.durablePoint()
                    return "ok \(point.flushed) \(point.appended)"
                } catch {
                    return "error \(error)"
                }
            }
        } catch {
            logger.warning("no control socket (\(error)): bookmarks name the index's last commit, up to a second behind")
            return nil
        }
    }

    struct Prepared {
        var mirror: Mirror
        var source: BlockFile
        /// `owner.lock` of the mirror, and the flock on SOURCE: held until the server stops.
        var lock: FileLock
        var sourceLock: SourceLock
        var syncedSeq: UInt64
    }

    /// `prepareVolume`; a source it created for an existing mirror that then refused it (a
    /// replica, another source's mirror, one owned by another process) is removed again, so a
    /// refused start leaves nothing behind.
    static func prepare(_ o: ServeOptions, logger: Logger, progress: ProgressObserver?) throws -> Prepared {
        let mirrorPath = o.mirror ?? o.source + ".rewind"
        let mirrorExisted = access(mirrorPath, F_OK) == 0
        let sourceExisted = access(o.source, F_OK) == 0
        // A replica is refused before anything is created (it is checked again once owned).
        if mirrorExisted, let existing = try? Mirror.open(at: mirrorPath), try existing.isReplica() {
            throw RewindError.replica(path: mirrorPath)
        }
        do {
            return try prepareVolume(o, logger: logger, progress: progress)
        } catch {
            if mirrorExisted && !sourceExisted && unlink(o.source) == 0 {
                logger.info("removed \(o.source), created for this start")
            }
            throw error
        }
    }

    static func prepareVolume(_ o: ServeOptions, logger: Logger, progress: ProgressObserver?) throws -> Prepared {
        let mirrorPath = o.mirror ?? o.source + ".rewind"
        if access(o.source, F_OK) != 0 {
            guard let size = o.size else {
                throw RewindError.invalidArgument("\(o.source) does not exist (give --size to create it)")
            }
            guard size > 0, size % UInt64(o.blockSize) == 0 else {
                throw RewindError.invalidArgument("--size \(size) must be a positive multiple of the block size \(o.blockSize)")
            }
            let f = try BlockFile(path: o.source, mode: .createNew)
            try f.truncate(to: size)
            logger.info("created sparse source \(o.source) of \(size) bytes")
        }
        // One owner per mirror (`owner.lock`) and one server per source (`SourceLock`: an
        // exclusive flock on SOURCE itself, and O_EXCL for a block device). An existing
        // mirror's owner lock comes first, so a second serve of a served mirror says that; the
        // source's lock is taken before any mirror is created or opened for writing, so a
        // second serve of the source through another mirror stops there, having changed nothing.
        // A moment's wait for owner.lock: a reader indexing a crashed server's log tail holds it briefly.
        func takeOwnerLock() throws -> FileLock {
            try FileLock(path: mirrorPath + "/owner.lock", kind: .exclusive, waitSeconds: 3,
                         holder: "another rewind process (serve, receive or rollback) owns this mirror")
        }
        var existingOwnerLock: FileLock?
        if access(mirrorPath, F_OK) == 0 { existingOwnerLock = try takeOwnerLock() }
        let sourceLock = try SourceLock(path: o.source)
        let current = try sourceLock.identity()
        let source = try BlockFile(path: o.source, mode: .readWrite)
        guard try SourceIdentity(describing: source.fd, path: o.source).isSameFile(as: current) else {
            throw RewindError.invalidArgument("\(o.source) was replaced while rewind opened it; start again")
        }
        let sourceSize = try source.size()
        if access(mirrorPath, F_OK) != 0 {
            logger.info("creating mirror \(mirrorPath) from \(o.source)")
            try Mirror.create(at: mirrorPath, from: o.source, blockSize: o.blockSize, progress: progress)
        }
        let lock = try existingOwnerLock ?? takeOwnerLock()
        let mirror = try Mirror.open(at: mirrorPath, recover: true, ownerLockHeld: true)
        try mirror.refuseIfReplica()
        if let damage = mirror.logDamage {
            logger.error("\(damage); the source may still hold what those records wrote: check with rewind verify \(mirrorPath) --against \(o.source)")
        }
        // Payload the journal needs is gone (a log file deleted or cut short): appending after
        // it would hide the loss behind new history. Refuse unless told to go on.
        let gaps = try mirror.logGaps()
        if let gap = gaps.first {
            guard o.acceptDamage else {
                throw RewindError.damagedMirror(path: mirrorPath, why: "\(gap)\(gaps.count > 1 ? " (and \(gaps.count - 1) more)" : ""); `rewind verify \(mirrorPath)` shows what is lost; start with --accept-damage to serve anyway (points that need the lost payload stay unreadable)")
            }
            for g in gaps { logger.error("mirror \(mirrorPath): \(g); serving anyway (--accept-damage)") }
        }
        // The mirror journals one file: refuse another (its journal would be replayed into it
        // and describe the wrong volume), before anything is written to the source.
        let recorded = try mirror.sourceIdentity()
        try recorded?.check(current, mirror: mirrorPath, given: o.source)
        // A clean stop recorded the source's size, times and sampled blocks: if the journal
        // has not moved since, the source must still hold them, else something wrote it without
        // rewind. Checked before the size check below (whose "not its mirror" would mislead
        // here), then deleted, so that a start after a crash never compares against it.
        switch try mirror.checkSourceAgainstStopState(source, given: o.source) {
        case let .touched(seq):
            logger.notice("\(o.source) was touched since rewind serve stopped at seq:\(seq) (its mtime or ctime moved), but every sampled block matches the mirror: serving it")
        case let .unreadable(why):
            logger.warning("cannot check \(o.source) against the last clean stop: \(why); serving without that check")
        case .notRecorded, .outdated, .unchanged:
            break
        }
        try mirror.clearSourceState()
        guard mirror.volumeSize == sourceSize else {
            throw RewindError.invalidArgument("\(o.source) is \(sourceSize) bytes but mirror \(mirrorPath) holds a volume of \(mirror.volumeSize): not its mirror")
        }
        if recorded != current {
            try mirror.recordSource(current)
            if let recorded {
                // The same file, found under another path or device number (moved, a reboot).
                logger.notice("source of mirror \(mirrorPath) was \(recorded), is now \(current): recorded")
            } else {
                logger.info("recorded \(current) as the source of mirror \(mirrorPath)")
            }
        }
        let fence = mirror.fenceRecord()
        if let fence { logger.warning("the last server of \(mirrorPath) fenced the volume: \(fence); bringing the source up to the journal") }
        var meta = try mirror.meta()
        if meta.pendingRollback != UInt64.max { throw mirror.unfinishedRollbackError(target: meta.pendingRollback) }
        if meta.sourceSyncedSeq < meta.lastSeq {
            // Unclean stop: the records after the source's last sync may have reached the journal
            // and not the source (the source never holds what the journal lacks: write-ahead).
            logger.notice("replaying records seq:\(meta.sourceSyncedSeq + 1)...seq:\(meta.lastSeq) into \(o.source)")
            let started = monotonicNanoseconds()
            if let done = try mirror.bringSourceUpToDate(source, progress: progress) {
                let seconds = String(format: "%.3f", Double(monotonicNanoseconds() - started) / 1e9)
                if done.rewrite.wholeVolume {
                    logger.warning("records after seq:\(meta.sourceSyncedSeq) were already folded into the base: rewrote all \(done.rewrite.blocks) blocks in \(seconds) s")
                } else {
                    logger.notice("replayed \(done.rewrite.records) records: \(done.rewrite.blocks) blocks rewritten in \(seconds) s")
                }
            }
            meta = try mirror.meta()
        }
        if fence != nil { mirror.clearFenceRecord() }
        return Prepared(mirror: mirror, source: source, lock: lock, sourceLock: sourceLock, syncedSeq: meta.sourceSyncedSeq)
    }

    /// Once the writer has stopped, while `owner.lock` is held: record what the source holds
    /// for the next start's check (`Mirror.recordSourceState`). Not after a fence or a failed
    /// final sync: the next start brings the source to the journal instead.
    static func recordCleanStop(_ prepared: Prepared, writer: ServePipeline, logger: Logger) {
        guard writer.fenceReason == nil else { return }
        do {
            if let state = try prepared.mirror.recordSourceState(of: prepared.source) {
                logger.debug("recorded the source's size, times and \(state.samples.count) sampled blocks at seq:\(state.lastSeq) for the next start's check")
            }
        } catch {
            logger.warning("could not record the source's state for the next start's check: \(error)")
        }
    }

    /// Can the file system beside the source zero a range without writing (FALLOC_FL_ZERO_RANGE)?
    static func probeZeroRange(near source: String) -> Bool {
        let dir = URL(fileURLWithPath: source).deletingLastPathComponent().path
        let probe = dir + "/.rewind-probe-\(getpid())"
        defer { unlink(probe) }
        guard let f = try? BlockFile(path: probe, mode: .createOrTruncate),
              (try? f.write(at: 0, [UInt8](repeating: 1, count: 4096))) != nil else { return false }
        return (try? f.zeroRange(at: 0, length: 4096)) ?? false
    }

    static func announce(options: ServeOptions, mirror: Mirror, export: String, bound: [String], metrics: String?, verb: String = "serving") {
        let first = bound.first ?? ""
        let uri = first.hasPrefix("unix:") ? "nbd+unix:///\(export)?socket=\(first.dropFirst(5))" : "nbd://\(first)/\(export)"
        if options.json {
            let payload: [String: Any] = ["source": options.source, "mirror": mirror.path, "export": export,
                                          "listening": bound, "uri": uri, "size": mirror.volumeSize,
                                          "metrics": metrics ?? NSNull()]
            if let data = try? JSONSerialization.data(withJSONObject: payload, options: [.sortedKeys, .withoutEscapingSlashes]) {
                FileHandle.standardOutput.write(data + Data("\n".utf8))
            }
        } else {
            var text = "rewind: \(verb) \(options.source) (\(mirror.volumeSize) bytes) with mirror \(mirror.path)\n"
            for b in bound { text += "  listening on \(b)\n" }
            if let metrics { text += "  metrics on http://\(metrics)/metrics\n" }
            text += "  connect with: nbdinfo '\(uri)'\n"
            FileHandle.standardOutput.write(Data(text.utf8))
        }
    }
}

/// The links of `--replicate-to` (and `--ack sync`'s gate on the writer), with their event
/// loop: nothing when there are no peers.
struct ReplicationSetup {
    var group: MultiThreadedEventLoopGroup?
    var replication: Replication?
    var gate: SyncGate?

    init(_ options: ServeOptions, identity: UnitIdentity?, mirror: Mirror, writer: ServePipeline, logger: Logger) throws {
        guard let identity else { return }
        let g = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        group = g
        let replication = try Replication(mirror: mirror, peers: options.replicateTo, identity: identity, group: g, logger: logger,
                                          keepBytes: options.peerKeepBytes, minFreeBytes: options.peerMinFreeBytes)
        self.replication = replication
        if options.ackSync, let first = replication.senders.first {
            let g = SyncGate(sender: first, mirror: mirror, timeoutSeconds: options.syncTimeoutSeconds, logger: logger)
            writer.syncGate = { seq, release in g.hold(seq, release) }
            gate = g
        }
    }
}

/// Runs until graceful shutdown, then stops accepting, drains in-flight requests, and has the
/// writer answer everything queued, sync and record the source as synced.
struct ServeService: Service {
    let server: NBDServer
    let writer: ServePipeline
    let logger: Logger

    func run() async throws {
        try? await gracefulShutdown()
        logger.info("shutting down: draining connections")
        await server.shutdown()
        writer.stop()
    }
}

/// Every few seconds: the pins in the metrics, and a log line when they change — and when
/// retention stops at one, which one.
struct PinWatchService: Service {
    let mirror: Mirror
    let options: ServeOptions
    let metrics: ServeMetrics
    let logger: Logger

    func run() async throws {
        var seen: [Pin.Info] = []
        var heldBy: Pin.Info?
        while !Task.isShuttingDownGracefully {
            if let pins = try? mirror.livePins() {
                metrics.pins.record(Int64(pins.count))
                metrics.oldestPin.record(pins.first.map { Int64($0.seq) } ?? -1)
                for p in pins where !seen.contains(p) { logger.info("pin taken: \(p.summary)") }
                for p in seen where !pins.contains(p) { logger.info("pin released: \(p.summary)") }
                seen = pins
            }
            if options.keepAgeNanoseconds != nil || options.keepBytes != nil {
                let held = try? mirror.retentionHeldBy(keepAgeNanoseconds: options.keepAgeNanoseconds, keepBytes: options.keepBytes)
                if let held, held != heldBy { logger.notice("retention stops at seq:\(held.seq), in use by \(held.heldBy)") }
                heldBy = held
            }
            try? await cancelWhenGracefulShutdown { try await Task.sleep(nanoseconds: 5_000_000_000) }
        }
    }
}

/// Folds records that leave the retention window into the base, in the background, off the
/// event loops; compaction works in bounded transactions so the writer is never held up long.
struct RetentionService: Service {
    let mirror: Mirror
    let writer: ServePipeline
    let options: ServeOptions
    let pool: NIOThreadPool
    let metrics: ServeMetrics
    let logger: Logger

    func run() async throws {
        let interval = UInt64(options.retentionIntervalSeconds * 1e9)
        let (mirror, writer, options) = (self.mirror, self.writer, self.options)
        while !Task.isShuttingDownGracefully {
            try? await cancelWhenGracefulShutdown {
                try await Task.sleep(nanoseconds: interval)
            }
            if Task.isShuttingDownGracefully { break }
            do {
                let report = try await pool.runIfActive {
                    try writer.retentionPass(keepAgeNanoseconds: options.keepAgeNanoseconds, keepBytes: options.keepBytes)
                }
                if let r = report, r.toHorizon > r.fromHorizon {
                    metrics.compactions.increment()
                    metrics.compactedBlocks.increment(by: Int64(r.blocksWritten))
                    metrics.horizon.record(Int64(r.toHorizon))
                    logger.info("retention: compacted seq:\(r.fromHorizon)..seq:\(r.toHorizon), \(r.blocksWritten) blocks into the base")
                }
                metrics.journalPayload.record(Int64(try mirror.meta().journalBytes))
            } catch {
                logger.warning("retention pass failed: \(error)")
            }
        }
    }
}
