import Foundation
import Testing
@testable import RewindCore

/// Invariant 4 and crash safety of append, compaction and rollback: a child process
/// (`rewind-torture`) appending, syncing, compacting and rolling back is killed with SIGKILL
/// at random instants. After each kill the mirror must open, finish any interrupted work,
/// hold every synced record, pass `verify`, and read back exactly at every restorable point.
@Suite struct CrashTests {
    static var runs: Int { Int(ProcessInfo.processInfo.environment["REWIND_CRASH_RUNS"] ?? "") ?? 160 }

    static var tortureBinary: String {
        let dir = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().path
        for candidate in [dir + "/rewind-torture", dir + "/../rewind-torture", dir + "/../../rewind-torture"]
        where FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
        return FileManager.default.currentDirectoryPath + "/.build/debug/rewind-torture"
    }

    @Test(arguments: [(UInt64(11), 512), (UInt64(12), 4096)])
    func sigkillAtRandomInstantsLosesNothingSynced(seed: UInt64, blockSize: Int) throws {
        let dir = TempDir("crash")
        defer { dir.remove() }
        let size = UInt64(blockSize * 48)
        let path = dir.file("m")
        _ = try Mirror.create(at: path, size: size, blockSize: blockSize)
        var rng = SplitMix(seed: seed)
        var durable: UInt64 = 0
        var kills = 0, pointsChecked = 0, interruptedCompactions = 0, interruptedRollbacks = 0
        for _ in 0..<(Self.runs / 2) {
            let child = Process()
            child.executableURL = URL(fileURLWithPath: Self.tortureBinary)
            child.arguments = [path, String(seed)]
            let out = Pipe()
            child.standardOutput = out
            try child.run()
            usleep(UInt32.random(in: 5_000...150_000, using: &rng))
            kill(child.processIdentifier, SIGKILL)
            child.waitUntilExit()
            #expect(child.terminationReason == .uncaughtSignal, "the child stopped by itself: \(child.terminationStatus)")
            kills += 1
            let lines = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self).split(separator: "\n")
            for line in lines {
                let parts = line.split(separator: " ")
                guard parts.count == 2, let n = UInt64(parts[1]) else { continue }
                durable = parts[0] == "synced" ? n : min(durable, n)
            }
            // Reopen as a user would: finish interrupted work, then check everything.
            if let before = try? Mirror.open(at: path).status() {
                if before.compactionPending != nil { interruptedCompactions += 1 }
                if before.rollbackPending != nil { interruptedRollbacks += 1 }
            }
            let m = try Mirror.open(at: path, recover: true)
            if let pending = try m.status().rollbackPending {
                durable = min(durable, pending)
                _ = try m.rollback(to: .seq(pending), source: nil)
            }
            let meta = try m.meta()
            #expect(meta.lastSeq >= durable, "synced seq:\(durable) lost; journal ends at seq:\(meta.lastSeq)")
            _ = try m.verify()
            var points = [meta.horizon, meta.lastSeq]
            for _ in 0..<3 { points.append(UInt64.random(in: meta.horizon...meta.lastSeq, using: &rng)) }
            let states = streamStates(seed: seed, points: points, size: size, blockSize: blockSize)
            for k in Set(points) {
                let got = try readAll(m, at: .seq(k))
                #expect(firstDifference(got, states[k]!) == nil, "seq:\(k) differs after kill \(kills)")
                pointsChecked += 1
            }
            durable = meta.lastSeq  // everything present now has survived a reopen
            try m.sync()
        }
        print("crash test seed \(seed): \(kills) kills, \(pointsChecked) points checked, killed inside \(interruptedCompactions) compactions and \(interruptedRollbacks) rollbacks")
        #expect(kills == Self.runs / 2)
        #expect(pointsChecked >= kills * 2)
    }
}

