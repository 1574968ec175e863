import Foundation
import Glibc
import Testing
@testable import RewindCore

/// Expect `body` to throw an error whose message is exactly `message`.
private func expectFailure(_ message: String, sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> Void) {
    do {
        try body()
        Issue.record("no error; expected: \(message)", sourceLocation: sourceLocation)
    } catch {
        #expect("\(error)" == message, sourceLocation: sourceLocation)
    }
}

/// Exporting a point (`rewind export`, `NAME@POINT`): pins, `PointReader`, `Overlay`, the
/// durable point a FLUSH leaves (`ServePipeline.durablePoint`) and the control socket that
/// hands it to other processes.
@Suite struct PointExportTests {
    typealias Locked<Value> = ServePipelineTests.Locked<Value>
    static let bs = 4096

    // MARK: 1. a pinned point reads its bytes while the mirror moves on

    /// Invariant: a `PointReader` reads exactly the volume as of its seq — the whole volume and
    /// any sub-range — and its `allocation` is truthful (pieces in order, covering the range,
    /// every `.hole` and `.zero` piece reading as zeros, so every non-zero byte lies in a `.data`
    /// piece), while another thread keeps appending records and compactions run: an explicit
    /// one below the oldest pin, one past it (refused with `.pinned`, nothing recorded), and
    /// retention, which stops at the oldest pin. Points are pinned by seq, by time (RFC 3339
    /// of a record's timestamp), by bookmark, `--consistent` (the newest FLUSH at or before)
    /// and latest. Closing the oldest reader lets retention go on to the next pin; closing
    /// all leaves no pin, and a compaction to the latest point proceeds.
    @Test func pinnedPointsReadTheModelWhileWritesAndCompactionsGoOn() throws {
        let dir = TempDir("point-model")
        defer { dir.remove() }
        let bs = Self.bs, blocks = 256
        let size = UInt64(blocks * bs)
        let initial = Self.initialImage(blocks: blocks)
        try writeFile(dir.file("seed.img"), initial)
        let m = try Mirror.create(at: dir.file("m"), from: dir.file("seed.img"), blockSize: bs)
        var rng = SplitMix(seed: 0x9E11_0001)
        var changes: [Change] = []
        for _ in 0..<100 {
            let batch = (0..<Int.random(in: 1...7, using: &rng)).map { _ in randomChange(&rng, size: size, blockSize: bs) }
            let seqs = try m.append(batch)
            #expect(seqs == UInt64(changes.count) + 1...UInt64(changes.count + batch.count))
            changes += batch
        }
        let last = UInt64(changes.count)
        var headers: [UInt64: RecordHeader] = [:]
        try m.forEachRecord(in: 1...last) { headers[$0.seq] = $0.header }
        #expect(headers.count == Int(last))
        #expect(headers.allSatisfy { $0.value.kind == changes[Int($0.key) - 1].kind }, "the timeline's record kinds differ from the appended changes")

        // The points: by seq, by time, by bookmark, --consistent, latest.
        let s1 = last / 5
        let timeOf = try #require(headers[2 * last / 5]?.timestamp)
        let timeSeq = try #require(headers.filter { $0.value.timestamp <= timeOf }.map { $0.key }.max())
        let s3 = 3 * last / 5
        #expect(try m.setBookmark("before-upgrade", at: .seq(s3)) == s3)
        let inner = 4 * last / 5
        let flushSeq = (1...inner).last { changes[Int($0) - 1].kind == .flush } ?? 0
        try #require(flushSeq > s1, "the workload has no FLUSH in seq:\(s1 + 1)...seq:\(inner)")
        struct Spec {
            let holder: String
            let point: Point
            let seq: UInt64
        }
        let bySeq = try Point(parsing: "seq:\(s1)")
        let byTime = try Point(parsing: "time:" + formatRFC3339(timeOf))
        let byBookmark = try Point(parsing: "bookmark:before-upgrade")
        #expect(byTime == Point.time(timeOf, text: formatRFC3339(timeOf)))
        let specs = [
            Spec(holder: "export vol@seq:\(s1)", point: bySeq, seq: s1),
            Spec(holder: "export vol@time", point: byTime, seq: timeSeq),
            Spec(holder: "export vol@bookmark:before-upgrade", point: byBookmark, seq: s3),
            Spec(holder: "export vol@seq:\(inner) --consistent", point: .consistent(.seq(inner)), seq: flushSeq),
            Spec(holder: "export vol@latest", point: .latest, seq: last),
        ]
        let expected = Self.states(initial, changes, at: specs.map(\.seq))
        let readers = try specs.map { try PointReader(mirror: m, point: $0.point, holder: $0.holder) }
        defer { readers.forEach { $0.close() } }
        #expect(readers.map(\.seq) == specs.map(\.seq))
        let pins = try m.livePins()
        #expect(pins.map(\.seq) == specs.map(\.seq).sorted())
        #expect(Set(pins.map(\.holder)) == Set(specs.map(\.holder)))
        #expect(pins.allSatisfy { $0.pid == getpid() })
        #expect(try m.status().pins.map(\.seq) == specs.map(\.seq).sorted())

        // Before anything moves: exact reads, truthful allocation, ranges checked.
        var kinds = Set<PointReader.Allocation>()
        for r in readers {
            let want = try #require(expected[r.seq])
            let found = Self.readProblems(r, want, seed: r.seq, samples: 20) + Self.allocationProblems(r, want, 0..<size)
            #expect(found.isEmpty, "\(found.prefix(5))")
            let pieces = try r.allocation(0..<size, limit: Int.max)
            kinds.formUnion(pieces.map { $0.1 })
            #expect(try r.allocation(4096..<4096, limit: 10).isEmpty)
        }
        let allKinds: Set<PointReader.Allocation> = [.data, .zero, .hole]
        #expect(kinds == allKinds, "allocation kinds seen: \(kinds)")
        expectFailure("range \(size - 1)+2 lies outside the volume (size \(size))") {
            _ = try Self.readRange(readers[0], size - 1..<size + 1)
        }

        // Another thread appends while a checker reads every point and the compactions run.
        let problems = Locked<[String]>([])
        let finished = Locked(false)
        let appended = Locked<[Change]>([])
        let passes = Locked(0)
        let appenderDone = DispatchSemaphore(value: 0), checkerDone = DispatchSemaphore(value: 0)
        Thread {
            defer { appenderDone.signal() }
            var rng = SplitMix(seed: 0x9E11_0002)
            for _ in 0..<60 {
                let batch = (0..<Int.random(in: 1...7, using: &rng)).map { _ in randomChange(&rng, size: size, blockSize: bs) }
                do {
                    _ = try m.append(batch)
                } catch {
                    problems.withLock { $0.append("append: \(error)") }
                    return
                }
                appended.withLock { $0 += batch }
            }
        }.start()
        Thread {
            defer { checkerDone.signal() }
            var pass = 0
            while (pass < 3 || !finished.current) && pass < 100_000 {
                for r in readers {
                    guard let want = expected[r.seq] else { continue }
                    let found = PointExportTests.readProblems(r, want, seed: UInt64(pass) &* 31 &+ r.seq, samples: 6)
                        + PointExportTests.allocationProblems(r, want, 0..<size)
                    if !found.isEmpty { problems.withLock { $0 += found } }
                }
                pass += 1
            }
            passes.withLock { $0 = pass }
        }.start()

        let oldest = s1
        // Past the oldest pin: refused, naming it, and no target recorded.
        do {
            _ = try m.compact(to: .seq(oldest + 1))
            Issue.record("a compaction past seq:\(oldest), a pinned point, went through")
        } catch let error as RewindError {
            #expect(error.description == "seq:\(oldest + 1) is after seq:\(oldest), a point in use by export vol@seq:\(oldest) (pid \(getpid())); stop it, or compact to seq:\(oldest) at most")
            if case let .pinned(target, pin) = error {
                #expect(target == oldest + 1)
                #expect(pin.seq == oldest && pin.holder == "export vol@seq:\(oldest)" && pin.pid == getpid())
            } else {
                Issue.record("expected .pinned, got \(error)")
            }
        }
        #expect(try m.meta().target == 0 && m.meta().horizon == 0)
        // Below the oldest pin: goes through. Retention then stops at the pin.
        let below = try m.compact(to: .seq(oldest / 2))
        #expect(below.fromHorizon == 0 && below.toHorizon == oldest / 2)
        let retained = try #require(try m.compact(keepAgeNanoseconds: nil, keepBytes: 0))
        #expect(retained.fromHorizon == oldest / 2 && retained.toHorizon == oldest)
        #expect(try m.retentionHeldBy(keepAgeNanoseconds: nil, keepBytes: 0)?.holder == "export vol@seq:\(oldest)")
        #expect(try m.compact(keepAgeNanoseconds: nil, keepBytes: 0)?.toHorizon == nil, "retention went past the oldest pin")
        // No new pin before the horizon.
        expectFailure("seq:\(oldest - 1) is before the oldest restorable point seq:\(oldest) (compacted into the base)") {
            _ = try PointReader(mirror: m, point: .seq(oldest - 1), holder: "too late")
        }

        try #require(appenderDone.wait(timeout: .now() + .seconds(60)) == .success, "the appender did not finish")
        finished.withLock { $0 = true }
        try #require(checkerDone.wait(timeout: .now() + .seconds(60)) == .success, "the checker did not finish")
        #expect(problems.current.isEmpty, "\(problems.current.count) problems: \(problems.current.prefix(5))")
        #expect(passes.current >= 3)
        let total = changes + appended.current
        #expect(total.count > changes.count)
        #expect(try m.meta().lastSeq == UInt64(total.count))

        // After: the same, with sub-ranges of allocation, and `limit` giving a prefix.
        for (i, r) in readers.enumerated() {
            let want = try #require(expected[r.seq])
            var found = Self.readProblems(r, want, seed: r.seq &+ 7, samples: 20) + Self.allocationProblems(r, want, 0..<size)
            var sub = SplitMix(seed: 0xA110C + UInt64(i))
            for _ in 0..<10 {
                let lo = UInt64.random(in: 0..<size, using: &sub)
                let hi = min(size, lo + UInt64.random(in: 1...UInt64(16 * bs), using: &sub))
                found += Self.allocationProblems(r, want, lo..<hi)
            }
            #expect(found.isEmpty, "\(found.prefix(5))")
            let full = try r.allocation(0..<size, limit: Int.max)
            let firstThree = try r.allocation(0..<size, limit: 3)
            #expect(firstThree.count == min(3, full.count))
            #expect(zip(firstThree, full).allSatisfy { pair in pair.0.0 == pair.1.0 && pair.0.1 == pair.1.1 },
                    "seq:\(r.seq): allocation with limit 3 is not the first pieces of the whole")
        }

