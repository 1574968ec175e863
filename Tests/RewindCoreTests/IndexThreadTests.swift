import Foundation
import Testing
import RewindWorkload
@testable import RewindCore

/// The serve path's journal: the index built and committed on its own thread
/// (`JournalWriter.indexOnThread`), partial blocks merged with the volume's content rather
/// than the index. Invariants 1 and 3 against the model, with commits at random moments and
/// compactions in between; and an index given up leaves every record to the log's replay.
@Suite struct IndexThreadTests {
    /// The served volume as the writer sees it: every earlier append already applied.
    final class Volume: @unchecked Sendable {
        var model: VolumeModel
        init(_ bytes: [UInt8]) { model = VolumeModel(bytes: bytes) }
        func read(_ offset: UInt64, into dst: UnsafeMutableRawBufferPointer) {
            model.bytes.withUnsafeBytes { dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[Int(offset)..<Int(offset) + dst.count])) }
        }
    }

    static func pipelined(_ mirror: Mirror, _ volume: Volume, maxBlocks: Int, failures: Failures) -> JournalWriter {
        let w = JournalWriter(mirror: mirror)
        w.indexOnThread(policy: .init(intervalNanoseconds: 2_000_000, maxChanges: 50, maxBlocks: maxBlocks),
                        onFailure: { failures.add($0) }, readVolume: { volume.read($0, into: $1) })
        return w
    }

    final class Failures: @unchecked Sendable {
        private let lock = NSLock()
        private var errors: [String] = []
        func add(_ e: Error) { lock.withLock { errors.append("\(e)") } }
        var all: [String] { lock.withLock { errors } }
    }

    @Test(arguments: [(UInt64(11), 512), (UInt64(12), 4096)])
    func randomWorkloadMatchesModelAtEveryCheckedPoint(seed: UInt64, blockSize: Int) throws {
        let dir = TempDir("indexthread")
        defer { dir.remove() }
        var rng = SplitMix(seed: seed)
        let size = UInt64(blockSize * 64)
        let initial = halfFilledVolume(blockSize: blockSize, mul: 13, add: 5)
        try writeFile(dir.file("seed.img"), initial)
        let mirror = try Mirror.create(at: dir.file("m"), from: dir.file("seed.img"), blockSize: blockSize)
        let volume = Volume(initial)
        let failures = Failures()
        var states: [UInt64: [UInt8]] = [0: initial]
        var seq: UInt64 = 0
        var horizon: UInt64 = 0
        var compactions = 0
        do {
            let writer = Self.pipelined(mirror, volume, maxBlocks: 40, failures: failures)
            for round in 0..<400 {
                let batch = (0..<Int.random(in: 1...12, using: &rng)).map { _ in randomChange(&rng, size: size, blockSize: blockSize) }
                let seqs = try writer.append(batch, sourceSynced: seq)
                #expect(seqs == seq + 1...seq + UInt64(batch.count))
                for c in batch {
                    volume.model.apply(c)
                    seq += 1
                    if Int.random(in: 0..<6, using: &rng) == 0 { states[seq] = volume.model.bytes }
                }
                states[seq] = volume.model.bytes
                switch Int.random(in: 0..<10, using: &rng) {
                case 0: try writer.commit()
                case 1: writer.requestCommit()
                default: break
                }
                if round % 45 == 44 {
                    // Compaction beside the index thread, to a committed point.
                    let committed = try mirror.meta().lastSeq
                    guard committed > horizon else { continue }
                    let target = UInt64.random(in: horizon + 1...committed, using: &rng)
                    #expect(try mirror.compact(to: .seq(target)).toHorizon == target)
                    horizon = target
                    compactions += 1
                }
            }
            try writer.commit()
            #expect(!writer.commitOwed)
        }
        #expect(failures.all.isEmpty)
        #expect(compactions >= 5)
        let meta = try mirror.meta()
        #expect(meta.lastSeq == seq)
        #expect(meta.sourceSyncedSeq > 0 && meta.sourceSyncedSeq < seq)
        var checked = 0
        for (k, expected) in states.sorted(by: { $0.key < $1.key }) where k >= horizon {
            let got = try readAll(mirror, at: .seq(k))
            #expect(firstDifference(got, expected) == nil, "seq:\(k) differs at \(firstDifference(got, expected) ?? -1)")
            checked += 1
        }
        #expect(checked > 150)
        #expect(try mirror.verify().records == seq - horizon)
    }

    /// A batch larger than the index queue's room, sent while the index thread sleeps on a
    /// short queue (it is woken per pile, not per batch), wakes it rather than waiting for
    /// ever: the deadlock a guest's mke2fs found (one small write, then one large).
    @Test func aLargeBatchWakesASleepingIndexThread() throws {
        let dir = TempDir("indexthread-wake")
        defer { dir.remove() }
        let bs = 4096, size = UInt64(256 * 4096)
        let mirror = try Mirror.create(at: dir.file("m"), size: size, blockSize: bs)  // one block entry per 4 KiB
        let volume = Volume([UInt8](repeating: 0, count: Int(size)))
        let failures = Failures()
        let writer = JournalWriter(mirror: mirror)
        // Woken at 2 queued block entries (maxBlocks / 16); room for 64 (2 × maxBlocks); a
        // transaction open for at most a minute, so only a wake-up gets the thread going.
        writer.indexOnThread(policy: .init(intervalNanoseconds: 60_000_000_000, maxChanges: 1 << 20, maxBlocks: 32),
                             onFailure: { failures.add($0) }, readVolume: { volume.read($0, into: $1) })
        _ = try writer.append([.write(0, [UInt8](repeating: 7, count: bs))])
        let large = [UInt8](repeating: 9, count: 100 * bs)
        let done = Failures()  // set from the appending thread once the large append returns
        nonisolated(unsafe) let appender = writer  // used by that thread alone until `done`
        let t = Thread { do { _ = try appender.append([.write(UInt64(bs), large)]); done.add(RewindError.invalidArgument("done")) } catch { done.add(error) } }
        t.start()
        var waited = 0
        while done.all.isEmpty && waited < 200 { usleep(50_000); waited += 1 }
        #expect(done.all == ["\(RewindError.invalidArgument("done"))"], "the large append never returned: the index thread slept")
        guard !done.all.isEmpty else { return }  // leave the stuck writer rather than hang the run
        try writer.commit()
        volume.model.apply(.write(0, [UInt8](repeating: 7, count: bs)))
        volume.model.apply(.write(UInt64(bs), large))
        #expect(firstDifference(try readAll(mirror, at: .latest), volume.model.bytes) == nil)
        #expect(failures.all.isEmpty)
    }

    @Test func anIndexGivenUpRefusesAppendsAndTheLogBringsItsRecordsBack() throws {
        let dir = TempDir("indexgivenup")
        defer { dir.remove() }
        let bs = 4096, size = UInt64(64 * 4096)
        let path = dir.file("m")
        var expected: [UInt8] = []
        do {
            let mirror = try Mirror.create(at: path, size: size)
            let volume = Volume([UInt8](repeating: 0, count: Int(size)))
            let failures = Failures()
            let writer = Self.pipelined(mirror, volume, maxBlocks: 1 << 20, failures: failures)
            var rng = SplitMix(seed: 5)
            for _ in 0..<30 {
                let batch = (0..<4).map { _ in randomChange(&rng, size: size, blockSize: bs) }
                _ = try writer.append(batch)
                for c in batch { volume.model.apply(c) }
            }
            try writer.syncLog()
            writer.abort(keepLog: true)  // the index thread gives up whatever it had not committed
            #expect(throws: RewindError.self) { _ = try writer.append([.write(0, [1, 2, 3])]) }
            #expect(failures.all.isEmpty)
            expected = volume.model.bytes
        }
        let reopened = try Mirror.open(at: path)
        #expect(try reopened.meta().lastSeq == 120)
        #expect(firstDifference(try readAll(reopened, at: .latest), expected) == nil)
        _ = try reopened.verify()
    }
}