/// Serve's real pipeline (writer, applier, index thread, retention passes) SIGKILLed at random
/// instants (`rewind-torture pipeline`): each restart, as serve's (`Mirror.open(recover:)`,
/// `bringSourceUpToDate`), holds every request whose FLUSH or FUA was answered, reads back
/// exactly the change stream at its latest point, and leaves the source equal to it.
@Suite struct PipelineCrashTests {
    @Test(arguments: [(UInt64(31), 512), (UInt64(32), 4096)])
    func sigkillOfServesPipelineLosesNothingFlushed(seed: UInt64, blockSize: Int) throws {
        let dir = TempDir("pipecrash")
        defer { dir.remove() }
        let size = UInt64(blockSize * 48)
        let path = dir.file("m"), source = dir.file("source.img")
        try BlockFile(path: source, mode: .createNew).truncate(to: size)
        _ = try Mirror.create(at: path, from: source, blockSize: blockSize)
        var rng = SplitMix(seed: seed)
        var durable: UInt64 = 0
        var kills = 0
        for _ in 0..<(CrashTests.runs / 2) {
            let child = Process()
            child.executableURL = URL(fileURLWithPath: CrashTests.tortureBinary)
            child.arguments = ["pipeline", path, source, String(seed)]
            let out = Pipe()
            child.standardOutput = out
            try child.run()
            usleep(UInt32.random(in: 5_000...150_000, using: &rng))
            kill(child.processIdentifier, SIGKILL)
            child.waitUntilExit()
            #expect(child.terminationReason == .uncaughtSignal, "the child stopped by itself: \(child.terminationStatus)")
            kills += 1
            for line in String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self).split(separator: "\n") {
                let parts = line.split(separator: " ")
                if parts.count == 2, parts[0] == "synced", let n = UInt64(parts[1]) { durable = max(durable, n) }
            }
            let m = try Mirror.open(at: path, recover: true)
            _ = try m.bringSourceUpToDate(try BlockFile(path: source, mode: .readWrite))
            let meta = try m.meta()
            #expect(meta.lastSeq >= durable, "kill \(kills): seq:\(durable) was FLUSHed; the journal ends at seq:\(meta.lastSeq)")
            _ = try m.verify()
            let state = streamStates(seed: seed, points: [meta.lastSeq], size: size, blockSize: blockSize)[meta.lastSeq]!
            let latest = try readAll(m, at: .latest)
            try #require(firstDifference(latest, state) == nil, "kill \(kills): the latest point seq:\(meta.lastSeq) differs from the stream at \(firstDifference(latest, state) ?? -1)")
            try #require(firstDifference(fileBytes(source), state) == nil, "kill \(kills): the source differs from the latest point")
            durable = meta.lastSeq  // everything present now survived a restart
        }
        print("pipeline crash test seed \(seed): \(kills) kills, journal at seq:\(durable)")
    }
}

/// Crash at each named step of compaction and rollback (fault injection, `REWIND_CRASH_AT`):
/// reopening finishes the compaction, re-running the rollback finishes it, and every point
/// from the horizon on reads back exactly; the source ends exactly at the rollback point.
@Suite struct CrashPointTests {
    @Test(arguments: CrashPoint.names)
    func crashInsideCompactionOrRollbackRecovers(point: String) throws {
        let dir = TempDir("point")
        defer { dir.remove() }
        let seed: UInt64 = 21, count: UInt64 = 400, bs = 512
        let size = UInt64(bs * 64)
        let path = dir.file("m"), source = dir.file("source.img")
        _ = try Mirror.create(at: path, size: size, blockSize: bs)
        let child = Process()
        child.executableURL = URL(fileURLWithPath: CrashTests.tortureBinary)
        child.arguments = ["compact-then-rollback", path, String(seed), String(count), source]
        child.environment = ["REWIND_CRASH_AT": point]
        try child.run()
        child.waitUntilExit()
        #expect(child.terminationReason == .uncaughtSignal, "\(point) was never reached")
        let m = try Mirror.open(at: path, recover: true)
        #expect(try m.status().compactionPending == nil)
        let rollbackTarget = count * 3 / 4
        if point.hasPrefix("rollback") {
            #expect(try m.status().rollbackPending == rollbackTarget)
            #expect(throws: RewindError.self) { _ = try m.append([.flush]) }  // writers wait for the rollback
            _ = try m.rollback(to: .seq(rollbackTarget), source: source)
        }
        let meta = try m.meta()
        #expect(meta.horizon == count / 2)
        #expect(meta.lastSeq == (point.hasPrefix("rollback") ? rollbackTarget : count))
        _ = try m.verify()
        let points = [meta.horizon, (meta.horizon + meta.lastSeq) / 2, meta.lastSeq]
        let states = streamStates(seed: seed, points: points, size: size, blockSize: bs)
        for k in points {
            #expect(firstDifference(try readAll(m, at: .seq(k)), states[k]!) == nil, "seq:\(k) after a crash at \(point)")
        }
        if point.hasPrefix("rollback") {
            #expect(fileBytes(source) == states[rollbackTarget]!, "the source after a crash at \(point)")
        }
    }
}
