import Foundation
import Logging
import NIOCore
import NIOPosix
import RewindCore
import RewindNBD

/// `rewind tap`: connect to the upstream server, open (or create, copying the upstream) the
/// mirror, bring it into step with the upstream if a stop may have left it behind, then serve
/// NBD until SIGTERM/SIGINT, forwarding every command upstream (`TapVolume`).
public enum TapDaemon {
    /// What the start compares of the mirror with the upstream (`--check`).
    public enum Check: String, Sendable, CaseIterable {
        /// Everything, unless the last tap of this mirror stopped cleanly with the journal as it
        /// is now (then the upstream held what the journal holds at that stop).
        case auto
        /// Everything, always.
        case full
        /// Nothing: the mirror is trusted to be in step (writes that bypassed tap stay unseen).
        case none
    }

    /// The mirror of an upstream when `--mirror` is not given: `NAME.rewind` in the working
    /// directory, NAME being the export's name ("upstream" for the default export).
    public static func defaultMirror(for uri: NBDURI) -> String {
        let name = uri.exportName.isEmpty ? "upstream" : uri.exportName.replacingOccurrences(of: "/", with: "_")
        return name + ".rewind"
    }

    /// Tap until SIGTERM/SIGINT; false when the volume was fenced (exit non-zero).
    public static func run(_ options: ServeOptions, progress: ProgressObserver?) async throws -> Bool {
        DaemonSupport.bootstrapLogging(level: options.logLevel)
        let logger = Logger(label: "rewind.tap")
        let registry = DaemonSupport.bootstrapMetrics(options.metrics != nil)
        let metrics = ServeMetrics()
        metrics.logger = logger
        let uri: NBDURI
        do { uri = try NBDURI(options.source) } catch let e as NBDURIError { throw RewindError.invalidArgument(e.description) }
        let addresses = try DaemonSupport.listenAddresses(options.listen)
        let identity = options.replicateTo.isEmpty ? nil : try Replication.context(home: options.home).0

        // An existing mirror's owner first: a second tap stops here, before it takes the
        // upstream's connection (qemu-nbd takes one at a time by default).
        let mirrorPath = options.mirror ?? defaultMirror(for: uri)
        let existingLock = access(mirrorPath, F_OK) == 0 ? try ownerLock(mirrorPath) : nil
        // One event loop for the hosts' connections and the upstream's: a request goes upstream,
        // and its reply back to its host, without a hop between threads (with the batched
        // flushes and the whole-block fast path beside it, random 4 KiB writes at QD 16 behind
        // nbdkit went from 13.6k to 22.2k IOPS; docs/benchmarks.md).
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        let link: UpstreamLink
        do {
            link = try UpstreamLink.connect(uri, group: group, logger: logger)
        } catch {
            existingLock?.release()
            try? await group.shutdownGracefully()
            throw RewindError.invalidArgument("upstream \(uri): \(error)")
        }
        logger.info("upstream \(uri): \(link.info.size) bytes, flags 0x\(String(link.info.flags.rawValue, radix: 16))\(link.info.structuredReplies ? ", structured replies" : "")\(link.info.baseAllocationID != nil ? ", base:allocation" : "")")
        let prepared: Prepared
        do {
            prepared = try prepare(mirrorPath, options, uri: uri, link: link, lock: existingLock, logger: logger, progress: progress)
        } catch {
            _ = try? await link.stop().get()
            try? await group.shutdownGracefully()
            throw error
        }
        let mirror = prepared.mirror
        var tuning = ServePipeline.Tuning.serve
        tuning.keepsLogOutOfCache = options.replicateTo.isEmpty
        let lastSeq = try mirror.meta().lastSeq
        let writer = ServePipeline(mirror: mirror, source: JournalOnlySource(), sourceSyncedSeq: lastSeq,
                                   tuning: tuning, onFull: options.onFull, observer: metrics)
        let links = try ReplicationSetup(options, identity: identity, mirror: mirror, writer: writer, logger: logger)
        writer.start()
        let pool = NIOThreadPool(numberOfThreads: 2)
        pool.start()
        let volume = TapVolume(link: link, writer: writer, blockSize: mirror.blockSize, logger: logger)
        let exportName = options.export ?? (uri.exportName.isEmpty ? "tap" : uri.exportName)
        let export = NBDExport(name: exportName, description: options.description ?? "rewind tap of \(uri)", target: volume)
        let catalog = PointCatalog(primary: export, mirror: mirror, pool: pool, logger: logger) { [writer] in
            _ = try? writer.durablePoint(timeoutSeconds: 5)
        }
        let server = NBDServer(catalog: catalog, group: group, maxConnections: options.maxConnections, observer: metrics, logger: logger)
        let control = ServeDaemon.startControlServer(mirror, writer: writer, logger: logger)
        func stopAll() async {
            control?.stop()
            writer.stop()
            _ = try? await link.stop().get()
            try? await pool.shutdownGracefully()
            try? await group.shutdownGracefully()
            try? await links.group?.shutdownGracefully()
        }
        let bound: [String]
        do {
            bound = try await server.start(addresses)
        } catch {
            await stopAll()
            recordCleanStop(prepared, uri: uri, writer: writer, volume: volume, logger: logger)
            if let e = error as? ListenError { throw RewindError.invalidArgument(e.description) }
            throw RewindError.invalidArgument("cannot listen on \(addresses.map(\.description).joined(separator: ", ")): \(error)")
        }
        var metricsChannel: Channel?
        if let address = options.metrics, let registry {
            metricsChannel = try await startMetricsServer(address, registry: registry, group: group)
        }
        ServeDaemon.announce(options: options, mirror: mirror, export: exportName, bound: bound,
                             metrics: metricsChannel.flatMap { c in c.localAddress.map { "\($0.ipAddress ?? "127.0.0.1"):\($0.port ?? 0)" } },
                             verb: "tapping")
        let notifier = SystemdNotifier.takeFromEnvironment()
        let servingStatus = "tapping \(uri) on \(bound.joined(separator: ", "))"
        notifier?.notify([.ready, .status(servingStatus), .mainPID(getpid())])

        try await ServeDaemon.runServices(server: server, writer: writer, mirror: mirror, options: options, metrics: metrics,
                                          pool: pool, group: group, links: links, notifier: notifier, servingStatus: servingStatus, logger: logger)
        try? await metricsChannel?.close()
        await stopAll()
        recordCleanStop(prepared, uri: uri, writer: writer, volume: volume, logger: logger)
        prepared.lock.release()
        let last = (try? mirror.meta().lastSeq) ?? 0
        if let why = writer.fenceReason {
            logger.error("stopped; writes were refused since: \(why); the journal holds seq:\(last), and the next start compares the mirror with the upstream")
            return false
        }
        logger.info("stopped cleanly; journal at seq:\(last)")
        return true
    }

