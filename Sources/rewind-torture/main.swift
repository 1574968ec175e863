import Foundation
import Glibc
import RewindCore
import RewindWorkload

/// Crash-test child: appends change stream SEED to MIRROR forever (until killed) the way
/// `serve` does — group commits staged in a long index transaction, the log synced at random
/// (a FLUSH), the index committed at random — compacting and rolling back at random. After each durable step it prints one line on
/// stdout, written unbuffered, so the parent knows what must survive a SIGKILL:
///   `synced N`        records 1...N are durable (in the synced log, indexed or not)
///   `rollback K`      a rollback to K is about to start (N may go back to K)
/// Because change i of the stream is always the same, a rollback followed by re-appending
/// reproduces the same history, and the parent can rebuild the volume at any seq.
///
/// usage: rewind-torture MIRROR SEED
func say(_ line: String, fd: Int32 = 1) {
    let bytes = Array((line + "\n").utf8)
    _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
}

/// `n` as 16 hex digits (a log file's name).
func hex16(_ n: UInt64) -> String {
    let digits = String(n, radix: 16)
    return String(repeating: "0", count: max(0, 16 - digits.count)) + digits
}

/// Other modes, for the CLI scripts:
///   rewind-torture pipeline MIRROR SOURCE SEED       serve's pipeline journalling stream SEED until killed
///   rewind-torture power-cuts SEED COUNT [--json]    the power-cut simulation (PowerCutTests), COUNT cuts
///   rewind-torture append MIRROR SEED COUNT [BATCH [--writes]]  append changes lastSeq+1... of stream SEED
///                                                    (--writes: its zeroes, trims and FLUSHes as one-block writes), then sync
///   rewind-torture model SEED SIZE BLOCKSIZE K OUT   write the volume after change K of stream SEED
///   rewind-torture describe SEED SIZE BLOCKSIZE K    print change K's kind, offset and length
///   rewind-torture damage-log MIRROR SEED             leave a damaged chunk before an intact one past the index
let args = CommandLine.arguments
do {
    switch (args.count, args.count > 1 ? args[1] : "") {
    case (5, "append"), (6, "append"), (7, "append"):
        guard let seed = UInt64(args[3]), let count = UInt64(args[4]), args.count < 7 || args[6] == "--writes" else { break }
        let batchSize = args.count >= 6 ? UInt64(args[5]) ?? 1 : 1
        // --writes: every change of the stream that is not a write becomes a one-block write at
        // its offset (a history of writes only: zero and trim records of up to a quarter of the
        // volume make the fill's indexing cost grow with the history, `Mirror.markZero`).
        let writesOnly = args.count == 7
        let mirror = try Mirror.open(at: args[2], recover: true)
        let bs = UInt64(mirror.blockSize)
        var done: UInt64 = 0
        while done < count {
            let last = try mirror.meta().lastSeq
            let n = min(batchSize, count - done)
            try mirror.append((1...n).map {
                let c = streamChange(seed: seed, index: last + $0, size: mirror.volumeSize, blockSize: mirror.blockSize)
                guard writesOnly, c.kind != .write else { return c }
                let offset = c.offset / bs * bs
                return .write(offset, (0..<Int(bs)).map { UInt8(truncatingIfNeeded: Int(offset / bs) &+ $0 &* 7) })
            })
            done += n
        }
        try mirror.sync()
        exit(0)
    case (7, "model"):
        guard let seed = UInt64(args[2]), let size = UInt64(args[3]), let bs = Int(args[4]), let k = UInt64(args[5]) else { break }
        let state = streamStates(seed: seed, points: [k], size: size, blockSize: bs)[k]!
        let out = try BlockFile(path: args[6], mode: .createOrTruncate)
        try out.write(at: 0, state)
        exit(0)
    case (6, "describe"):
        guard let seed = UInt64(args[2]), let size = UInt64(args[3]), let bs = Int(args[4]), let k = UInt64(args[5]) else { break }
        let c = streamChange(seed: seed, index: k, size: size, blockSize: bs)
        say("\(c.kind.name) \(c.offset) \(c.length)")
        exit(0)
    case (6, "compact-then-rollback"):
        // Append COUNT changes, compact to COUNT/2, roll back to 3*COUNT/4 with --source SOURCE.
        // Run with REWIND_CRASH_AT set to die inside one step.
        guard let seed = UInt64(args[3]), let count = UInt64(args[4]) else { break }
        let mirror = try Mirror.open(at: args[2], recover: true)
        for first in stride(from: UInt64(1), through: count, by: 10) {
            try mirror.append((first...min(first + 9, count)).map {
                streamChange(seed: seed, index: $0, size: mirror.volumeSize, blockSize: mirror.blockSize)
            })
        }
        try mirror.sync()
        let source = try BlockFile(path: args[5], mode: .createOrTruncate)
        try source.write(at: 0, streamStates(seed: seed, points: [count], size: mirror.volumeSize, blockSize: mirror.blockSize)[count]!)
        try source.sync()
        _ = try mirror.compact(to: .seq(count / 2))
        _ = try mirror.rollback(to: .seq(count * 3 / 4), source: args[5])
        exit(0)
    case (4, "damage-log"):
        // Stage changes lastSeq+1... of stream SEED as three log chunks that are synced but
        // never indexed (a writer killed before its index commit), then damage the middle
        // chunk's payload, so the next open finds damage with an intact chunk after it.
        // Prints the damaged chunk's log position and its first seq.
        guard let seed = UInt64(args[3]) else { break }
        let mirror = try Mirror.open(at: args[2], recover: true)
        let writer = JournalWriter(mirror: mirror)
        var last = try mirror.meta().lastSeq
        var damagedAt: UInt64 = 0, damagedSeq: UInt64 = 0
        for chunk in 0..<3 {
            if chunk == 1 { (damagedAt, damagedSeq) = (mirror.journal.log.end(), last + 1) }
            last = try writer.append((1...3).map {
                streamChange(seed: seed, index: last + $0, size: mirror.volumeSize, blockSize: mirror.blockSize)
            }).upperBound
        }
        try writer.syncLog()
        writer.abort(keepLog: true)
        let at = damagedAt + 64 + 5  // a payload byte, past the 64-byte chunk header
        let file = try BlockFile(path: mirror.path + "/log/" + hex16(at / PayloadLog.fileBytes) + ".log", mode: .readWrite)
        var byte: [UInt8] = [0]
        try byte.withUnsafeMutableBytes { try file.read(at: at % PayloadLog.fileBytes, into: $0) }
        byte[0] ^= 0x01
        try file.write(at: at % PayloadLog.fileBytes, byte)
        try file.dataSync()
        say("\(damagedAt) \(damagedSeq)")
        exit(0)
    case (5, "pipeline"):
        // Serve's real pipeline (writer, applier, index thread) journalling change stream SEED
        // into MIRROR and SOURCE until killed, with retention passes beside it: started the way
        // serve starts (the source brought up to the journal), and `synced N` printed once a
        // FLUSH or FUA write at seq N is answered with success.
        guard let seed = UInt64(args[4]) else { break }
        let mirror = try Mirror.open(at: args[2], recover: true)
        let source = try BlockFile(path: args[3], mode: .readWrite)
        _ = try mirror.bringSourceUpToDate(source)
        var tuning = ServePipeline.Tuning()
        // Serve's, faster: a kill lands in every phase (group commit, apply, source sync, index commit).
        tuning.commitIntervalNanoseconds = 1_000_000
        tuning.sourceSyncIntervalNanoseconds = 20_000_000
        tuning.writeAheadIntervalNanoseconds = 5_000_000
        tuning.indexPolicy = IndexCommitter.Policy(intervalNanoseconds: 30_000_000, maxChanges: 4096, maxBlocks: 4096)
        var seq = try mirror.meta().lastSeq
        let pipeline = ServePipeline(mirror: mirror, source: source, sourceSyncedSeq: seq, tuning: tuning, observer: nil)
        pipeline.start()
        var rng = SplitMix(seed: seed &+ UInt64(getpid()))
        while pipeline.fenceReason == nil {
            seq += 1
            let change = streamChange(seed: seed, index: seq, size: mirror.volumeSize, blockSize: mirror.blockSize)
            let at = seq
            let syncs = change.kind == .flush || change.fua
            pipeline.submit(VolumeOp(change) { failure in if syncs && failure == nil { say("synced \(at)") } })
            switch Int.random(in: 0..<400, using: &rng) {
            case 0: _ = try? pipeline.retentionPass(keepAgeNanoseconds: nil, keepBytes: UInt64.random(in: 0...(1 << 20), using: &rng))
            case 1..<40: usleep(UInt32.random(in: 0..<2000, using: &rng))
            default: break
            }
        }
        say("rewind-torture: volume fenced: \(pipeline.fenceReason ?? "")", fd: 2)
        exit(1)
    case (4, "power-cuts"), (5, "power-cuts"):
        // PowerCutSimulation (the test behind PowerCutTests), COUNT cuts of seed SEED, in a
        // directory of its own (under /dev/shm when there is one): a progress line every
        // 1,000 cuts on stderr, the totals on stdout (one JSON object with --json), exit 1 and
        // the violation on the first lost byte.
        guard let seed = UInt64(args[2]), let count = Int(args[3]) else { break }
        let json = args.count == 5 && args[4] == "--json"
        let root = PowerCutSimulation.makeDirectory()
        defer { try? FileManager.default.removeItem(atPath: root) }
        let started = Date()
        do {
            let totals = try PowerCutSimulation(seed: seed, root: root).run(cuts: count) { t in
                if t.cuts % 1000 == 0 { say("power-cuts: seed \(seed): \(t) in \(Int(Date().timeIntervalSince(started))) s", fd: 2) }
            }
            let seconds = Date().timeIntervalSince(started)
            if json {
                say("{\"seed\":\(seed),\"cuts\":\(totals.cuts),\"requests\":\(totals.requests),\"durable\":\(totals.durable),\"kept\":\(totals.kept),\"lost\":\(totals.lost),\"refused\":\(totals.refused),\"rollbacks\":\(totals.rollbacks),\"compactions\":\(totals.compactions),\"tornPages\":\(totals.torn),\"lmdbCommitsLost\":\(totals.lmdbLost),\"violations\":0,\"seconds\":\(Int(seconds))}")
            } else {
                say("power-cuts: seed \(seed): \(totals), no violation, in \(Int(seconds)) s")
            }
            exit(0)
        } catch let v as PowerCutSimulation.Violation {
            say("power-cuts: VIOLATION: \(v)", fd: 2)
            exit(1)
        }
    case (3, _):
        break
    default:
        say("usage: rewind-torture MIRROR SEED | pipeline MIRROR SOURCE SEED | power-cuts SEED COUNT [--json] | append MIRROR SEED COUNT [BATCH [--writes]] | model SEED SIZE BLOCKSIZE K OUT | describe SEED SIZE BLOCKSIZE K | damage-log MIRROR SEED", fd: 2)
        exit(2)
    }
} catch {
    say("rewind-torture: \(error)", fd: 2)
    exit(1)
}
guard args.count == 3, let seed = UInt64(args[2]) else {
    say("usage: rewind-torture MIRROR SEED", fd: 2)
    exit(2)
}
do {
    let mirror = try Mirror.open(at: args[1], recover: true)
    if let pending = try mirror.status().rollbackPending {
        say("rollback \(pending)")
        _ = try mirror.rollback(to: .seq(pending), source: nil)
    }
    var rng = SplitMix(seed: seed &+ UInt64(getpid()))
    let size = mirror.volumeSize
    let writer = JournalWriter(mirror: mirror)
    while true {
        let last = try writer.lastSeq ?? mirror.meta().lastSeq
        let count = Int.random(in: 1...16, using: &rng)
        let batch = (1...UInt64(count)).map {
            streamChange(seed: seed, index: last + $0, size: size, blockSize: mirror.blockSize)
        }
        let seqs = try writer.append(batch)
        if Int.random(in: 0..<3, using: &rng) == 0 {
            try writer.syncLog()
            say("synced \(seqs.upperBound)")
        }
        if Int.random(in: 0..<4, using: &rng) == 0 { try writer.commit() }
        let roll = Int.random(in: 0..<40, using: &rng)
        if roll < 2 { try writer.commit() }  // compaction and rollback take LMDB's writer lock
        if roll == 0 {
            let now = try mirror.meta()
            let target = now.lastSeq - UInt64.random(in: 0...min(200, now.lastSeq - now.horizon), using: &rng)
            _ = try mirror.compact(to: .seq(target))
        } else if roll == 1 {
            let now = try mirror.meta()
            let target = now.lastSeq - UInt64.random(in: 0...min(50, now.lastSeq - now.horizon), using: &rng)
            say("rollback \(target)")
            _ = try mirror.rollback(to: .seq(target), source: nil)
        }
    }
} catch {
    say("rewind-torture: \(error)", fd: 2)
    exit(1)
}
