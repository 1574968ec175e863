import Glibc
import RewindCore
import RewindWorkload

/// Crash-test child: appends change stream SEED to MIRROR forever (until killed), syncing,
/// compacting and rolling back at random. After each durable step it prints one line on
/// stdout, written unbuffered, so the parent knows what must survive a SIGKILL:
///   `synced N`        records 1...N are durable
///   `rollback K`      a rollback to K is about to start (N may go back to K)
/// Because change i of the stream is always the same, a rollback followed by re-appending
/// reproduces the same history, and the parent can rebuild the volume at any seq.
///
/// usage: rewind-torture MIRROR SEED
func say(_ line: String, fd: Int32 = 1) {
    let bytes = Array((line + "\n").utf8)
    _ = bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
}

let args = CommandLine.arguments
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
    while true {
        let meta = try mirror.meta()
        let count = Int.random(in: 1...16, using: &rng)
        let batch = (1...UInt64(count)).map {
            streamChange(seed: seed, index: meta.lastSeq + $0, size: size, blockSize: mirror.blockSize)
        }
        let seqs = try mirror.append(batch)
        if Int.random(in: 0..<3, using: &rng) == 0 {
            try mirror.sync()
            say("synced \(seqs.upperBound)")
        }
        let roll = Int.random(in: 0..<40, using: &rng)
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
