import Foundation
import Glibc
import Testing
@testable import RewindCore

/// Durability across power cuts (PRODUCT.md: a crash at any instant loses no acknowledged-
/// and-flushed write and corrupts no journal). Unlike a SIGKILL, a power cut loses the page
/// cache: the test runs serve's real pipeline (`ServePipeline`: writer, applier, index
/// thread) on `PowerCutStorage`, cuts the power at a random instant — a timer firing
/// mid-workload, while compactions and rollbacks run too — lets the disk keep a random part
/// of what was not synced (per page, torn at 512 bytes), then restarts as `serve` does
/// (`Mirror.open(recover:)`, a pending rollback finished, `bringSourceUpToDate`) and checks:
/// - every request answered before a successful FLUSH, and every successful FUA write, is in
///   the journal: the journal holds at least that prefix of the requests, in order;
/// - the journal's latest point is exactly the requests it holds applied in order, and the
///   source is byte for byte that point (the source never held what the journal lost);
/// - the mirror opens and `verify` passes.
///
/// `REWIND_POWER_CUTS` (default 1,000) cuts; `REWIND_POWER_CUT_SEED` reproduces a run (every
/// run prints its seed).
@Suite(.serialized) struct PowerCutTests {
    static var cuts: Int { Int(ProcessInfo.processInfo.environment["REWIND_POWER_CUTS"] ?? "") ?? 1000 }
    static var seed: UInt64 {
        UInt64(ProcessInfo.processInfo.environment["REWIND_POWER_CUT_SEED"] ?? "") ?? UInt64.random(in: 1...999_999)
    }

    static let blockSize = 4096
    static let blocks = 96

    /// The answered requests of one session and which of them must survive.
    final class Answers: @unchecked Sendable {
        private let lock = NSLock()
        private var mustSurvive = 0
        private var failed = 0
        /// Request `index` was answered: a successful FLUSH or FUA makes it and all before it durable.
        func answered(_ index: Int, syncs: Bool, _ failure: VolumeOp.Failure?) {
            lock.lock()
            defer { lock.unlock() }
            if failure != nil { failed += 1 } else if syncs { mustSurvive = max(mustSurvive, index + 1) }
        }
        var durablePrefix: Int { lock.lock(); defer { lock.unlock() }; return mustSurvive }
        var failures: Int { lock.lock(); defer { lock.unlock() }; return failed }
    }

