import Foundation
import Glibc
import RewindCore

/// The power-cut simulation behind `PowerCutTests` and `rewind-torture power-cuts` (the long
/// run, in a release build): serve's pipeline (`ServePipeline`) on `PowerCutStorage`, with
/// compactions beside it and rollbacks between sessions, the power cut at a random instant;
/// then a restart as `serve`'s — `Mirror.open(recover:)`, a pending rollback finished,
/// `bringSourceUpToDate` — held to what was answered:
/// - every request answered before a successful FLUSH, and every successful FUA write, is in
///   the journal: it holds at least that prefix of the requests, in order;
/// - the journal's latest point is exactly the requests it holds applied in order, and the
///   source is byte for byte that point (the source never held what the journal lost);
/// - the mirror opens and `verify` passes.
/// A violation throws `Violation`, naming the seed and the cut that reproduce it.
public struct PowerCutSimulation {
    public static let blockSize = 4096
    public static let blocks = 96

    /// What a run did.
    public struct Totals: Sendable, CustomStringConvertible {
        public var cuts = 0, requests = 0, durable = 0, kept = 0, lost = 0, refused = 0
        public var rollbacks = 0, compactions = 0, torn = 0, lmdbLost = 0
        /// Reboots after which base.sums named the horizon and equalled a rebuild.
        public var sumsChecked = 0

        public var description: String {
            "\(cuts) cuts, \(requests) requests (\(durable) answered durable, \(kept) kept, \(lost) lost unflushed, \(refused) refused after the cut), \(rollbacks) rollbacks, \(compactions) compactions, \(torn) torn pages, \(lmdbLost) LMDB commits lost, base.sums checked after \(sumsChecked)"
        }
    }

    public struct Violation: Error, CustomStringConvertible {
        public let description: String
    }

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

    public let seed: UInt64
    /// Where the mirror and the source live (created, and removed at the end).
    public let root: String

    public init(seed: UInt64, root: String) {
        self.seed = seed
        self.root = root
    }

    /// Run `cuts` power cuts; `progress` hears after each.
    public func run(cuts: Int, progress: ((Totals) -> Void)? = nil) throws -> Totals {
        let seed = self.seed, root = self.root
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
        var totals = Totals()
        for cut in 0..<cuts {
            let sessionSeed = rng.next()
            var r = SplitMix(seed: sessionSeed)
            let context = "seed \(seed), cut \(cut) (session seed \(sessionSeed))"
            // Start as serve does, then run requests until the power fails.
            let startSeq: UInt64
            let requests: [VolumeOp]
            let answers = Answers()
            var rolledBackTo: UInt64?
            weak var previous: Mirror?
            do {
                let mirror = try Mirror.open(at: mirrorPath, recover: true)
                previous = mirror
                let source = try BlockFile(path: sourcePath, mode: .readWrite)
                _ = try mirror.bringSourceUpToDate(source)
                // base.sums, which a compaction updates in place, kept in half the sessions.
                if Int.random(in: 0..<2, using: &r) == 0 { _ = try mirror.baseSums() }
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
                    tuning.writeAheadIntervalNanoseconds = UInt64.random(in: 0...4_000_000, using: &r)
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
            // The power is off. The session's Mirror must be gone before the disk is rewritten
            // and the mirror opened again: its last reference may still be let go of by a
            // pipeline or compaction thread on its way out, and LMDB must never have one
            // environment open twice in a process (it re-initialises the lock file under the
            // older one: docs/design.md, "Concurrency").
            try Self.waitUntilClosed { previous == nil }
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
                try check(meta.lastSeq == k || meta.lastSeq == startSeq, "\(context): after a cut rollback to seq:\(k) from seq:\(startSeq) the journal ends at seq:\(meta.lastSeq)")
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
                try check(held >= durable, "\(context): \(durable) requests were answered as durable (a FLUSH or FUA) but the journal holds \(held) of them (seq:\(startSeq + 1)...seq:\(meta.lastSeq))")
                try check(held <= requests.count, "\(context): the journal holds \(held) records of a session of \(requests.count) requests")
                var v = model
                for op in requests.prefix(held) { v.withUnsafeMutableBytes { op.lay(over: $0, at: 0) } }
                expected = v
            }
            let latest = try Self.readLatest(mirror)
            try check(Self.firstDifference(latest, expected) == nil, "\(context): the journal's latest point differs from the requests it holds at byte \(Self.firstDifference(latest, expected) ?? -1)")
            let onDisk = Self.fileBytes(sourcePath)
            try check(Self.firstDifference(onDisk, expected) == nil, "\(context): the source differs from the journal's latest point at byte \(Self.firstDifference(onDisk, expected) ?? -1)")
            _ = try mirror.verify()
            switch try mirror.baseSumsMatchRebuild() {
            case false?: throw Violation(description: "\(context): base.sums names the horizon seq:\(meta.horizon) but differs from base.img's checksums")
            case true?: totals.sumsChecked += 1
            case nil: break
            }
            model = expected
            if checkpoints.last?.seq != meta.lastSeq { checkpoints.append((meta.lastSeq, model)) }
            if checkpoints.count > 32 { checkpoints.removeFirst() }
            totals.cuts += 1
            progress?(totals)
        }
        return totals
    }

    /// Wait (up to 10 s) until `closed()`: a session's Mirror released by every thread.
    public static func waitUntilClosed(_ closed: () -> Bool) throws {
        for _ in 0..<10_000 where !closed() { usleep(1000) }
        if !closed() { throw Violation(description: "a session's Mirror was still referenced 10 s after its pipeline stopped") }
    }

    private func check(_ condition: Bool, _ message: @autoclosure () -> String) throws {
        if !condition { throw Violation(description: message()) }
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

    static func readLatest(_ mirror: Mirror) throws -> [UInt8] {
        let s = try Snapshot(mirror: mirror, point: .latest)
        defer { s.close() }
        return try s.read(at: 0, count: Int(mirror.volumeSize))
    }

    static func fileBytes(_ path: String) -> [UInt8] {
        [UInt8](FileManager.default.contents(atPath: path) ?? Data())
    }

    static func firstDifference(_ a: [UInt8], _ b: [UInt8]) -> Int? {
        if a.count != b.count { return min(a.count, b.count) }
        let equal = a.isEmpty || a.withUnsafeBytes { x in b.withUnsafeBytes { y in memcmp(x.baseAddress!, y.baseAddress!, x.count) == 0 } }
        if equal { return nil }
        return a.indices.first { a[$0] != b[$0] }
    }

    /// A directory for a run: in memory when there is one (`/dev/shm`: syncs cost nothing, the
    /// layer decides what they keep), else under /tmp.
    public static func makeDirectory() -> String {
        let base = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp"
        var template = Array("\(base)/rewind-powercut-XXXXXX".utf8CString)
        let p = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        return String(cString: p!)
    }
}
