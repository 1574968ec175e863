import Foundation
import Glibc
import Synchronization
import Testing
@testable import RewindCore

/// A failed write or sync is never forgotten (PostgreSQL's "fsync surprise": Linux reports a
/// writeback error once, then the pages are clean). Under a stream of writes and FLUSHes
/// through serve's pipeline, with compactions beside it, one call fails — the log's, the
/// source's or base.img's `fdatasync`, an LMDB commit of the index, a `pwrite` to the log —
/// with EIO or ENOSPC. Then:
/// - from the first FLUSH answered with an error on, no FLUSH is answered with success, and
///   every request after the fence is refused;
/// - `status` names the failed file and the errno (`MirrorStatus.fenced`), also after the stop;
/// - a restart brings the source to the journal, which holds every request answered before a
///   successful FLUSH, and verifies.
@Suite struct SyncFailureTests {
    enum Target: String, CaseIterable, Sendable {
        case logSync, sourceSync, baseSync, indexCommit, logWrite

        /// The call failed, and where.
        func plan(sourcePath: String) -> (operation: String, path: String) {
            switch self {
            case .logSync: return ("fdatasync", "/log/")
            case .sourceSync: return ("fdatasync", sourcePath)
            case .baseSync: return ("fsync", "/base.img")  // compaction's sync of the folded base
            case .indexCommit: return ("mdb_txn_commit", "/journal/data.mdb")
            case .logWrite: return ("pwrite", "/log/")
            }
        }
    }

    /// Answers to the FLUSHes, in submission order.
    final class Flushes: @unchecked Sendable {
        private let lock = NSLock()
        private(set) var answers: [Int: VolumeOp.Failure?] = [:]
        /// Requests before the newest successful FLUSH (all must survive).
        private(set) var durable = 0
        func answered(_ flush: Int, coveringRequests n: Int, _ failure: VolumeOp.Failure?) {
            lock.withLock {
                answers[flush] = .some(failure)
                if failure == nil { durable = max(durable, n) }
            }
        }
        var snapshot: (answers: [Int: VolumeOp.Failure?], durable: Int) { lock.withLock { (answers, durable) } }
    }

