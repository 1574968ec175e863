import Foundation
import Glibc
import Testing
import RewindWorkload
@testable import RewindCore

/// The serve pipeline on its own (`ServePipeline`, `VolumeOp`): no NBD, requests go in as
/// `VolumeOp`s from one or several threads and are answered through their completions.
/// Checked against an in-memory model of the volume:
/// - a read sees every answered write wherever it is on its way (queue, group commit,
///   applier, source);
/// - a successful FLUSH means the journal is synced past every request submitted before it;
/// - a failed log or source sync, or a full disk, fences the volume for good;
/// - a write past `ackedBytesMax` is answered only once the journal holds it;
/// - `stop()` journals, applies and answers everything still queued, then refuses requests.
@Suite struct ServePipelineTests {

    // MARK: 1. read-your-writes

    /// Invariant: `ServePipeline.read` returns the volume as every submitted request leaves it,
    /// at every moment — right after `submit` returns, whether the request is still queued,
    /// being journalled, waiting for the applier or already in the source (`overlay`). At the
    /// end the source, the mirror's latest point and the model agree, the journal holds one
    /// record per request in order (FLUSH included), and a clean stop records the source as
    /// synced through the journal's end.
    @Test(arguments: [(UInt64(0x5EED_0001), 512), (UInt64(0x5EED_0002), 4096)])
    func readsSeeEveryWriteAcrossEveryHandOff(seed: UInt64, blockSize bs: Int) throws {
        let dir = TempDir("pipeline-ryw")
        defer { dir.remove() }
        let initial = halfFilledVolume(blockSize: bs, mul: 11, add: 3)
        let volume = try Self.makeVolume(dir, initial, blockSize: bs)
        let size = volume.size
        var tuning = ServePipeline.Tuning()
        // Small everything, so batches keep moving queue → journal → applier → source while
        // the test reads: short group commits, few ops a batch, backpressure on answered bytes
        // and on the applier's backlog, frequent source syncs and index commits.
        tuning.commitIntervalNanoseconds = 200_000
        tuning.ackedBytesMax = 32 << 10
        tuning.maxBatchOps = 16
        tuning.maxBatchBytes = 64 << 10
        tuning.applyBacklogBytesMax = 64 << 10
        tuning.sourceSyncIntervalNanoseconds = 2_000_000
        tuning.indexPolicy = .init(intervalNanoseconds: 10_000_000, maxChanges: 200, maxBlocks: 256)
        tuning.indexCommitIdleNanoseconds = 5_000_000
        let observer = Recorder()
        let base = try volume.mirror.meta().lastSeq
        let pipeline = try Self.startPipeline(volume, tuning, observer)
        let answers = Answers()
        var model = initial
        var rng = SplitMix(seed: seed)
        let opCount = 600
        var mismatches = 0
        for i in 0..<opCount {
            let op = Self.randomOp(&rng, in: 0..<size, blockSize: bs, flushPercent: 6, fuaPercent: 10)
            pipeline.submit(VolumeOp(op.kind, offset: op.offset, fua: op.fua, completion: answers.completion(i)))
            Self.apply(op.kind, at: op.offset, to: &model)
            // A random range overlapping the request (any range for a FLUSH), read at once.
            let r = Self.span(of: op.kind, at: op.offset)
            var lo = r.isEmpty ? UInt64.random(in: 0..<size, using: &rng) : r.lowerBound
            var hi = r.isEmpty ? lo + 1 : r.upperBound
            lo -= min(lo, UInt64.random(in: 0...UInt64(bs), using: &rng))
            hi = min(size, hi + UInt64.random(in: 0...UInt64(bs), using: &rng))
            hi = min(hi, lo + (64 << 10))
            let got = try Self.read(pipeline, lo..<hi)
            let want = Array(model[Int(lo)..<Int(hi)])
            if got != want {
                mismatches += 1
                if mismatches <= 5 {
                    Issue.record("request \(i) (\(Self.describe(op))): read of \(lo)..<\(hi) differs from the model at byte \(lo + UInt64(firstDifference(got, want) ?? 0))")
                }
            }
            if i % 50 == 49 {
                let all = try Self.read(pipeline, 0..<size)
                if let d = firstDifference(all, model) {
                    mismatches += 1
                    Issue.record("after request \(i): a read of the whole volume differs from the model at byte \(d)")
                }
            }
            // Now and then give the threads a moment, so reads land on every stage.
            if Int.random(in: 0..<10, using: &rng) == 0 { usleep(UInt32.random(in: 0...300, using: &rng)) }
        }
        #expect(mismatches == 0)

        let flush = opCount
        pipeline.submit(VolumeOp(.flush, offset: 0, completion: answers.completion(flush)))
        #expect(answers.wait(flush) == .success, "the final FLUSH")
        #expect(answers.waitAll(0...flush), "some request was never answered")
        let failed = answers.all.filter { $0.value.answer != .success }
        #expect(failed.isEmpty, "requests answered with a failure: \(failed.keys.sorted().prefix(10))")
        #expect(answers.repeated.isEmpty, "requests answered twice: \(answers.repeated)")
        #expect(pipeline.syncs[.flush, default: 0] >= 1)
        try #require(Self.stop(pipeline), "stop() did not return")
        #expect(pipeline.fenceReason == nil)

        let records = UInt64(opCount + 1)  // every request, the final FLUSH included
        let meta = try volume.mirror.meta()
        #expect(meta.lastSeq == base + records)
        #expect(meta.sourceSyncedSeq == meta.lastSeq, "a clean stop syncs the source through the journal's end")
        #expect(observer.appendedRecords == Int(records))
        #expect(observer.appendedSeq == meta.lastSeq)
        #expect(observer.fenceReasons.isEmpty)
        let source = fileBytes(volume.sourcePath)
        #expect(firstDifference(source, model) == nil, "source differs from the model at \(firstDifference(source, model) ?? -1)")
        let latest = try readAll(volume.mirror, at: .latest)
        #expect(firstDifference(latest, model) == nil, "latest point differs from the model at \(firstDifference(latest, model) ?? -1)")
        let report = try volume.mirror.verify()
        #expect(report.records == records)
    }