    @Test func powerCutsLoseNothingFlushed() throws {
        let seed = Self.seed
        let cuts = Self.cuts
        print("power-cut simulation: seed \(seed), \(cuts) cuts (REWIND_POWER_CUT_SEED=\(seed) REWIND_POWER_CUTS=\(cuts) reproduces)")
        let root = Self.makeDirectory()
        defer { removeTree(root) }
        let sourcePath = root + "/source.img", mirrorPath = root + "/source.img.rewind"
        var rng = SplitMix(seed: seed)
        var model = [UInt8](repeating: 0, count: Self.blockSize * Self.blocks)
        for i in 0..<model.count / 2 { model[i] = UInt8(truncatingIfNeeded: rng.next()) }
        try BlockFile(path: sourcePath, mode: .createNew).write(at: 0, model)
        _ = try Mirror.create(at: mirrorPath, from: sourcePath, blockSize: Self.blockSize)
        let storage = PowerCutStorage(root: root)
        Storage.install(storage)
        defer { Storage.remove(storage) }

        // Volumes at past seqs of the current history (session ends): what a rollback must give back.
        var checkpoints: [(seq: UInt64, volume: [UInt8])] = [(0, model)]
        var totals = (requests: 0, durable: 0, kept: 0, lost: 0, refused: 0, rollbacks: 0, compactions: 0, torn: 0, lmdbLost: 0)
        for cut in 0..<cuts {
            let sessionSeed = rng.next()
            var r = SplitMix(seed: sessionSeed)
            let context = "seed \(seed), cut \(cut) (session seed \(sessionSeed))"
            // Start as serve does, then run requests until the power fails.
            let startSeq: UInt64
            let requests: [VolumeOp]
            let answers = Answers()
            var rolledBackTo: UInt64?
            do {
                let mirror = try Mirror.open(at: mirrorPath, recover: true)
                let source = try BlockFile(path: sourcePath, mode: .readWrite)
                _ = try mirror.bringSourceUpToDate(source)
                startSeq = try mirror.meta().lastSeq
                let oldest = try mirror.meta().oldestPoint
                let targets = checkpoints.filter { $0.seq >= oldest && $0.seq < startSeq }
                if Int.random(in: 0..<12, using: &r) == 0, let target = targets.randomElement(using: &r) {
                    // A rollback, sometimes cut by the power itself.
                    let k = target.seq
                    rolledBackTo = k
                    requests = []
                    let timer = Self.cutLater(storage, microseconds: Int.random(in: 0..<4000, using: &r))
                    _ = try? mirror.rollback(to: .seq(k), source: sourcePath)
                    timer.wait()
                    totals.rollbacks += 1
                } else {
                    var tuning = ServePipeline.Tuning()
                    tuning.commitIntervalNanoseconds = UInt64.random(in: 100_000...2_000_000, using: &r)
                    tuning.sourceSyncIntervalNanoseconds = UInt64.random(in: 0...3_000_000, using: &r)
                    tuning.indexPolicy = IndexCommitter.Policy(intervalNanoseconds: UInt64.random(in: 500_000...5_000_000, using: &r),
                                                               maxChanges: 64, maxBlocks: 256)
                    tuning.indexCommitIdleNanoseconds = 1_000_000
                    tuning.ackedBytesMax = Int.random(in: 1...4, using: &r) * 16 * Self.blockSize
                    let pipeline = ServePipeline(mirror: mirror, source: source, sourceSyncedSeq: startSeq, tuning: tuning, observer: nil)
                    pipeline.start()
                    let compacting = Int.random(in: 0..<4, using: &r) == 0
                    let compaction = DispatchGroup()
                    if compacting {
                        totals.compactions += 1
                        DispatchQueue.global().async(group: compaction) { _ = try? mirror.compact(keepAgeNanoseconds: nil, keepBytes: 0) }
                    }
                    // The cut lands anywhere in the session: before its first request, among them, or
                    // after the last, while the pipeline is still at work on them.
                    let count = Int.random(in: 1...80, using: &r)
                    let cutAfter = Int.random(in: 0...count, using: &r)
                    let delay = Int.random(in: 0..<3_000, using: &r)
                    var timer = cutAfter == 0 ? Self.cutLater(storage, microseconds: delay) : nil
                    var ops: [VolumeOp] = []
                    for i in 0..<count {
                        var op = Self.randomOp(&r)
                        let syncs = op.needsSync
                        op = VolumeOp(op.kind, offset: op.offset, fua: op.fua) { answers.answered(i, syncs: syncs, $0) }
                        ops.append(op)
                        pipeline.submit(op)
                        if i + 1 == cutAfter { timer = Self.cutLater(storage, microseconds: delay) }
                        if Int.random(in: 0..<3, using: &r) == 0 { Self.pause(microseconds: UInt64.random(in: 0..<300, using: &r)) }
                    }
                    requests = ops
                    timer?.wait()
                    pipeline.stop()
                    compaction.wait()
                }
            }
            // The power is off; every file of the mirror and the source is closed.
            let report = storage.reboot(using: &r)
            totals.torn += report.pagesTorn
            totals.lmdbLost += report.lmdbCommitsLost
            totals.requests += requests.count

            // Restart as serve does, and hold the result to what was answered.
            let mirror = try Mirror.open(at: mirrorPath, recover: true)
            if let pending = try mirror.status().rollbackPending {
                _ = try mirror.rollback(to: .seq(pending), source: sourcePath)
            }
            let source = try BlockFile(path: sourcePath, mode: .readWrite)
            _ = try mirror.bringSourceUpToDate(source)
            let meta = try mirror.meta()
            let expected: [UInt8]
            if let k = rolledBackTo {
                // Either the rollback is done (the journal ends at k) or it never began.
                #expect(meta.lastSeq == k || meta.lastSeq == startSeq, "\(context): after a cut rollback to seq:\(k) from seq:\(startSeq) the journal ends at seq:\(meta.lastSeq)")
                let rolledBack = meta.lastSeq == k
                expected = rolledBack ? checkpoints.last { $0.seq == k }?.volume ?? [] : model
                if rolledBack { checkpoints.removeAll { $0.seq > k } }
            } else {
                let held = Int(meta.lastSeq) - Int(startSeq)
                let durable = answers.durablePrefix
                totals.durable += durable
                totals.kept += max(0, held)
                totals.lost += max(0, requests.count - held - answers.failures)
                totals.refused += answers.failures
                try #require(held >= durable, "\(context): \(durable) requests were answered as durable (a FLUSH or FUA) but the journal holds \(held) of them (seq:\(startSeq + 1)...seq:\(meta.lastSeq))")
                try #require(held <= requests.count, "\(context): the journal holds \(held) records of a session of \(requests.count) requests")
                var v = model
                for op in requests.prefix(held) { v.withUnsafeMutableBytes { op.lay(over: $0, at: 0) } }
                expected = v
            }
            let latest = try readAll(mirror, at: .latest)
            try #require(firstDifference(latest, expected) == nil, "\(context): the journal's latest point differs from the requests it holds at byte \(firstDifference(latest, expected) ?? -1)")
            let onDisk = fileBytes(sourcePath)
            try #require(firstDifference(onDisk, expected) == nil, "\(context): the source differs from the journal's latest point at byte \(firstDifference(onDisk, expected) ?? -1)")
            _ = try mirror.verify()
            model = expected
            if checkpoints.last?.seq != meta.lastSeq { checkpoints.append((meta.lastSeq, model)) }
            if checkpoints.count > 32 { checkpoints.removeFirst() }
        }
        print("power-cut simulation: seed \(seed): \(cuts) cuts, \(totals.requests) requests (\(totals.durable) answered durable, \(totals.kept) kept, \(totals.lost) lost unflushed, \(totals.refused) refused after the cut), \(totals.rollbacks) rollbacks, \(totals.compactions) compactions, \(totals.torn) torn pages, \(totals.lmdbLost) LMDB commits lost")
    }