    @Test(arguments: Target.allCases, [EIO, ENOSPC])
    func aFailedCallFencesTheVolumeForGood(_ target: Target, _ code: Int32) throws {
        let dir = TempDir("syncfail-\(target.rawValue)")
        defer { dir.remove() }
        let bs = 4096, blocks = 64
        let sourcePath = dir.file("source.img"), mirrorPath = dir.file("m")
        var model = halfFilledVolume(blockSize: bs, mul: 5, add: 9)
        try BlockFile(path: sourcePath, mode: .createNew).write(at: 0, model)
        _ = try Mirror.create(at: mirrorPath, from: sourcePath, blockSize: bs)
        let storage = PowerCutStorage(root: dir.path)
        Storage.install(storage)
        defer { Storage.remove(storage) }
        let (operation, path) = target.plan(sourcePath: sourcePath)
        let context = "\(target) \(errnoName(code))"

        var requests: [VolumeOp] = []
        let flushes = Flushes()
        let startSeq: UInt64
        weak var previous: Mirror?
        do {
            let mirror = try Mirror.open(at: mirrorPath, recover: true)
            previous = mirror
            let source = try BlockFile(path: sourcePath, mode: .readWrite)
            startSeq = try mirror.meta().lastSeq
            var tuning = ServePipeline.Tuning()
            tuning.commitIntervalNanoseconds = 500_000
            tuning.sourceSyncIntervalNanoseconds = 2_000_000
            tuning.indexPolicy = IndexCommitter.Policy(intervalNanoseconds: 2_000_000, maxChanges: 64, maxBlocks: 256)
            tuning.indexCommitIdleNanoseconds = 1_000_000
            // `.fail`: a full log fences like any failure here (`JournalFullTests` covers `.compact`).
            let pipeline = ServePipeline(mirror: mirror, source: source, sourceSyncedSeq: startSeq, tuning: tuning,
                                         onFull: .fail, observer: nil)
            pipeline.start()
            let compacting = DispatchGroup()
            let stopCompacting = Mutex(false)
            DispatchQueue.global().async(group: compacting) {
                while !stopCompacting.withLock({ $0 }) {
                    _ = try? pipeline.retentionPass(keepAgeNanoseconds: nil, keepBytes: 0)
                    usleep(2_000)
                }
            }
            var rng = SplitMix(seed: UInt64(code) &* 1_000 &+ UInt64(target.rawValue.count))
            var flushCount = 0
            var armedAt: Int?
            let deadline = Date(timeIntervalSinceNow: 20)
            // Writes and FLUSHes until, some time after the failure is armed, a FLUSH failed.
            while Date() < deadline {
                let i = requests.count
                if i == 200 {
                    storage.fail(operation, pathContaining: path, errno: code)
                    armedAt = i
                }
                if i % 8 == 7 {
                    let n = i, f = flushCount
                    let op = VolumeOp(.flush, offset: 0) { flushes.answered(f, coveringRequests: n, $0) }
                    flushCount += 1
                    requests.append(op)
                    pipeline.submit(op)
                    if let armedAt, i > armedAt + 400, flushes.snapshot.answers.values.contains(where: { $0 != nil }) { break }
                } else {
                    let b = UInt64.random(in: 0..<UInt64(blocks - 2), using: &rng)
                    let data = (0..<bs + 100).map { _ in UInt8.random(in: 0...255, using: &rng) }
                    let op = VolumeOp(.write(data), offset: b * UInt64(bs) + 50, completion: nil)
                    requests.append(op)
                    pipeline.submit(op)
                }
                if i % 16 == 0 { usleep(200) }
            }
            stopCompacting.withLock { $0 = true }
            compacting.wait()
            pipeline.stop()

            let reason = try #require(pipeline.fenceReason, "\(context): the volume was never fenced (failures injected: \(storage.injectedFailures))")
            #expect(storage.injectedFailures[operation] == 1, "\(context): injected \(storage.injectedFailures)")
            #expect(reason.contains(errnoName(code)), "\(context): the fence does not name the errno: \(reason)")
            let (answers, _) = flushes.snapshot
            #expect(answers.count == flushCount, "\(context): \(flushCount - answers.count) FLUSHes never answered")
            let firstFailed = try #require(answers.filter { $0.value != nil }.keys.min(), "\(context): no FLUSH failed")
            let laterSuccesses = answers.filter { $0.key > firstFailed && $0.value == nil }.keys.sorted()
            #expect(laterSuccesses.isEmpty, "\(context): FLUSHes \(laterSuccesses) succeeded after FLUSH \(firstFailed) failed")
            let status = try mirror.status()
            let fenced = try #require(status.fenced, "\(context): status does not say the volume was fenced")
            #expect(fenced.contains(errnoName(code)), "\(context): status: \(fenced)")
            #expect(fenced.contains(path), "\(context): status does not name the file: \(fenced)")
        }

        // A restart, as serve's: the source brought up to the journal; nothing FLUSHed lost.
        // Once the session's Mirror is gone (never one LMDB environment twice in a process).
        try PowerCutSimulation.waitUntilClosed { previous == nil }
        let mirror = try Mirror.open(at: mirrorPath, recover: true)
        #expect(try mirror.status().fenced != nil, "\(context): the fence record is gone before a start recovered")
        let source = try BlockFile(path: sourcePath, mode: .readWrite)
        _ = try mirror.bringSourceUpToDate(source)
        let held = Int(try mirror.meta().lastSeq - startSeq)
        #expect(held >= flushes.snapshot.durable, "\(context): \(flushes.snapshot.durable) requests were FLUSHed, the journal holds \(held)")
        for op in requests.prefix(held) { model.withUnsafeMutableBytes { op.lay(over: $0, at: 0) } }
        let latest = try readAll(mirror, at: .latest)
        #expect(firstDifference(latest, model) == nil, "\(context): the latest point differs from the requests it holds at \(firstDifference(latest, model) ?? -1)")
        #expect(firstDifference(fileBytes(sourcePath), latest) == nil, "\(context): the source differs from the latest point")
        _ = try mirror.verify()
    }
}