    // MARK: 2. FLUSH ordering across connections

    /// Invariant: a FLUSH answered with success means the journal is synced past every request
    /// whose `submit` returned before the FLUSH was submitted — on any connection, not only its
    /// own (group commit takes requests in one FIFO; the FLUSH's sync covers all before it).
    /// Four threads play four connections writing disjoint blocks; at each FLUSH's answer the
    /// seq the writer last synced the log through (the observer's `journalAppended` before
    /// `synced(.flush)`) must reach the FLUSH's own seq or later.
    @Test func aFlushCoversEveryRequestSubmittedBeforeIt() throws {
        let dir = TempDir("pipeline-flush")
        defer { dir.remove() }
        let bs = 4096, threads = 4, blocksPerThread = 16, rounds = 12
        let initial = halfFilledVolume(blockSize: bs, mul: 5, add: 9)  // 64 blocks: 16 a thread
        let volume = try Self.makeVolume(dir, initial, blockSize: bs)
        var tuning = ServePipeline.Tuning()
        tuning.commitIntervalNanoseconds = 500_000
        tuning.indexPolicy = .init(intervalNanoseconds: 5_000_000, maxChanges: 256, maxBlocks: 256)
        tuning.indexCommitIdleNanoseconds = 2_000_000
        let observer = Recorder()
        let base = try volume.mirror.meta().lastSeq
        let pipeline = try Self.startPipeline(volume, tuning, observer)
        let answers = Answers()
        let submitted = Locked(0)                  // requests whose submit() returned, all threads
        let syncing = Locked(0)                    // FLUSHes and FUA writes: each may cost a log sync
        let problems = Locked([String]())
        let regions = Locked([Int: [UInt8]]())     // each thread's blocks as it left them
        let finished = DispatchSemaphore(value: 0)
        for t in 0..<threads {
            Thread {
                defer { finished.signal() }
                var rng = SplitMix(seed: 0xF1A5_0000 &+ UInt64(t))
                let lo = t * blocksPerThread * bs, hi = lo + blocksPerThread * bs
                var mine = Array(initial[lo..<hi])
                var next = t * 1_000_000
                for round in 0..<rounds {
                    for _ in 0..<Int.random(in: 1...6, using: &rng) {
                        let op = Self.randomOp(&rng, in: UInt64(lo)..<UInt64(hi), blockSize: bs, flushPercent: 0, fuaPercent: 10)
                        pipeline.submit(VolumeOp(op.kind, offset: op.offset, fua: op.fua, completion: answers.completion(next)))
                        next += 1
                        submitted.withLock { $0 += 1 }
                        if op.fua { syncing.withLock { $0 += 1 } }
                        Self.apply(op.kind, at: op.offset - UInt64(lo), to: &mine)
                    }
                    let before = submitted.current
                    let flush = next
                    next += 1
                    pipeline.submit(VolumeOp(.flush, offset: 0, completion: answers.completion(flush, snapshot: { observer.flushSyncedSeq })))
                    submitted.withLock { $0 += 1 }
                    syncing.withLock { $0 += 1 }
                    guard let record = answers.waitRecord(flush) else {
                        problems.withLock { $0.append("thread \(t) round \(round): the FLUSH was not answered within 10 s") }
                        return
                    }
                    if record.answer != .success {
                        problems.withLock { $0.append("thread \(t) round \(round): the FLUSH was answered \(record.answer)") }
                    }
                    // `before` requests precede the FLUSH in the queue: its seq is at least base + before + 1.
                    if record.snapshot < base + UInt64(before) + 1 {
                        problems.withLock {
                            $0.append("thread \(t) round \(round): FLUSH answered with the log synced through seq \(record.snapshot), but \(before) requests were submitted before it (base seq \(base))")
                        }
                    }
                }
                regions.withLock { $0[t] = mine }
            }.start()
        }
        for _ in 0..<threads {
            try #require(finished.wait(timeout: .now() + .seconds(60)) == .success, "a connection thread did not finish")
        }
        #expect(problems.current.isEmpty, "\(problems.current.prefix(5))")
        let flushSyncs = pipeline.syncs[.flush, default: 0]
        #expect(flushSyncs >= 1 && flushSyncs <= syncing.current, "\(flushSyncs) log syncs for \(syncing.current) FLUSH and FUA requests")
        try #require(Self.stop(pipeline), "stop() did not return")
        #expect(pipeline.fenceReason == nil)

        let total = submitted.current
        #expect(answers.count == total)
        #expect(answers.all.values.allSatisfy { $0.answer == .success })
        #expect(answers.repeated.isEmpty)
        var model = initial
        let parts = regions.current
        #expect(parts.count == threads)
        for (t, bytes) in parts {
            let lo = t * blocksPerThread * bs
            model.replaceSubrange(lo..<lo + bytes.count, with: bytes)
        }
        let meta = try volume.mirror.meta()
        #expect(meta.lastSeq == base + UInt64(total))
        #expect(meta.sourceSyncedSeq == meta.lastSeq)
        let latest = try readAll(volume.mirror, at: .latest)
        #expect(firstDifference(latest, model) == nil, "latest point differs from the model at \(firstDifference(latest, model) ?? -1)")
        let source = fileBytes(volume.sourcePath)
        #expect(firstDifference(source, model) == nil, "source differs from the model at \(firstDifference(source, model) ?? -1)")
        #expect(try volume.mirror.verify().records == UInt64(total))
        #expect(observer.fenceReasons.isEmpty)
    }