    struct Prepared {
        var mirror: Mirror
        var lock: FileLock
    }

    /// The file, in the mirror, that says a tap stopped cleanly: the upstream's URI and the
    /// journal's last seq then. Deleted at start, so only a clean stop leaves it.
    static func stopStatePath(_ mirror: String) -> String { mirror + "/tap.clean" }

    static func ownerLock(_ path: String) throws -> FileLock {
        try FileLock(path: path + "/owner.lock", kind: .exclusive, waitSeconds: 3,
                     holder: "another rewind process (serve, tap, receive or rollback) owns this mirror")
    }

    /// The mirror at `path`, created from the upstream if missing, owned (`lock`, when the
    /// mirror existed, is its owner lock already), checked, and compared with the upstream as
    /// `--check` says.
    static func prepare(_ path: String, _ o: ServeOptions, uri: NBDURI, link: UpstreamLink, lock existingLock: FileLock?,
                        logger: Logger, progress: ProgressObserver?) throws -> Prepared {
        let check = o.check
        let size = link.info.size
        var created = false
        if access(path, F_OK) != 0 {
            guard size > 0, size % UInt64(o.blockSize) == 0 else {
                throw RewindError.invalidArgument("upstream \(uri) is \(size) bytes, not a positive multiple of the block size \(o.blockSize) (give --block-size 512, or a size that is)")
            }
            logger.info("creating mirror \(path) from upstream \(uri)")
            guard let client = link.client else { throw RewindError.invalidArgument("upstream \(uri) dropped before the mirror was copied") }
            let source = NBDVolumeSource(client: client)
            try Mirror.create(at: path, copying: source, blockSize: o.blockSize, progress: progress)
            created = true
        }
        let lock = try existingLock ?? ownerLock(path)
        do {
            let mirror = try Mirror.open(at: path, recover: true, ownerLockHeld: true)
            try mirror.refuseIfReplica()
            if let file = try mirror.sourceIdentity() {
                throw RewindError.invalidArgument("mirror \(path) journals the file \(file.path) (rewind serve): a tap needs a mirror of its own")
            }
            guard mirror.volumeSize == size else {
                throw RewindError.invalidArgument("upstream \(uri) is \(size) bytes but mirror \(path) holds a volume of \(mirror.volumeSize): not its mirror")
            }
            if let blockSizes = link.info.blockSizes, blockSizes.minimum > UInt32(mirror.blockSize) {
                throw RewindError.invalidArgument("upstream \(uri) takes requests of at least \(blockSizes.minimum) bytes, more than the mirror's block size \(mirror.blockSize)")
            }
            let meta = try mirror.meta()
            if meta.pendingRollback != UInt64.max { throw mirror.unfinishedRollbackError(target: meta.pendingRollback) }
            let statePath = stopStatePath(path)
            let stopState = try? String(contentsOfFile: statePath, encoding: .utf8)
            unlink(statePath)
            syncDirectory(containing: statePath)
            let cleanAt = stopState.flatMap { text -> UInt64? in
                let lines = text.split(separator: "\n")
                guard lines.count == 2, lines[0] == Substring(uri.description) else { return nil }
                return UInt64(lines[1])
            }
            let compare: Bool
            switch check {
            case .full: compare = !created
            case .none: compare = false
            case .auto: compare = !created && cleanAt != meta.lastSeq
            }
            if compare {
                logger.notice(cleanAt == nil ? "no clean stop of a tap of \(uri) recorded in \(path): comparing the mirror with the upstream"
                                             : "comparing the mirror with the upstream (--check full)")
                let started = monotonicNanoseconds()
                guard let client = link.client else { throw RewindError.invalidArgument("upstream \(uri) dropped before the mirror was compared with it") }
                let report = try mirror.reconcile(with: NBDVolumeSource(client: client), progress: progress)
                let seconds = String(format: "%.1f", Double(monotonicNanoseconds() - started) / 1e9)
                if let records = report.records {
                    logger.warning("the upstream differed from the mirror's seq:\(report.comparedAt) in \(report.differingBlocks) blocks (writes that bypassed the tap, or were unjournalled at a crash): journalled as seq:\(records.lowerBound)...seq:\(records.upperBound) (\(seconds) s)")
                } else {
                    logger.info("the upstream equals the mirror's seq:\(report.comparedAt) (\(report.comparedBytes) bytes compared in \(seconds) s)")
                }
            } else if !created {
                logger.info(check == .none ? "not comparing the mirror with the upstream (--check none)"
                                           : "the last tap of \(uri) stopped cleanly at seq:\(meta.lastSeq): not comparing (--check full does)")
            }
            return Prepared(mirror: mirror, lock: lock)
        } catch {
            lock.release()
            throw error
        }
    }

    /// After a clean stop — the journal synced, no request in doubt — say so for the next start.
    static func recordCleanStop(_ prepared: Prepared, uri: NBDURI, writer: ServePipeline, volume: TapVolume, logger: Logger) {
        guard writer.fenceReason == nil, volume.blocksInDoubt == 0, let meta = try? prepared.mirror.meta() else {
            logger.warning("not a clean stop: the next start compares the mirror with the upstream")
            return
        }
        let path = stopStatePath(prepared.mirror.path)
        do {
            let f = try BlockFile(path: path, mode: .createOrTruncate)
            try f.write(at: 0, Array("\(uri)\n\(meta.lastSeq)".utf8))
            try f.sync()
            syncDirectory(containing: path)
        } catch {
            logger.warning("could not record the clean stop (\(error)): the next start compares the mirror with the upstream")
        }
    }
}
