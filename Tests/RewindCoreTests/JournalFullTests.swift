import Foundation
import Glibc
import Synchronization
import Testing
@testable import RewindCore

/// A full journal (`--on-full`). With `compact`, the default, a write the log's file system
/// refuses with ENOSPC is journalled after the oldest history is folded into the base: the
/// request succeeds, the oldest point moves, nothing is fenced, every point kept reads back.
/// With `fail`, the volume is fenced: that request gets ENOSPC, every later one EIO.
@Suite struct JournalFullTests {
    @Test(arguments: ServePipeline.FullPolicy.allCases)
    func aFullJournal(_ policy: ServePipeline.FullPolicy) throws {
        let dir = TempDir("full-\(policy.rawValue)")
        defer { dir.remove() }
        let bs = 4096
        let sourcePath = dir.file("source.img"), mirrorPath = dir.file("m")
        var model = halfFilledVolume(blockSize: bs, mul: 3, add: 7)
        try BlockFile(path: sourcePath, mode: .createNew).write(at: 0, model)
        let mirror = try Mirror.create(at: mirrorPath, from: sourcePath, blockSize: bs)
        let source = try BlockFile(path: sourcePath, mode: .readWrite)
        let storage = PowerCutStorage(root: dir.path)
        Storage.install(storage)
        defer { Storage.remove(storage) }
        var tuning = ServePipeline.Tuning()
        tuning.commitIntervalNanoseconds = 200_000
        let observer = ServePipelineTests.Recorder()
        let pipeline = ServePipeline(mirror: mirror, source: source, sourceSyncedSeq: try mirror.meta().lastSeq,
                                     tuning: tuning, onFull: policy, observer: observer)
        pipeline.start()
        let answers = Mutex<[Int: VolumeOp.Failure?]>([:])
        func submit(_ i: Int, _ kind: VolumeOp.Kind, at offset: UInt64, fua: Bool = false) {
            pipeline.submit(VolumeOp(kind, offset: offset, fua: fua) { f in answers.withLock { $0[i] = .some(f) } })
        }
        func answer(_ i: Int) -> VolumeOp.Failure?? {
            for _ in 0..<10_000 {
                if let a = answers.withLock({ $0[i] }) { return a }
                usleep(1000)
            }
            return nil
        }
        // History: 40 FUA writes, each its own record.
        for i in 0..<40 {
            let data = [UInt8](repeating: UInt8(i + 1), count: bs)
            submit(i, .write(data), at: UInt64(i % 8 * bs), fua: true)
            #expect(answer(i) == .some(nil), "history write \(i)")
            model.replaceSubrange(i % 8 * bs..<(i % 8 + 1) * bs, with: data)
        }
        let before = try mirror.meta()
        // The log's file system refuses the next write.
        storage.fail("pwrite", pathContaining: "/log/", errno: ENOSPC)
        let full = [UInt8](repeating: 0xEE, count: bs)
        submit(100, .write(full), at: UInt64(20 * bs), fua: true)
        let got = answer(100)
        switch policy {
        case .compact:
            #expect(got == .some(nil), "the write that found the journal full: \(String(describing: got))")
            model.replaceSubrange(20 * bs..<21 * bs, with: full)
            #expect(pipeline.fenceReason == nil)
            let room = try #require(observer.madeRoomReports.first, "no compaction made room")
            #expect(observer.madeRoomReports.count == 1)
            #expect(room.fromHorizon == before.horizon && room.toHorizon > before.horizon, "\(room)")
            submit(101, .flush, at: 0)
            #expect(answer(101) == .some(nil))
        case .fail:
            #expect(got == .some(.noSpace), "the write that found the journal full: \(String(describing: got))")
            #expect(pipeline.fenceReason?.contains("ENOSPC") == true, "\(pipeline.fenceReason ?? "not fenced")")
            #expect(observer.madeRoomReports.isEmpty)
            submit(101, .flush, at: 0)
            #expect(answer(101) == .some(.io))
        }
        #expect(storage.injectedFailures["pwrite"] == 1)
        pipeline.stop()
        let after = try mirror.meta()
        if policy == .compact {
            #expect(after.horizon > before.horizon)
            #expect(after.lastSeq == 42)  // 40 writes, the one that found the journal full, the FLUSH
            #expect(firstDifference(try readAll(mirror, at: .latest), model) == nil)
            #expect(firstDifference(fileBytes(sourcePath), model) == nil)
        }
        _ = try mirror.verify()
    }
}