    // MARK: 3. fencing

    /// The storage failure a fencing test injects.
    enum Fault: String, CaseIterable, Sendable {
        /// `fdatasync` of the payload log fails (EIO): the FLUSH's sync, or the applier's.
        case logSync
        /// The applier's periodic `fdatasync` of the source fails (EIO).
        case sourceSync
        /// A `pwrite` to the payload log fails with ENOSPC (a full disk).
        case logNoSpace

        var reason: String {
            switch self {
            case .logSync: "journal sync failed"
            case .sourceSync: "source sync failed"
            case .logNoSpace: "journal append failed"
            }
        }
    }

    /// Invariant: any storage failure fences the volume for good. The request that met it is
    /// answered EIO (ENOSPC for a full disk), and from then on every write-nature request —
    /// write, FUA write, zero, trim, FLUSH — is refused with EIO: no FLUSH is answered with
    /// success again (after a failed fdatasync the kernel may have dropped the pages). The
    /// reason names the failure and the file; the observer hears of it once; and reads go on
    /// returning every write answered with success, including those the failure caught on
    /// their way to the source.
    @Test(arguments: Fault.allCases)
    func aStorageFailureFencesTheVolumeForGood(_ fault: Fault) throws {
        let dir = TempDir("pipeline-fence-\(fault.rawValue)")
        defer { dir.remove() }
        let bs = 4096
        let initial = halfFilledVolume(blockSize: bs, mul: 7, add: 3)
        let volume = try Self.makeVolume(dir, initial, blockSize: bs)
        let size = volume.size
        let layer = FaultLayer(root: dir.path)
        Storage.install(layer)
        defer { Storage.remove(layer) }
        var tuning = ServePipeline.Tuning()
        tuning.commitIntervalNanoseconds = 1_000_000
        // No index commit during the test: its log sync could take the armed failure first.
        tuning.indexPolicy = .init(intervalNanoseconds: 60_000_000_000, maxChanges: 1 << 20, maxBlocks: 1 << 20)
        tuning.indexCommitIdleNanoseconds = 60_000_000_000
        tuning.sourceSyncIntervalNanoseconds = fault == .sourceSync ? 1_000_000 : 60_000_000_000
        let observer = Recorder()
        let pipeline = try Self.startPipeline(volume, tuning, observer, onFull: .fail)
        let answers = Answers()
        var model = initial

        // Before the failure: a write and a FLUSH succeed, and the write reaches the source.
        let a = Self.pattern(2 * bs, seed: 1)
        pipeline.submit(VolumeOp(.write(a), offset: 0, completion: answers.completion(0)))
        pipeline.submit(VolumeOp(.flush, offset: 0, completion: answers.completion(1)))
        Self.apply(.write(a), at: 0, to: &model)
        #expect(answers.wait(0) == .success)
        #expect(answers.wait(1) == .success)
        #expect(Self.eventually { !pipeline.overlaps(0..<size) }, "the applier never caught up")
        if fault == .sourceSync {
            #expect(Self.eventually { pipeline.syncs[.source, default: 0] >= 1 }, "the source was never synced")
        }
        #expect(pipeline.fenceReason == nil)

        // The failure.
        let b = Self.pattern(2 * bs, seed: 2), bAt = UInt64(8 * bs)
        let bRange = Int(bAt)..<Int(bAt) + b.count
        switch fault {
        case .logSync:
            layer.arm(operation: "fdatasync", pathContaining: "/log/", errno: EIO)
            pipeline.submit(VolumeOp(.write(b), offset: bAt, completion: answers.completion(2)))
            pipeline.submit(VolumeOp(.flush, offset: 0, completion: answers.completion(3)))
            #expect(answers.wait(2) == .success, "a plain write is answered once queued")
            #expect(answers.wait(3) == .failed(.io), "the FLUSH after the log's failed sync")
        case .sourceSync:
            layer.arm(operation: "fdatasync", pathContaining: volume.sourcePath, errno: EIO)
            pipeline.submit(VolumeOp(.write(b), offset: bAt, completion: answers.completion(2)))
            // Answered at once; refused only if a source sync still owed for A took the failure.
            let answer = answers.wait(2)
            #expect(answer == .success || answer == .failed(.io), "\(String(describing: answer))")
            #expect(Self.eventually { pipeline.fenceReason != nil }, "the applier's source sync never failed")
            pipeline.submit(VolumeOp(.flush, offset: 0, completion: answers.completion(3)))
            #expect(answers.wait(3) == .failed(.io), "the FLUSH after the source's failed sync")
        case .logNoSpace:
            layer.arm(operation: "pwrite", pathContaining: "/log/", errno: ENOSPC)
            // FUA: answered only once journalled, so the append's failure is its answer.
            pipeline.submit(VolumeOp(.write(b), offset: bAt, fua: true, completion: answers.completion(2)))
            #expect(answers.wait(2) == .failed(.noSpace), "the FUA write whose log append hit a full disk")
        }
        let bAnswered = answers.answer(2) == .success
        if bAnswered { Self.apply(.write(b), at: bAt, to: &model) }

        // Fenced for good: every later write-nature request is refused, FLUSH above all.
        let refused: [(kind: VolumeOp.Kind, offset: UInt64, fua: Bool)] = [
            (.write(Self.pattern(bs, seed: 3)), UInt64(40 * bs), false),
            (.flush, 0, false),
            (.write(Self.pattern(bs + 100, seed: 4)), UInt64(44 * bs + 7), true),
            (.zero(length: UInt64(bs), noHole: true), UInt64(48 * bs), false),
            (.trim(length: UInt64(2 * bs)), UInt64(50 * bs), false),
            (.flush, 0, false),
        ]
        var id = 10
        for round in 0..<2 {
            for op in refused {
                pipeline.submit(VolumeOp(op.kind, offset: op.offset, fua: op.fua, completion: answers.completion(id)))
                #expect(answers.wait(id) == .failed(.io), "round \(round): \(Self.describe(op)) after the fence")
                id += 1
            }
        }
        #expect(pipeline.syncs[.flush, default: 0] == 1, "only the FLUSH before the failure synced the log")

        let reason = try #require(pipeline.fenceReason)
        #expect(reason.contains(fault.reason), "fence reason: \(reason)")
        let injected = layer.injected
        #expect(injected.count == 1, "failures injected: \(injected)")
        if let path = injected.first {
            #expect(reason.contains(path), "fence reason \"\(reason)\" does not name \(path)")
            if fault == .sourceSync {
                #expect(path == volume.sourcePath)
            } else {
                #expect(path.hasPrefix(volume.mirror.path + "/log/"))
            }
        }

        // Reads go on: the source with what is still on its way there laid over.
        let seen = try Self.read(pipeline, 0..<size)
        var seenOutside = seen, modelOutside = model
        seenOutside.replaceSubrange(bRange, with: repeatElement(0, count: bRange.count))
        modelOutside.replaceSubrange(bRange, with: repeatElement(0, count: bRange.count))
        #expect(firstDifference(seenOutside, modelOutside) == nil,
                "after the fence a read differs from the model at \(firstDifference(seenOutside, modelOutside) ?? -1)")
        if bAnswered {
            // B was answered with success before the failure: it must still read back, whether
            // the failure caught it in the writer's group commit or at the applier.
            #expect(Array(seen[bRange]) == b, "a write answered with success before the failure no longer reads back (\(fault))")
        }