    /// A request of any kind, size and alignment within the volume: writes (a fifth of them
    /// FUA), zeroes (with or without holes), trims, FLUSHes.
    static func randomOp(_ r: inout SplitMix) -> VolumeOp {
        let size = UInt64(blockSize * blocks)
        func range(maxBlocks: Int) -> (UInt64, UInt64) {
            if Bool.random(using: &r) {
                let b = UInt64.random(in: 0..<UInt64(blocks), using: &r)
                let n = UInt64.random(in: 1...UInt64(min(maxBlocks, blocks - Int(b))), using: &r)
                return (b * UInt64(blockSize), n * UInt64(blockSize))
            }
            let offset = UInt64.random(in: 0..<size, using: &r)
            return (offset, UInt64.random(in: 1...min(size - offset, UInt64(maxBlocks * blockSize)), using: &r))
        }
        switch Int.random(in: 0..<20, using: &r) {
        case 0..<10, 10..<12:
            let (offset, length) = range(maxBlocks: 5)
            let fill = UInt8.random(in: 1...255, using: &r)
            let data = (0..<Int(length)).map { UInt8(truncatingIfNeeded: $0 &* 31) ^ fill }
            return VolumeOp(.write(data), offset: offset, fua: Int.random(in: 0..<5, using: &r) == 0, completion: nil)
        case 12..<14:
            let (offset, length) = range(maxBlocks: 8)
            return VolumeOp(.zero(length: length, noHole: Bool.random(using: &r)), offset: offset, completion: nil)
        case 14..<16:
            let (offset, length) = range(maxBlocks: 8)
            return VolumeOp(.trim(length: length), offset: offset, completion: nil)
        default:
            return VolumeOp(.flush, offset: 0, completion: nil)
        }
    }

    /// Let the pipeline's threads run for a moment between requests (a spin: a sleep this
    /// short takes milliseconds here).
    static func pause(microseconds: UInt64) {
        let end = monotonicNanoseconds() + microseconds * 1000
        while monotonicNanoseconds() < end { sched_yield() }
    }

    /// Cut the power after `microseconds`, on another thread; `wait()` on the result returns
    /// once it is cut.
    static func cutLater(_ storage: PowerCutStorage, microseconds: Int) -> DispatchGroup {
        let group = DispatchGroup()
        group.enter()
        DispatchQueue.global().asyncAfter(deadline: .now() + .microseconds(microseconds)) {
            storage.cut()
            group.leave()
        }
        return group
    }

    /// A directory in memory when there is one (`/dev/shm`: syncs cost nothing, the layer
    /// decides what they keep), else under /tmp.
    static func makeDirectory() -> String {
        let base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp"
        var template = Array("\(base)/rewind-powercut-XXXXXX".utf8CString)
        let p = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        return String(cString: p!)
    }
}