        // The oldest reader goes: retention moves on to the next pin, the others still read.
        readers[0].close()
        let rest = specs.dropFirst().map(\.seq).sorted()
        #expect(try m.livePins().map(\.seq) == rest)
        let next = try #require(rest.first)
        let moved = try #require(try m.compact(keepAgeNanoseconds: nil, keepBytes: 0))
        #expect(moved.fromHorizon == oldest && moved.toHorizon == next)
        for r in readers.dropFirst() {
            let want = try #require(expected[r.seq])
            let found = Self.readProblems(r, want, seed: r.seq &+ 11, samples: 10) + Self.allocationProblems(r, want, 0..<size)
            #expect(found.isEmpty, "\(found.prefix(5))")
        }

        // All gone: no pin left, and a compaction to the latest point proceeds.
        readers.forEach { $0.close() }
        #expect(try m.livePins().isEmpty)
        let leftover = (try? FileManager.default.contentsOfDirectory(atPath: m.path + "/pins")) ?? []
        #expect(leftover.filter { $0.hasSuffix(".pin") }.isEmpty, "pin files left: \(leftover)")
        let end = try m.compact(to: .latest)
        #expect(end.toHorizon == UInt64(total.count))
        let model = try #require(Self.states(initial, total, at: [UInt64(total.count)])[UInt64(total.count)])
        let latest = try readAll(m, at: .latest)
        #expect(firstDifference(latest, model) == nil, "latest differs from the model at \(firstDifference(latest, model) ?? -1)")
        #expect(try m.verify().records == 0)
    }

    // MARK: 2. the durable point names the FLUSH

    /// Invariant: right after a FLUSH is answered, `durablePoint()` gives that FLUSH's seq —
    /// the newest FLUSH record — with the index (what `bookmark` reads) already holding it,
    /// even while another thread keeps writing and the index commits only every 100 ms; a
    /// bookmark set there names the FLUSH record, and `--consistent`
    /// leaves it where it is. Before any FLUSH it is the start's point (seq 0 here).
    @Test func aBookmarkTakenAfterAFlushNamesThatFlushUnderLoad() throws {
        let dir = TempDir("durable-point")
        defer { dir.remove() }
        let bs = Self.bs, rounds = 10
        let initial = halfFilledVolume(blockSize: bs, mul: 17, add: 1)  // 64 blocks
        let volume = try ServePipelineTests.makeVolume(dir, initial, blockSize: bs)
        let mirror = volume.mirror
        var tuning = ServePipeline.Tuning()
        tuning.commitIntervalNanoseconds = 300_000
        // The index commits every 100 ms under load, never when idle: the index lags the log,
        // and durablePoint must wait for (or bring on) the commit holding the FLUSH. Not
        // longer: the index thread's open write transaction holds LMDB's writer lock, which
        // `setBookmark` waits for until the next commit.
        tuning.indexPolicy = .init(intervalNanoseconds: 100_000_000, maxChanges: 1 << 20, maxBlocks: 1 << 20)
        tuning.indexCommitIdleNanoseconds = 60_000_000_000
        let observer = ServePipelineTests.Recorder()
        let pipeline = try ServePipelineTests.startPipeline(volume, tuning, observer)
        let stopLoad = Locked(false)
        var stopped = false
        defer {
            if !stopped {
                stopLoad.withLock { $0 = true }
                _ = ServePipelineTests.stop(pipeline)
            }
        }
        let start = try pipeline.durablePoint(timeoutSeconds: 10)
        #expect(start.flushed == 0 && start.appended == 0)

        // The load: 4 KiB writes, at most 8 unanswered, until told to stop.
        let outstanding = Locked(0), written = Locked(0), failures = Locked(0)
        let loadDone = DispatchSemaphore(value: 0)
        Thread {
            defer { loadDone.signal() }
            var rng = SplitMix(seed: 0xD0AB_1E)
            while !stopLoad.current && written.current < 20_000 {
                if outstanding.current >= 8 {
                    usleep(100)
                    continue
                }
                let block = UInt64.random(in: 0..<64, using: &rng)
                let data = [UInt8](repeating: UInt8.random(in: 1...255, using: &rng), count: bs)
                outstanding.withLock { $0 += 1 }
                pipeline.submit(VolumeOp(.write(data), offset: block * UInt64(bs), completion: { failure in
                    if failure != nil { failures.withLock { $0 += 1 } }
                    outstanding.withLock { $0 -= 1 }
                }))
                written.withLock { $0 += 1 }
                usleep(500)
            }
        }.start()

        let answers = ServePipelineTests.Answers()
        var flushSeqs: [UInt64] = []
        for k in 0..<rounds {
            let before = written.current
            #expect(ServePipelineTests.eventually { written.current >= before + 20 }, "round \(k): the load stalled")
            pipeline.submit(VolumeOp(.flush, offset: 0, completion: answers.completion(k)))
            #expect(answers.wait(k) == .success, "round \(k): the FLUSH")
            let point = try pipeline.durablePoint(timeoutSeconds: 10)
            try #require(point.flushed > 0, "round \(k): no durable FLUSH after a FLUSH was answered")
            let indexed = try mirror.meta().lastSeq
            #expect(indexed >= point.flushed, "round \(k): durablePoint returned seq:\(point.flushed) with the index at seq:\(indexed)")
            #expect(point.appended >= point.flushed)
            // Only this thread sends FLUSHes, one at a time: the index up to `flushed` holds
            // exactly the k+1 sent so far, the last of them at `flushed`.
            var flushes: [UInt64] = []
            try mirror.forEachRecord(in: 1...point.flushed) { r in
                if r.header.kind == .flush { flushes.append(r.seq) }
            }
            #expect(flushes.count == k + 1, "round \(k): FLUSH records up to seq:\(point.flushed): \(flushes)")
            #expect(flushes.last == point.flushed, "round \(k): seq:\(point.flushed) is not a FLUSH record")
            #expect(point.flushed > (flushSeqs.last ?? 0))
            let name = "durable-\(k)"
            #expect(try mirror.setBookmark(name, at: .seq(point.flushed)) == point.flushed)
            #expect(try mirror.resolve(.bookmark(name)) == point.flushed)
            #expect(try mirror.resolve(.consistent(.bookmark(name))) == point.flushed)
            flushSeqs.append(point.flushed)
        }

        stopLoad.withLock { $0 = true }
        try #require(loadDone.wait(timeout: .now() + .seconds(30)) == .success, "the load did not stop")
        #expect(ServePipelineTests.eventually { outstanding.current == 0 }, "writes left unanswered")
        stopped = true
        try #require(ServePipelineTests.stop(pipeline), "stop() did not return")
        #expect(failures.current == 0)
        #expect(pipeline.fenceReason == nil)
        let meta = try mirror.meta()
        #expect(meta.lastSeq == UInt64(written.current + rounds))
        try #require(meta.lastSeq > 0)
        var allFlushes: [UInt64] = []
        try mirror.forEachRecord(in: 1...meta.lastSeq) { r in
            if r.header.kind == .flush { allFlushes.append(r.seq) }
        }
        #expect(allFlushes == flushSeqs)
        #expect(try mirror.bookmarks().map { $0.seq }.sorted() == flushSeqs)
    }

    // MARK: 3. overlays

    /// Invariant: an overlay reads as the point with its writes laid over — writes aligned,
    /// unaligned, spanning blocks, at the volume's end; zeros of part of a block, of whole
    /// blocks, and of both at once — and its map says so block by block (`runs`: data for a
    /// block written or zeroed in part, zero for a block zeroed whole, point for the rest).
    /// The mirror is untouched (its points read as before), `restore --overlay` and
    /// `Overlay.apply` give point + writes, a reopened overlay reads the same, and an overlay
    /// is refused — with the exact messages — at another seq, for another mirror, when it is
    /// not an overlay, damaged, truncated or missing.
    @Test func anOverlayReadsItsWritesOverThePointAndLeavesTheMirrorAlone() throws {
        let dir = TempDir("overlay")
        defer { dir.remove() }
        let bs = Self.bs, blocks = 64
        let size = UInt64(blocks * bs), ubs = UInt64(bs)
        let initial = halfFilledVolume(blockSize: bs, mul: 29, add: 7)
        try writeFile(dir.file("seed.img"), initial)
        let m = try Mirror.create(at: dir.file("m"), from: dir.file("seed.img"), blockSize: bs)
        var rng = SplitMix(seed: 0x0E1A)
        var changes: [Change] = []
        for _ in 0..<40 {
            let c = randomChange(&rng, size: size, blockSize: bs)
            try m.append([c])
            changes.append(c)
        }
        let at: UInt64 = 25
        let checkpoints: [UInt64] = [0, 10, at, 40]
        let states = Self.states(initial, changes, at: checkpoints)
        for k in checkpoints {
            #expect(try readAll(m, at: .seq(k)) == states[k], "seq:\(k) before the overlay")
        }
        let reader = try PointReader(mirror: m, point: .seq(at), holder: "overlay test")
        defer { reader.close() }
        let point: (UInt64, UnsafeMutableRawBufferPointer) throws -> Void = { offset, dst in try reader.read(at: offset, into: dst) }

        let path = dir.file("vol.overlay")
        let overlay = try Overlay(path: path, mirror: m, seq: at)
        #expect(overlay.seq == at && overlay.blockSize == bs)
        var model = try #require(states[at])
        var map = [Overlay.State](repeating: .point, count: blocks)
        #expect(try Self.readOverlay(overlay, 0..<size, point) == model, "a new overlay reads as its point")
        let freshRuns = try overlay.runs(0, UInt64(blocks))
        #expect(Self.blockStates(freshRuns, count: blocks) == map)

        enum Op {
            case write(UInt64, [UInt8])
            case zero(UInt64, UInt64)
        }
        let ops: [Op] = [
            .write(2 * ubs, ServePipelineTests.pattern(bs, seed: 1)),                // one aligned block
            .write(5 * ubs + 100, ServePipelineTests.pattern(300, seed: 2)),          // inside one block
            .write(10 * ubs - 50, ServePipelineTests.pattern(2 * bs + 100, seed: 3)), // blocks 9 to 12, unaligned both ends
            .zero(3 * ubs + 1000, 500),                                               // part of a block
            .zero(20 * ubs, 3 * ubs),                                                 // whole blocks 20 to 22
            .zero(25 * ubs + 2000, 3 * ubs),                                          // part of 25, 26 and 27 whole, part of 28
            .write(21 * ubs + 7, ServePipelineTests.pattern(5, seed: 4)),             // into a zeroed block
            .zero(9 * ubs + 10, ubs),                                                 // parts of 9 and 10, over the spanning write
            .write(size - 10, ServePipelineTests.pattern(10, seed: 5)),               // the volume's last bytes
            .zero(0, ubs),                                                            // the first block whole
            .write(40 * ubs, ServePipelineTests.pattern(2 * bs, seed: 6)),            // over the point's zero half
            .zero(62 * ubs, 2 * ubs),                                                 // the last two blocks whole, over a write
            .write(41 * ubs + 4000, ServePipelineTests.pattern(200, seed: 7)),        // across a block boundary, over overlay data
        ]
        var sample = SplitMix(seed: 0x0E1B)
        for (i, op) in ops.enumerated() {
            switch op {
            case let .write(offset, data):
                try data.withUnsafeBytes { try overlay.write(at: offset, $0, point: point) }
                model.replaceSubrange(Int(offset)..<Int(offset) + data.count, with: data)
                for b in offset / ubs...(offset + UInt64(data.count) - 1) / ubs { map[Int(b)] = .data }
            case let .zero(offset, length):
                try overlay.zero(at: offset, length: length, point: point)
                model.replaceSubrange(Int(offset)..<Int(offset + length), with: repeatElement(0, count: Int(length)))
                for b in offset / ubs...(offset + length - 1) / ubs {
                    map[Int(b)] = b * ubs >= offset && (b + 1) * ubs <= offset + length ? .zero : .data
                }
            }
            let got = try Self.readOverlay(overlay, 0..<size, point)
            #expect(firstDifference(got, model) == nil, "after op \(i): the overlay differs from the model at \(firstDifference(got, model) ?? -1)")
            for _ in 0..<4 {
                let lo = UInt64.random(in: 0..<size, using: &sample)
                let hi = min(size, lo + UInt64.random(in: 1...3 * ubs, using: &sample))
                #expect(try Self.readOverlay(overlay, lo..<hi, point) == Array(model[Int(lo)..<Int(hi)]), "after op \(i): a read of \(lo)..<\(hi)")
            }
            let runs = try overlay.runs(0, UInt64(blocks))
            #expect(Self.blockStates(runs, count: blocks) == map, "after op \(i): the map")
            #expect(zip(runs, runs.dropFirst()).allSatisfy { pair in pair.0.2 != pair.1.2 }, "after op \(i): runs of one state not merged")
        }
        try overlay.sync()
        let expectedEdges: [Overlay.State] = [.zero, .data, .zero, .zero, .zero, .point]
        #expect([map[20], map[21], map[22], map[0], map[63], map[30]] == expectedEdges)

        // The mirror is untouched.
        for k in checkpoints {
            #expect(try readAll(m, at: .seq(k)) == states[k], "seq:\(k) after the overlay's writes")
        }
        #expect(try Self.readRange(reader, 0..<size) == states[at])

        // restore --overlay: the point with the writes (once the writer has let the file go).
        overlay.close()
        let report = try m.restore(at: .seq(at), to: dir.file("tested.img"), overlay: path)
        #expect(report.seq == at)
        #expect(firstDifference(fileBytes(dir.file("tested.img")), model) == nil, "restore --overlay differs from the model")
        try m.restore(at: .seq(at), to: dir.file("plain.img"))
        #expect(fileBytes(dir.file("plain.img")) == states[at])
        let plain = try BlockFile(path: dir.file("plain.img"), mode: .readWrite)
        #expect(try overlay.apply(to: plain, progress: nil) == UInt64(map.filter { $0 != .point }.count))
        #expect(firstDifference(fileBytes(dir.file("plain.img")), model) == nil, "Overlay.apply differs from the model")

        // Reopened: the same bytes and map.
        let again = try Overlay(path: path, mirror: m, seq: at, create: false)
        #expect(try Self.readOverlay(again, 0..<size, point) == model)
        let reopenedRuns = try again.runs(0, UInt64(blocks))
        #expect(Self.blockStates(reopenedRuns, count: blocks) == map)

        // Refused: another seq (also through restore, which then leaves no file), another mirror.
        expectFailure("\(path) is an overlay of seq:\(at), not of seq:10: give --at seq:\(at), or a new file") {
            _ = try Overlay(path: path, mirror: m, seq: 10)
        }
        expectFailure("\(path) is an overlay of seq:\(at), not of seq:10: give --at seq:\(at), or a new file") {
            try m.restore(at: .seq(10), to: dir.file("r10.img"), overlay: path)
        }
        #expect(access(dir.file("r10.img"), F_OK) != 0, "a refused restore left its target")
        let other = try Mirror.create(at: dir.file("other"), size: size, blockSize: bs)
        expectFailure("\(path) is an overlay of the mirror \(formatUUID(m.uuid)), not of \(other.path) (\(formatUUID(other.uuid)))") {
            _ = try Overlay(path: path, mirror: other, seq: at)
        }
        // Not an overlay: text, an empty file.
        let text = dir.file("notes.txt")
        #expect(FileManager.default.createFile(atPath: text, contents: Data(repeating: UInt8(ascii: "x"), count: 5000)))
        expectFailure("\(text) is not a rewind overlay (give a new file's path to create one)") {
            _ = try Overlay(path: text, mirror: m, seq: at)
        }
        let empty = dir.file("empty")
        #expect(FileManager.default.createFile(atPath: empty, contents: Data()))
        expectFailure("\(empty) is not a rewind overlay (give a new file's path to create one)") {
            _ = try Overlay(path: empty, mirror: m, seq: at, create: true)
        }
        #expect(fileBytes(text).count == 5000 && fileBytes(empty).isEmpty, "a refused file was changed")
        // A damaged header; a header alone (truncated); no file.
        var header = Array(fileBytes(path)[0..<4096])
        header[100] ^= 0xFF
        let damaged = dir.file("damaged.overlay")
        #expect(FileManager.default.createFile(atPath: damaged, contents: Data(header)))
        expectFailure("\(damaged): the overlay's header is damaged (checksum mismatch)") {
            _ = try Overlay(path: damaged, mirror: m, seq: at)
        }
        let short = dir.file("short.overlay")
        #expect(FileManager.default.createFile(atPath: short, contents: Data(fileBytes(path)[0..<4096])))
        expectFailure("\(short): the overlay is shorter than its volume (truncated)") {
            _ = try Overlay(path: short, mirror: m, seq: at)
        }
        let missing = dir.file("missing.overlay")
        expectFailure("no overlay at \(missing)") { _ = try Overlay(path: missing, mirror: m, seq: at, create: false) }
        expectFailure("no overlay at \(missing)") { try m.restore(at: .seq(at), to: dir.file("r.img"), overlay: missing) }
        #expect(access(missing, F_OK) != 0)
    }

    // MARK: 4. pins

    /// Invariant: a pin is seen (`livePins`, `status`) with its seq, holder and pid until it
    /// is released (or its holder dies), and its file is named `SEQ-PID-RANDOM.pin`; a pin
    /// file whose lock is free (a dead holder) is removed by the next `livePins` and holds
    /// nothing back; compaction past a live pin is refused with the pin named, retention stops
    /// at it, and a rollback that would cut a pinned point away is refused while one to a
    /// point at or after every pin goes through.
    @Test func pinsAreSeenReleasedAndHonoured() throws {
        let dir = TempDir("pins")
        defer { dir.remove() }
        let bs = Self.bs
        let size = UInt64(64 * bs)
        let m = try Mirror.create(at: dir.file("m"), size: size, blockSize: bs)
        #expect(try m.livePins().isEmpty)  // no pins/ yet
        var model = [UInt8](repeating: 0, count: Int(size))
        var states = [model]
        for i in 1...12 {
            let c = Change.write(UInt64(i % 8) * UInt64(bs) + UInt64(i), ServePipelineTests.pattern(bs, seed: i))
            try m.append([c])
            Self.apply(c, to: &model)
            states.append(model)
        }
        let me = getpid()
        let t0 = wallClockNanoseconds()
        let a = try m.pin(.seq(5), holder: "export a@seq:5")
        let b = try m.pin(.seq(8), holder: "export b@seq:8")
        let t1 = wallClockNanoseconds()
        #expect(a.seq == 5 && b.seq == 8)
        #expect(a.path.hasPrefix(m.path + "/pins/"))
        let name = String(a.path.split(separator: "/").last ?? "")
        let parts = name.dropLast(4).split(separator: "-")
        #expect(name.hasSuffix(".pin") && parts.count == 3, "pin file \(name)")
        if parts.count == 3 {
            #expect(String(parts[0]) == "00000000000000000005" && String(parts[1]) == "\(me)")
            #expect(parts[2].count == 8 && parts[2].allSatisfy { $0.isHexDigit })
        }
        var pins = try m.livePins()
        #expect(pins.map(\.seq) == [5, 8])
        #expect(pins.map(\.holder) == ["export a@seq:5", "export b@seq:8"])
        #expect(pins.allSatisfy { $0.pid == me && $0.since >= t0 && $0.since <= t1 })
        #expect(try m.status().pins.map(\.holder) == ["export a@seq:5", "export b@seq:8"])

        // A dead holder's pin: named like the real ones, its lock free. Removed, not counted.
        let stale = m.path + "/pins/00000000000000000002-999999-0badf00d.pin"
        let body = Data(#"{"seq":2,"pid":999999,"since":1,"holder":"export dead"}"#.utf8)
        #expect(FileManager.default.createFile(atPath: stale, contents: body))
        pins = try m.livePins()
        #expect(pins.map(\.seq) == [5, 8])
        #expect(access(stale, F_OK) != 0, "the dead holder's pin file is still there")

        // Compaction past the oldest pin is refused; retention stops at it.
        expectFailure("seq:6 is after seq:5, a point in use by export a@seq:5 (pid \(me)); stop it, or compact to seq:5 at most") {
            _ = try m.compact(to: .seq(6))
        }
        #expect(try m.meta().target == 0 && m.meta().horizon == 0)
        #expect(try m.retentionHeldBy(keepAgeNanoseconds: nil, keepBytes: 0) == pins.first)
        let held = try #require(try m.compact(keepAgeNanoseconds: nil, keepBytes: 0))
        #expect(held.fromHorizon == 0 && held.toHorizon == 5)
        #expect(try m.compact(keepAgeNanoseconds: nil, keepBytes: 0)?.toHorizon == nil)
        #expect(try readAll(m, at: .seq(5)) == states[5])

        // Released: gone (twice is harmless), and its point no longer holds anything back.
        a.release()
        a.release()
        #expect(access(a.path, F_OK) != 0)
        #expect(try m.livePins().map(\.seq) == [8])
        #expect(FileManager.default.createFile(atPath: m.path + "/pins/00000000000000000006-999998-00c0ffee.pin", contents: body))
        let r = try m.compact(to: .seq(8))
        #expect(r.fromHorizon == 5 && r.toHorizon == 8)
        #expect(try m.livePins().map(\.seq) == [8])
        expectFailure("seq:7 is before the oldest restorable point seq:8 (compacted into the base)") {
            _ = try m.pin(.seq(7), holder: "too late")
        }
        // A reader's pin goes with the reader.
        do {
            let scoped = try PointReader(mirror: m, point: .seq(10), holder: "scoped")
            #expect(try m.livePins().map(\.holder) == ["export b@seq:8", "scoped"])
            withExtendedLifetime(scoped) {}
        }
        #expect(try m.livePins().map(\.holder) == ["export b@seq:8"])

        // Rollback: refused past a pin, nothing recorded and the source untouched; allowed
        // to a point at or after every pin.
        let source = dir.file("source.img")
        try writeFile(source, states[12])
        let c = try m.pin(.seq(11), holder: "export c@seq:11")
        expectFailure("seq:11 is in use by export c@seq:11 (pid \(me)), and a rollback to seq:9 removes it; stop that export first") {
            _ = try m.rollback(to: .seq(9), source: source)
        }
        #expect(try m.meta().lastSeq == 12 && m.meta().pendingRollback == MirrorMeta.none)
        #expect(fileBytes(source) == states[12])
        c.release()
        let rolled = try m.rollback(to: .seq(9), source: source)
        #expect(rolled.fromSeq == 12 && rolled.toSeq == 9 && rolled.recordsRemoved == 3)
        #expect(fileBytes(source) == states[9])
        #expect(try readAll(m, at: .seq(8)) == states[8])
        #expect(try readAll(m, at: .latest) == states[9])
        b.release()
        #expect(try m.livePins().isEmpty)
        #expect(try m.status().pins.isEmpty)
    }

    // MARK: 5. the control socket

    /// Invariant: `askDurable` returns the server's `ok FLUSHED APPENDED` reply as a
    /// `DurablePoint` (one request per connection, the request line "durable"); nil when
    /// nobody serves the mirror — no socket, or a socket a dead server left; an `error`
    /// reply or a malformed one is an error with the exact message, never a crash; a new
    /// server binds over a dead one's socket.
    @Test func theControlSocketAnswersDurableAndFailsCleanly() throws {
        let dir = TempDir("control")
        defer { dir.remove() }
        let m = try Mirror.create(at: dir.file("m"), size: 1 << 20)
        let socketPath = m.path + "/control.sock"
        #expect(try ControlSocket.askDurable(m, timeoutSeconds: 5) == nil, "no server")

        let reply = Locked("ok 41 57")
        let requests = Locked<[String]>([])
        let server = try ControlServer(mirror: m) { line in
            requests.withLock { $0.append(line) }
            return reply.current
        }
        defer { server.stop() }
        #expect(access(socketPath, F_OK) == 0)
        #expect(try ControlSocket.askDurable(m, timeoutSeconds: 5) == ControlSocket.DurablePoint(flushed: 41, appended: 57))
        #expect(try ControlSocket.askDurable(m, timeoutSeconds: 5) == ControlSocket.DurablePoint(flushed: 41, appended: 57))
        let wrong: [(reply: String, message: String)] = [
            ("error the volume is fenced", "the server of \(m.path): the volume is fenced"),
            ("garbage", "the server of \(m.path) gave no durable point (answer \"garbage\")"),
            ("ok 41", "the server of \(m.path) gave no durable point (answer \"ok 41\")"),
            ("ok -1 2", "the server of \(m.path) gave no durable point (answer \"ok -1 2\")"),
            ("ok 1 2 3", "the server of \(m.path) gave no durable point (answer \"ok 1 2 3\")"),
            ("", "the server of \(m.path) gave no durable point (no answer)"),
            (String(repeating: "z", count: 100), "the server of \(m.path) gave no durable point (answer \"\(String(repeating: "z", count: 80))\")"),
        ]
        for w in wrong {
            reply.withLock { $0 = w.reply }
            expectFailure(w.message) { _ = try ControlSocket.askDurable(m, timeoutSeconds: 5) }
        }
        #expect(requests.current == [String](repeating: "durable", count: 2 + wrong.count))
        server.stop()
        #expect(access(socketPath, F_OK) != 0, "stop() left the socket")
        #expect(try ControlSocket.askDurable(m, timeoutSeconds: 5) == nil, "after stop()")

        // A dead server's socket: bound, nobody listening.
        let (address, length) = ControlSocket.address(for: m)
        var addr = address
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        try #require(fd >= 0)
        let bound = withUnsafePointer(to: &addr) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.bind(fd, $0, length) }
        }
        #expect(bound == 0)
        _ = Glibc.close(fd)
        #expect(access(socketPath, F_OK) == 0)
        #expect(try ControlSocket.askDurable(m, timeoutSeconds: 5) == nil, "a dead server's socket")
        let next = try ControlServer(mirror: m) { _ in "ok 7 9" }
        defer { next.stop() }
        #expect(try ControlSocket.askDurable(m, timeoutSeconds: 5) == ControlSocket.DurablePoint(flushed: 7, appended: 9))
    }

    // MARK: - helpers

    /// `blocks` blocks: in the first half a pattern without zero bytes, except every third
    /// block, which is a hole; the second half zeros (holes in base.img).
    static func initialImage(blocks: Int) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: blocks * bs)
        for b in 0..<blocks / 2 where b % 3 != 0 {
            for i in b * bs..<(b + 1) * bs { bytes[i] = UInt8(truncatingIfNeeded: i &* 13 &+ 5) | 1 }
        }
        return bytes
    }

    static func apply(_ c: Change, to bytes: inout [UInt8]) {
        let o = Int(c.offset)
        switch c.kind {
        case .write: bytes.replaceSubrange(o..<o + c.data.count, with: c.data)
        case .zero, .trim: bytes.replaceSubrange(o..<o + Int(c.length), with: repeatElement(0, count: Int(c.length)))
        case .flush, .catchUp: break
        }
    }

    /// The volume after changes 1...k (change i is seq i) for each k in `seqs`.
    static func states(_ initial: [UInt8], _ changes: [Change], at seqs: [UInt64]) -> [UInt64: [UInt8]] {
        var bytes = initial
        var done = 0
        var out: [UInt64: [UInt8]] = [:]
        for k in Set(seqs).sorted() {
            while done < Int(k) {
                apply(changes[done], to: &bytes)
                done += 1
            }
            out[k] = bytes
        }
        return out
    }

    static func readRange(_ reader: PointReader, _ range: Range<UInt64>) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0xEE, count: range.count)
        try bytes.withUnsafeMutableBytes { try reader.read(at: range.lowerBound, into: $0) }
        return bytes
    }

    static func readOverlay(_ overlay: Overlay, _ range: Range<UInt64>,
                            _ point: (UInt64, UnsafeMutableRawBufferPointer) throws -> Void) throws -> [UInt8] {
        var bytes = [UInt8](repeating: 0xEE, count: range.count)
        try bytes.withUnsafeMutableBytes { try overlay.read(at: range.lowerBound, into: $0, point: point) }
        return bytes
    }

    /// An overlay's runs as one state per block (empty if they are not contiguous from 0).
    static func blockStates(_ runs: [(UInt64, UInt64, Overlay.State)], count: Int) -> [Overlay.State] {
        var out: [Overlay.State] = []
        for (first, n, state) in runs {
            guard first == UInt64(out.count) else { return [] }
            out += repeatElement(state, count: Int(n))
        }
        return out.count == count ? out : []
    }

    /// What a reader gets wrong: a read of the whole volume, then `samples` random ranges
    /// of up to 3 blocks, against `want`.
    static func readProblems(_ reader: PointReader, _ want: [UInt8], seed: UInt64, samples: Int) -> [String] {
        var out: [String] = []
        do {
            let all = try readRange(reader, 0..<UInt64(want.count))
            if let d = firstDifference(all, want) { out.append("seq:\(reader.seq): a read of the whole volume differs at byte \(d)") }
            var rng = SplitMix(seed: seed)
            for _ in 0..<samples {
                let lo = UInt64.random(in: 0..<UInt64(want.count), using: &rng)
                let hi = min(UInt64(want.count), lo + UInt64.random(in: 1...UInt64(3 * bs), using: &rng))
                let got = try readRange(reader, lo..<hi)
                if let d = firstDifference(got, Array(want[Int(lo)..<Int(hi)])) {
                    out.append("seq:\(reader.seq): a read of \(lo)..<\(hi) differs at byte \(lo + UInt64(d))")
                }
                // The large-read path: the same bytes, and every hole it names zero in the model.
                var found = [UInt8](repeating: 0xEE, count: Int(hi - lo))
                let holes = try found.withUnsafeMutableBytes { try reader.readFindingHoles(at: lo, into: $0) }
                if let d = firstDifference(found, Array(want[Int(lo)..<Int(hi)])) {
                    out.append("seq:\(reader.seq): readFindingHoles of \(lo)..<\(hi) differs at byte \(lo + UInt64(d))")
                }
                for h in holes where !(lo..<hi).contains(h.lowerBound) || h.upperBound > hi || want[Int(h.lowerBound)..<Int(h.upperBound)].contains(where: { $0 != 0 }) {
                    out.append("seq:\(reader.seq): readFindingHoles of \(lo)..<\(hi) names \(h) a hole, which holds data")
                }
            }
        } catch {
            out.append("seq:\(reader.seq): \(error)")
        }
        return out
    }

    /// What a reader's allocation of `range` gets wrong: pieces not in order or not covering
    /// the range, or a `.hole`/`.zero` piece over a byte `want` holds non-zero.
    static func allocationProblems(_ reader: PointReader, _ want: [UInt8], _ range: Range<UInt64>) -> [String] {
        let pieces: [(Range<UInt64>, PointReader.Allocation)]
        do {
            pieces = try reader.allocation(range, limit: Int.max)
        } catch {
            return ["seq:\(reader.seq): allocation of \(range): \(error)"]
        }
        var out: [String] = []
        var at = range.lowerBound
        for (r, kind) in pieces {
            guard r.lowerBound == at, !r.isEmpty else {
                out.append("seq:\(reader.seq): allocation of \(range): piece \(r) where \(at) was due")
                return out
            }
            if kind != .data, let i = want[Int(r.lowerBound)..<Int(r.upperBound)].firstIndex(where: { $0 != 0 }) {
                out.append("seq:\(reader.seq): allocation of \(range): \(kind) piece \(r) holds a non-zero byte at \(i)")
            }
            at = r.upperBound
        }
        if at != range.upperBound { out.append("seq:\(reader.seq): allocation of \(range) ends at \(at)") }
        return out
    }
}