        try #require(Self.stop(pipeline), "stop() did not return")
        #expect(observer.fenceReasons == [reason], "the observer hears of the fence exactly once")
        #expect(answers.repeated.isEmpty)
    }

    // MARK: 4. backpressure

    /// Invariant: answered-but-unjournalled bytes stay bounded (`ackedBytesMax`): a plain
    /// write is answered at once only while the queue has room, and a write past the bound is
    /// answered from the writer only after the journal holds it (its group commit's
    /// `journalAppended` reached its seq). The writes within the bound are answered at once;
    /// at no answer do more than two bounds' worth of answered writes (the queue, and the
    /// group being journalled) lie outside the journal.
    @Test func writesPastTheAnsweredBoundWaitForTheJournal() throws {
        let dir = TempDir("pipeline-backpressure")
        defer { dir.remove() }
        let bs = 4096, count = 256, bound = 64 << 10  // 1 MiB of writes, 64 KiB answered ahead
        let initial = [UInt8](repeating: 0, count: 2 << 20)
        let volume = try Self.makeVolume(dir, initial, blockSize: bs)
        // A slow log (2 ms a pwrite) keeps the writer busy while requests pile up.
        let layer = FaultLayer(root: dir.path)
        layer.slowDown(operation: "pwrite", pathContaining: "/log/", microseconds: 2000)
        Storage.install(layer)
        defer { Storage.remove(layer) }
        var tuning = ServePipeline.Tuning()
        tuning.ackedBytesMax = bound
        tuning.commitIntervalNanoseconds = 1_000_000
        let observer = Recorder()
        let base = try volume.mirror.meta().lastSeq
        var rng = SplitMix(seed: 0xBAC0)
        var writes: [(offset: UInt64, data: [UInt8])] = []
        for i in 0..<count {
            writes.append((UInt64.random(in: 0..<512, using: &rng) * UInt64(bs), Self.pattern(bs, seed: i + 10)))
        }
        let pipeline = try Self.startPipeline(volume, tuning, observer)
        let answers = Answers()
        let me = pthread_self()
        var model = initial
        for (i, w) in writes.enumerated() {
            pipeline.submit(VolumeOp(.write(w.data), offset: w.offset, completion: answers.completion(i, snapshot: { observer.appendedSeq })))
            Self.apply(.write(w.data), at: w.offset, to: &model)
        }
        pipeline.submit(VolumeOp(.flush, offset: 0, completion: answers.completion(count)))
        #expect(answers.wait(count) == .success)
        try #require(answers.waitAll(0...count), "some write was never answered")

        let records = answers.all
        var deferred = 0
        for i in 0..<count {
            guard let r = records[i] else { continue }
            let seq = base + UInt64(i) + 1
            #expect(r.answer == .success, "write \(i)")
            let atOnce = pthread_equal(r.thread, me) != 0
            if i < bound / bs {
                #expect(atOnce, "write \(i) fits in the bound, yet was not answered at once")
            }
            if !atOnce {
                deferred += 1
                #expect(r.snapshot >= seq, "write \(i) (seq \(seq)) was answered with the journal at seq \(r.snapshot)")
            }
        }
        #expect(deferred > 0, "no write waited for the journal: the bound was never reached")
        // Replay the answers in the order they came: answered writes not yet journalled.
        let order = (0..<count).filter { records[$0] != nil }.sorted { records[$0]!.order < records[$1]!.order }
        var answered: [Int] = []
        var worst = 0
        for i in order {
            answered.append(i)
            let journalled = records[i]!.snapshot
            let pending = answered.filter { base + UInt64($0) + 1 > journalled }.count * bs
            worst = max(worst, pending)
        }
        #expect(worst <= 2 * bound, "\(worst) bytes answered but not journalled at once (bound \(bound))")

        try #require(Self.stop(pipeline), "stop() did not return")
        #expect(pipeline.fenceReason == nil)
        #expect(observer.appendedRecords == count + 1)
        let latest = try readAll(volume.mirror, at: .latest)
        #expect(firstDifference(latest, model) == nil, "latest point differs from the model at \(firstDifference(latest, model) ?? -1)")
        let source = fileBytes(volume.sourcePath)
        #expect(firstDifference(source, model) == nil, "source differs from the model at \(firstDifference(source, model) ?? -1)")
    }

    // MARK: 5. stop

    /// Invariant: `stop()` journals everything still queued, writes it to the source and syncs
    /// both, answering every request with success — writes whose answer waits for the journal
    /// included — without waiting out the group's interval; after it, every request is
    /// answered ESHUTDOWN. Here every write's answer waits for the journal (`ackedBytesMax` 0),
    /// and the writer is held inside the first request's group commit (its first log `pwrite`
    /// blocks) while the rest queue up; `stop()` is called, then the log is let go.
    @Test func stopJournalsAndAnswersEverythingQueued() throws {
        let dir = TempDir("pipeline-stop")
        defer { dir.remove() }
        let bs = 4096
        let initial = halfFilledVolume(blockSize: bs, mul: 3, add: 1)
        let volume = try Self.makeVolume(dir, initial, blockSize: bs)
        let size = volume.size
        let layer = FaultLayer(root: dir.path)
        Storage.install(layer)
        defer { Storage.remove(layer) }
        layer.hold(operation: "pwrite", pathContaining: "/log/")
        defer { layer.release() }  // never leave the writer blocked, whatever fails
        var tuning = ServePipeline.Tuning()
        tuning.ackedBytesMax = 0
        tuning.commitIntervalNanoseconds = 60_000_000_000
        let observer = Recorder()
        let base = try volume.mirror.meta().lastSeq
        let pipeline = try Self.startPipeline(volume, tuning, observer)
        let answers = Answers()
        var model = initial
        var rng = SplitMix(seed: 0x5709)
        let n = 40
        // Zeros and trims carry no bytes: one may be answered when queued, but only while no
        // write's bytes are queued (the bound counts every queued byte).
        var answeredAtOnce = Set<Int>()
        for i in 0..<n {
            var op = Self.randomOp(&rng, in: 0..<size, blockSize: bs, flushPercent: 0, fuaPercent: 0)
            if i == 0 { op = (.write(Self.pattern(bs, seed: 5)), UInt64(3 * bs), false) }
            if case .write = op.kind {} else { answeredAtOnce.insert(i) }
            pipeline.submit(VolumeOp(op.kind, offset: op.offset, completion: answers.completion(i)))
            Self.apply(op.kind, at: op.offset, to: &model)
            if i == 0 {
                try #require(layer.waitHeld(), "the writer never started the first group commit")
            }
        }
        #expect(!answeredAtOnce.isEmpty && answeredAtOnce.count < n - 1)
        usleep(20_000)
        let early = Set(answers.all.keys)
        #expect(early.isSubset(of: answeredAtOnce), "a write was answered before it was journalled: \(early.subtracting(answeredAtOnce).sorted())")
        #expect(observer.appendedSeq == base, "the held writer journalled something")
        #expect(pipeline.overlaps(0..<size))
        let seen = try Self.read(pipeline, 0..<size)
        #expect(firstDifference(seen, model) == nil, "a read of the queued writes differs at \(firstDifference(seen, model) ?? -1)")

        // stop() while the writes wait, then let the log go.
        let stopped = DispatchSemaphore(value: 0)
        Thread {
            pipeline.stop()
            stopped.signal()
        }.start()
        usleep(50_000)  // stop() has set `stopping` by now (if not, the writes are journalled all the same)
        #expect(answers.count == early.count, "a request was answered while the writer was held")
        let clock = ContinuousClock()
        let released = clock.now
        layer.release()
        try #require(stopped.wait(timeout: .now() + .seconds(20)) == .success, "stop() did not return")
        #expect(clock.now - released < .seconds(5), "stop() waited for the group's interval")
        #expect(answers.count == n)
        #expect(answers.all.values.allSatisfy { $0.answer == .success })
        #expect(answers.repeated.isEmpty)
        #expect(pipeline.fenceReason == nil)
        let meta = try volume.mirror.meta()
        #expect(meta.lastSeq == base + UInt64(n))
        #expect(meta.sourceSyncedSeq == meta.lastSeq)
        let latest = try readAll(volume.mirror, at: .latest)
        #expect(firstDifference(latest, model) == nil, "latest point differs from the model at \(firstDifference(latest, model) ?? -1)")
        let source = fileBytes(volume.sourcePath)
        #expect(firstDifference(source, model) == nil, "source differs from the model at \(firstDifference(source, model) ?? -1)")
        #expect(try volume.mirror.verify().records == UInt64(n))

        // After stop(): refused, and answered before submit returns.
        let late: [(kind: VolumeOp.Kind, offset: UInt64, fua: Bool)] = [
            (.write(Self.pattern(bs, seed: 9)), 0, false),
            (.flush, 0, false),
            (.zero(length: UInt64(bs), noHole: false), UInt64(bs), false),
        ]
        for (k, op) in late.enumerated() {
            pipeline.submit(VolumeOp(op.kind, offset: op.offset, fua: op.fua, completion: answers.completion(100 + k)))
            #expect(answers.answer(100 + k) == .failed(.shutdown), "\(Self.describe(op)) after stop()")
        }
        #expect(try volume.mirror.meta().lastSeq == base + UInt64(n))
        #expect(observer.fenceReasons.isEmpty)
    }

    // MARK: - helpers

    /// A served volume: the mirror and the source file, equal when the pipeline starts.
    struct Volume: Sendable {
        let mirror: Mirror
        let source: BlockFile
        let sourcePath: String
        var size: UInt64 { mirror.volumeSize }
    }

    /// Write `initial` as the source and make a mirror of it: the mirror's latest point is the source.
    static func makeVolume(_ dir: TempDir, _ initial: [UInt8], blockSize: Int) throws -> Volume {
        let sourcePath = dir.file("source.img")
        let source = try BlockFile(path: sourcePath, mode: .createNew)
        try source.write(at: 0, initial)
        let mirror = try Mirror.create(at: dir.file("m"), from: sourcePath, blockSize: blockSize)
        return Volume(mirror: mirror, source: source, sourcePath: sourcePath)
    }

    /// Fencing tests pass `onFull: .fail`: a full log is then a failure like any other
    /// (`JournalFullTests` covers the default, which makes room).
    static func startPipeline(_ volume: Volume, _ tuning: ServePipeline.Tuning, _ observer: Recorder,
                              onFull: ServePipeline.FullPolicy = .compact) throws -> ServePipeline {
        let synced = try volume.mirror.meta().lastSeq
        let pipeline = ServePipeline(mirror: volume.mirror, source: volume.source, sourceSyncedSeq: synced,
                                     tuning: tuning, onFull: onFull, observer: observer)
        pipeline.start()
        return pipeline
    }

    /// `pipeline.stop()` on a thread of its own: false if it has not returned within `seconds`
    /// (the test then fails rather than hangs).
    static func stop(_ pipeline: ServePipeline, seconds: Int = 20) -> Bool {
        let done = DispatchSemaphore(value: 0)
        Thread {
            pipeline.stop()
            done.signal()
        }.start()
        return done.wait(timeout: .now() + .seconds(seconds)) == .success
    }

    /// Poll `condition` every millisecond for up to `seconds`.
    static func eventually(seconds: Double = 10, _ condition: () -> Bool) -> Bool {
        let deadline = Date(timeIntervalSinceNow: seconds)
        while !condition() {
            if Date() > deadline { return false }
            usleep(1000)
        }
        return true
    }

    static func read(_ pipeline: ServePipeline, _ range: Range<UInt64>) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0xEE, count: Int(range.upperBound - range.lowerBound))
        try bytes.withUnsafeMutableBytes { try pipeline.read(at: range.lowerBound, into: $0) }
        return bytes
    }

    static func pattern(_ count: Int, seed: Int) -> [UInt8] {
        (0..<count).map { UInt8(truncatingIfNeeded: $0 &* 29 &+ seed &* 67 &+ 1) }
    }

    /// What a request changes (empty for a FLUSH).
    static func span(of kind: VolumeOp.Kind, at offset: UInt64) -> Range<UInt64> {
        switch kind {
        case .write(let data): return offset..<offset + UInt64(data.count)
        case let .zero(length, _), let .trim(length): return offset..<offset + length
        case .flush: return offset..<offset
        }
    }

    /// The model's side of a request: `model` holds the volume (or a region of it, `offset`
    /// then relative to the region).
    static func apply(_ kind: VolumeOp.Kind, at offset: UInt64, to model: inout [UInt8]) {
        let o = Int(offset)
        switch kind {
        case .write(let data):
            model.replaceSubrange(o..<o + data.count, with: data)
        case let .zero(length, _), let .trim(length):
            model.replaceSubrange(o..<o + Int(length), with: repeatElement(0, count: Int(length)))
        case .flush:
            break
        }
    }

    static func describe(_ op: (kind: VolumeOp.Kind, offset: UInt64, fua: Bool)) -> String {
        let fua = op.fua ? " FUA" : ""
        switch op.kind {
        case .write(let data): return "write \(op.offset)+\(data.count)\(fua)"
        case let .zero(length, noHole): return "zero \(op.offset)+\(length)\(noHole ? " no-hole" : "")\(fua)"
        case let .trim(length): return "trim \(op.offset)+\(length)\(fua)"
        case .flush: return "FLUSH"
        }
    }

    /// A random request inside `region` (whose start is block-aligned): writes of 1 byte to 3
    /// blocks, zeros (hole or not) and trims of up to an eighth of the region, each aligned or
    /// not; `flushPercent` of them FLUSHes, `fuaPercent` of the others FUA.
    static func randomOp(_ rng: inout SplitMix, in region: Range<UInt64>, blockSize: Int, flushPercent: Int,
                         fuaPercent: Int) -> (kind: VolumeOp.Kind, offset: UInt64, fua: Bool) {
        if Int.random(in: 0..<100, using: &rng) < flushPercent { return (.flush, 0, false) }
        let bs = UInt64(blockSize)
        let aligned = Bool.random(using: &rng)
        let fua = Int.random(in: 0..<100, using: &rng) < fuaPercent
        func pick(_ maxLength: UInt64) -> (offset: UInt64, length: UInt64) {
            var offset = UInt64.random(in: region, using: &rng)
            var length = UInt64.random(in: 1...maxLength, using: &rng)
            if aligned {
                offset -= offset % bs
                length = max(bs, length - length % bs)
            }
            return (offset, min(length, region.upperBound - offset))
        }
        let roll = Int.random(in: 0..<100, using: &rng)
        let largest = max(bs, (region.upperBound - region.lowerBound) / 8)
        if roll < 70 {
            let s = pick(3 * bs + 17)
            let fill = Int.random(in: 1...255, using: &rng)
            let data = (0..<Int(s.length)).map { UInt8(truncatingIfNeeded: fill &+ $0 &* 13) }
            return (.write(data), s.offset, fua)
        } else if roll < 85 {
            let s = pick(largest)
            return (.zero(length: s.length, noHole: Bool.random(using: &rng)), s.offset, fua)
        } else {
            let s = pick(largest)
            return (.trim(length: s.length), s.offset, fua)
        }
    }

    /// A value shared between threads, under a lock.
    final class Locked<Value>: @unchecked Sendable {
        private let lock = NSLock()
        private var value: Value
        init(_ value: Value) { self.value = value }
        func withLock<R>(_ body: (inout Value) throws -> R) rethrows -> R {
            lock.lock()
            defer { lock.unlock() }
            return try body(&value)
        }
        var current: Value { withLock { $0 } }
    }

    /// The answers the pipeline gave, by request id, and waits for them (bounded).
    final class Answers: @unchecked Sendable {
        enum Answer: Equatable, Sendable {
            case success
            case failed(VolumeOp.Failure)
        }

        struct Record: Sendable {
            var answer: Answer
            /// What the request's `snapshot` returned when it was answered (0 without one).
            var snapshot: UInt64
            /// The thread that answered.
            var thread: pthread_t
            /// 0 for the first answer, 1 for the next, …
            var order: Int
        }

        private let cond = NSCondition()
        private var records: [Int: Record] = [:]
        private var repeats: [Int] = []

        /// The completion for request `id`; `snapshot`, if given, is read when it is answered.
        func completion(_ id: Int, snapshot: (@Sendable () -> UInt64)? = nil) -> VolumeOp.Completion {
            { [self] failure in
                let value = snapshot?() ?? 0
                let thread = pthread_self()
                cond.lock()
                if records[id] == nil {
                    records[id] = Record(answer: failure.map { Answer.failed($0) } ?? Answer.success, snapshot: value, thread: thread,
                                         order: records.count)
                } else {
                    repeats.append(id)
                }
                cond.broadcast()
                cond.unlock()
            }
        }

        func waitRecord(_ id: Int, seconds: Double = 10) -> Record? {
            let deadline = Date(timeIntervalSinceNow: seconds)
            cond.lock()
            defer { cond.unlock() }
            while records[id] == nil && cond.wait(until: deadline) {}
            return records[id]
        }

        /// The answer to request `id`, waiting up to `seconds` for it; nil if none came.
        func wait(_ id: Int, seconds: Double = 10) -> Answer? { waitRecord(id, seconds: seconds)?.answer }

        func waitAll(_ ids: ClosedRange<Int>, seconds: Double = 10) -> Bool {
            let deadline = Date(timeIntervalSinceNow: seconds)
            cond.lock()
            defer { cond.unlock() }
            for id in ids {
                while records[id] == nil {
                    if !cond.wait(until: deadline) && records[id] == nil { return false }
                }
            }
            return true
        }

        /// The answer to request `id` so far (no wait).
        func answer(_ id: Int) -> Answer? {
            cond.lock()
            defer { cond.unlock() }
            return records[id]?.answer
        }

        var all: [Int: Record] {
            cond.lock()
            defer { cond.unlock() }
            return records
        }

        var count: Int { all.count }

        /// Requests answered more than once.
        var repeated: [Int] {
            cond.lock()
            defer { cond.unlock() }
            return repeats
        }
    }

    /// What the pipeline told its observer.
    final class Recorder: ServePipelineObserver, @unchecked Sendable {
        private let lock = NSLock()
        private var lastAppended: UInt64 = 0
        private var appendedCount = 0
        private var lastFlushSynced: UInt64 = 0
        private var fences: [String] = []

        func journalAppended(records: Int, bytes: Int, lastSeq: UInt64) {
            lock.withLock {
                lastAppended = max(lastAppended, lastSeq)
                appendedCount += records
            }
        }

        func synced(_ kind: ServePipeline.SyncKind, nanoseconds: UInt64) {
            // The writer appends a group, syncs the log for its FLUSH, then reports both, in
            // that order and on its own thread: the log is durable through the last append.
            if kind == .flush { lock.withLock { lastFlushSynced = max(lastFlushSynced, lastAppended) } }
        }

        func fenced(_ why: String) { lock.withLock { fences.append(why) } }

        private var roomMade: [CompactionReport] = []
        func madeRoom(_ report: CompactionReport, after error: String) { lock.withLock { roomMade.append(report) } }
        /// The compactions a full journal forced.
        var madeRoomReports: [CompactionReport] { lock.withLock { roomMade } }

        /// The newest seq a group commit appended to the log.
        var appendedSeq: UInt64 { lock.withLock { lastAppended } }
        var appendedRecords: Int { lock.withLock { appendedCount } }
        /// The seq the log was last synced through for a FLUSH or FUA write.
        var flushSyncedSeq: UInt64 { lock.withLock { lastFlushSynced } }
        var fenceReasons: [String] { lock.withLock { fences } }
    }

    /// A storage layer over one test's directory: passes every call through, except that an
    /// armed failure makes the next matching call throw without running, a hold makes the next
    /// matching call wait for `release()`, and matching calls can be slowed down.
    final class FaultLayer: StorageFaults, @unchecked Sendable {
        private struct Rule {
            var operation: String
            var pathContaining: String
        }

        let root: String
        private let lock = NSLock()
        private var armed: (rule: Rule, errno: Int32)?
        private var slow: (rule: Rule, microseconds: UInt32)?
        private var held: Rule?
        private var released = false
        private let entered = DispatchSemaphore(value: 0)
        private let gate = DispatchSemaphore(value: 0)
        private var failed: [String] = []

        init(root: String) { self.root = root.hasSuffix("/") ? root : root + "/" }

        /// The next call of `operation` ("pwrite", "fdatasync", …) on a path containing
        /// `pathContaining` throws `RewindError.io` with `errno`, once.
        func arm(operation: String, pathContaining: String, errno: Int32) {
            lock.withLock { armed = (Rule(operation: operation, pathContaining: pathContaining), errno) }
        }

        /// Every call of `operation` on a path containing `pathContaining` takes `microseconds` more.
        func slowDown(operation: String, pathContaining: String, microseconds: UInt32) {
            lock.withLock { slow = (Rule(operation: operation, pathContaining: pathContaining), microseconds) }
        }

        /// The next call of `operation` on a path containing `pathContaining` blocks until `release()`.
        func hold(operation: String, pathContaining: String) {
            lock.withLock { held = Rule(operation: operation, pathContaining: pathContaining) }
        }

        /// Whether a call reached the hold within `seconds`.
        func waitHeld(seconds: Int = 10) -> Bool { entered.wait(timeout: .now() + .seconds(seconds)) == .success }

        /// Let the held call go on (and any later one that reaches the hold); idempotent.
        func release() {
            let first = lock.withLock { () -> Bool in
                defer { released = true }
                return !released
            }
            if first { gate.signal() }
        }

        /// The paths an armed failure was injected on.
        var injected: [String] { lock.withLock { failed } }

        func covers(_ path: String) -> Bool { path.hasPrefix(root) }

        private func intercept(_ path: String, _ operation: String) throws {
            let (failure, delay, blocks) = lock.withLock { () -> (Int32?, UInt32, Bool) in
                var blocks = false
                if let h = held, h.operation == operation, path.contains(h.pathContaining) {
                    held = nil
                    blocks = true
                }
                var failure: Int32?
                if let a = armed, a.rule.operation == operation, path.contains(a.rule.pathContaining) {
                    failure = a.errno
                    armed = nil
                    failed.append(path)
                }
                var delay: UInt32 = 0
                if let s = slow, s.rule.operation == operation, path.contains(s.rule.pathContaining) { delay = s.microseconds }
                return (failure, delay, blocks)
            }
            if blocks {
                entered.signal()
                gate.wait()
            }
            if let failure { throw RewindError.io(path: path, operation: operation, errno: failure) }
            if delay > 0 { usleep(delay) }
        }

        func modify(_ path: String, fd: Int32, _ range: Range<UInt64>, operation: String, _ body: () throws -> Void) throws {
            try intercept(path, operation)
            try body()
        }

        func sync(_ path: String, fd: Int32, operation: String, _ body: () throws -> Void) throws {
            try intercept(path, operation)
            try body()
        }

        func lmdbCommit(_ directory: String, _ body: () throws -> Void) throws { try body() }

        func lmdbSync(_ directory: String, _ body: () throws -> Void) throws { try body() }
    }
}
