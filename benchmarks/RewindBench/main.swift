import Foundation
import Glibc
import RewindCore
import RewindWorkload

/// Engine benchmarks, each side by side with a plain-file peer on the same file system in
/// the same run, reported as ratios. usage: rewind-bench DIR [--quick] [--json]
/// (see benchmarks/README.md; results go to docs/benchmarks.md).

struct Result: Codable { var name: String; var rewind: Double; var peer: Double; var unit: String; var ratio: Double; var note: String }

tuneAllocatorForLargeBuffers()
nonisolated(unsafe) var results: [Result] = []
let args = CommandLine.arguments
let usage = "usage: rewind-bench DIR [--quick] [--only append|restore|reads|timeline|memory|dirtyset] [--json]"
let groups = ["append", "restore", "reads", "timeline", "memory", "dirtyset"]
if args.contains("--help") || args.contains("-h") { print(usage); exit(0) }
// DIR comes first and is never an option: `rewind-bench --quick` must not benchmark in "./--quick".
guard args.count >= 2, !args[1].hasPrefix("-") else {
    FileHandle.standardError.write(Data("rewind-bench: the first argument must be the directory to work in\n\(usage)\n".utf8))
    exit(64)
}
let root = args[1]
let quick = args.contains("--quick")
/// --only NAME runs one group.
let only: String? = args.firstIndex(of: "--only").map { i in i + 1 < args.count ? args[i + 1] : "" }
if let only, !groups.contains(only) {
    FileHandle.standardError.write(Data("rewind-bench: --only takes one of \(groups.joined(separator: ", ")), not '\(only)'\n".utf8))
    exit(64)
}
let rewindBinary = URL(fileURLWithPath: args[0]).deletingLastPathComponent().path + "/rewind"

func now() -> Double { Double(monotonicNanoseconds()) / 1e9 }
func log(_ s: String) { FileHandle.standardError.write(Data((s + "\n").utf8)) }
func record(_ name: String, rewind: Double, peer: Double, unit: String, higherIsBetter: Bool = true, note: String = "") {
    let ratio = higherIsBetter ? rewind / peer : rewind / peer
    results.append(Result(name: name, rewind: rewind, peer: peer, unit: unit, ratio: ratio, note: note))
    log(String(format: "%-52@ rewind %10.1f  peer %10.1f %@  ratio %.3f  %@", name as NSString, rewind, peer, unit as NSString, ratio, note as NSString))
}
func fresh(_ name: String) -> String {
    let p = root + "/" + name
    try? FileManager.default.removeItem(atPath: p)
    return p
}
func dropCaches() { sync() }

/// Fill `buffer` with cheap pseudo-random bytes (incompressible enough; no zero blocks).
func fill(_ buffer: inout [UInt8], seed: UInt64) {
    var rng = SplitMix(seed: seed | 1)
    buffer.withUnsafeMutableBytes { raw in
        let words = raw.bindMemory(to: UInt64.self)
        for i in 0..<words.count { words[i] = rng.next() }
    }
}

// MARK: 1. append throughput with group commit vs sequential pwrite

/// Median of three runs: this class of VM's disk is noisy from one second to the next.
func benchAppend(recordBytes: Int, totalBytes: Int) throws {
    var runs: [(rewind: Double, peer: Double, onDisk: UInt64)] = []
    for _ in 0..<3 { runs.append(try appendOnce(recordBytes: recordBytes, totalBytes: totalBytes)) }
    let r = runs.map(\.rewind).sorted()[1], p = runs.map(\.peer).sorted()[1]
    record("append \(recordBytes / 1024) KiB records (MiB/s)", rewind: r, peer: p, unit: "MiB/s",
           note: "median of 3; peer: pwrite + one fsync; target >= 0.8")
    if recordBytes == 4096 {
        let onDisk = runs[0].onDisk
        let ratio = Double(onDisk) / Double(totalBytes)
        results.append(Result(name: "journal bytes on disk / payload, 4 KiB records", rewind: Double(onDisk), peer: Double(totalBytes),
                              unit: "bytes", ratio: ratio, note: "target <= 1.05"))
        log(String(format: "journal bytes on disk / payload (4 KiB records): %.4f (%llu / %llu)", ratio, onDisk, UInt64(totalBytes)))
    }
}

func appendOnce(recordBytes: Int, totalBytes: Int) throws -> (rewind: Double, peer: Double, onDisk: UInt64) {
    let batchBytes = 32 << 20  // one group commit
    let perBatch = max(1, batchBytes / recordBytes)
    let records = totalBytes / recordBytes
    var data = [UInt8](repeating: 0, count: recordBytes)
    let volume = UInt64(totalBytes)
    // Peer: pwrite the same bytes sequentially to a plain file, fsync at the end.
    let plainPath = fresh("plain.img")
    let plain = try BlockFile(path: plainPath, mode: .createNew)
    var t0 = now()
    for i in 0..<records {
        data[0] = UInt8(truncatingIfNeeded: i)
        try plain.write(at: UInt64(i * recordBytes), data)
    }
    try plain.sync()
    let plainSeconds = now() - t0
    try FileManager.default.removeItem(atPath: plainPath)
    // rewind: append to the journal in group commits of ~8 MiB, sync at the end.
    let m = try Mirror.create(at: fresh("append.rewind"), size: volume)
    t0 = now()
    var i = 0
    while i < records {
        var batch: [Change] = []
        for _ in 0..<min(perBatch, records - i) {
            data[0] = UInt8(truncatingIfNeeded: i)
            batch.append(.write(UInt64(i * recordBytes), data))
            i += 1
        }
        try m.append(batch)
    }
    try m.sync()
    let rewindSeconds = now() - t0
    let mb = Double(totalBytes) / 1048576
    let onDisk = try BlockFile(path: m.path + "/journal/data.mdb", mode: .readOnly).allocatedBytes() + m.journal.log.allocatedBytes()
    try FileManager.default.removeItem(atPath: m.path)
    return (mb / rewindSeconds, mb / plainSeconds, onDisk)
}

// MARK: 2. restore vs cp --sparse=always; 3. compaction

/// Run a command and return its time and peak RSS. The peak is the child's own VmHWM, which
/// rewind writes to $REWIND_PEAK_RSS_FILE at exit: rusage of a child spawned from this process
/// would inherit this process's high-water mark at exec (Linux keeps the larger of the two).
func run(_ argv: [String]) -> (seconds: Double, maxRSSKiB: Int) {
    let rssFile = root + "/rss.txt"
    setenv("REWIND_PEAK_RSS_FILE", rssFile, 1)
    defer { unsetenv("REWIND_PEAK_RSS_FILE") }
    let result = spawn(argv)
    let rss = (try? String(contentsOfFile: rssFile, encoding: .utf8)).flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) } ?? 0
    try? FileManager.default.removeItem(atPath: rssFile)
    return (result, rss)
}

func spawn(_ argv: [String]) -> Double {
    let t0 = now()
    var pid: pid_t = 0
    var cargs = argv.map { strdup($0) } + [nil]
    defer { cargs.forEach { free($0) } }
    guard posix_spawn(&pid, argv[0], nil, nil, &cargs, environ) == 0 else { log("cannot run \(argv[0])"); return 0 }
    var status: Int32 = 0
    waitpid(pid, &status, 0)
    if status != 0 { log("\(argv.joined(separator: " ")) exited \(status)") }
    return now() - t0
}

func benchRestoreAndCompaction(volumeBytes: Int) throws {
    let bs = 4096
    let blocks = volumeBytes / bs
    let seedImage = fresh("restore-seed.img")
    do {
        let f = try BlockFile(path: seedImage, mode: .createNew)
        var chunk = [UInt8](repeating: 0, count: 8 << 20)
        var at = 0
        while at < volumeBytes { fill(&chunk, seed: UInt64(at)); try f.write(at: UInt64(at), chunk); at += chunk.count }
        try f.sync()
    }
    let m = try Mirror.create(at: fresh("restore.rewind"), from: seedImage, blockSize: bs)
    try FileManager.default.removeItem(atPath: seedImage)
    // Change 10% of the blocks (random, with repeats), in group commits.
    var rng = SplitMix(seed: 42)
    var data = [UInt8](repeating: 0, count: bs)
    fill(&data, seed: 7)
    var distinct = Set<Int>()
    var batch: [Change] = []
    var writes = 0
    while distinct.count < blocks / 10 {
        let b = Int.random(in: 0..<blocks, using: &rng)
        distinct.insert(b)
        data[0] = UInt8(truncatingIfNeeded: writes)
        batch.append(.write(UInt64(b * bs), data))
        writes += 1
        if batch.count == 2048 { try m.append(batch); batch.removeAll() }
    }
    if !batch.isEmpty { try m.append(batch) }
    try m.sync()
    sync()
    // Peer: cp --sparse=always of the base, then sync the copy.
    let copy = fresh("cp.img")
    let cp = run(["/bin/cp", "--sparse=always", m.path + "/base.img", copy])
    let t0 = now()
    try BlockFile(path: copy, mode: .readOnly).sync()
    let cpSeconds = cp.seconds + (now() - t0)
    try FileManager.default.removeItem(atPath: copy)
    sync()
    let out = fresh("restored.img")
    let r = run([rewindBinary, "restore", m.path, "--at", "latest", "--to", out])
    try FileManager.default.removeItem(atPath: out)
    record("restore \(volumeBytes >> 30) GiB, 10% blocks changed (s)", rewind: r.seconds, peer: cpSeconds, unit: "s",
           higherIsBetter: false, note: "peer: cp --sparse=always + fsync; target <= 1.3; restore peak RSS \(r.maxRSSKiB / 1024) MiB")
    // Compaction of everything: blocks written must equal distinct blocks folded.
    let t1 = now()
    let report = try m.compact(to: .latest)
    let seconds = now() - t1
    let mb = Double(report.bytesFolded) / 1048576
    results.append(Result(name: "compaction: blocks written / distinct blocks folded", rewind: Double(report.blocksWritten),
                          peer: Double(distinct.count), unit: "blocks", ratio: Double(report.blocksWritten) / Double(distinct.count),
                          note: "exact = 1.000; \(writes) writes folded at \(String(format: "%.0f", mb / seconds)) MiB/s of journal"))
    log("compaction: \(report.blocksWritten) blocks written for \(distinct.count) distinct blocks (\(writes) writes), \(String(format: "%.1f", mb / seconds)) MiB/s")
    try FileManager.default.removeItem(atPath: m.path)
}

// MARK: 4. point-in-time random 4 KiB reads vs pread

func benchPointReads(volumeBytes: Int, reads: Int) throws {
    let bs = 4096
    let blocks = volumeBytes / bs
    let m = try Mirror.create(at: fresh("reads.rewind"), size: UInt64(volumeBytes))
    var data = [UInt8](repeating: 0, count: 1 << 20)
    fill(&data, seed: 3)
    var batch: [Change] = []
    for at in stride(from: 0, to: volumeBytes, by: data.count) {
        batch.append(.write(UInt64(at), data))
        if batch.count == 8 { try m.append(batch); batch.removeAll() }
    }
    if !batch.isEmpty { try m.append(batch) }
    let plainPath = fresh("reads-plain.img")
    let plain = try BlockFile(path: plainPath, mode: .createNew)
    for at in stride(from: 0, to: volumeBytes, by: data.count) { try plain.write(at: UInt64(at), data) }
    var buf = [UInt8](repeating: 0, count: bs)
    var rng = SplitMix(seed: 5)
    let offsets = (0..<reads).map { _ in UInt64(Int.random(in: 0..<blocks, using: &rng) * bs) }
    var t0 = now()
    for o in offsets { try buf.withUnsafeMutableBytes { try plain.read(at: o, into: $0) } }
    let plainRate = Double(reads) / (now() - t0)
    let snap = try Snapshot(mirror: m, point: .latest)
    t0 = now()
    for o in offsets { try buf.withUnsafeMutableBytes { try snap.read(at: o, into: $0) } }
    let rewindRate = Double(reads) / (now() - t0)
    snap.close()
    record("point-in-time random 4 KiB reads (reads/s)", rewind: rewindRate, peer: plainRate, unit: "reads/s",
           note: "warm cache; peer: pread of a plain file")
    try FileManager.default.removeItem(atPath: plainPath)
    try FileManager.default.removeItem(atPath: m.path)
}

// MARK: 5. timeline --every 1m over 1 M records; memory of every command at 10 M records

func benchTimelineAndMemory(records: Int) throws {
    let m = try Mirror.create(at: fresh("timeline.rewind"), size: 1 << 30)
    var rng = SplitMix(seed: 9)
    var data = [UInt8](repeating: 0, count: 4096)
    fill(&data, seed: 1)
    var appended = 0
    let t0 = now()
    while appended < records {
        // Mostly small zero records (headers only), one 4 KiB write in 64.
        var batch: [Change] = []
        for i in 0..<min(10_000, records - appended) {
            if i % 64 == 0 { batch.append(.write(UInt64(Int.random(in: 0..<262_144, using: &rng) * 4096), data)) }
            else { batch.append(.zero(UInt64(Int.random(in: 0..<262_144, using: &rng) * 4096), 4096)) }
        }
        try m.append(batch)
        appended += batch.count
    }
    try m.sync()
    log("appended \(records) records in \(String(format: "%.1f", now() - t0)) s")
    let devnull = ["/bin/sh", "-c"]
    let tl = run(devnull + ["\"$0\" timeline \"$1\" --every 1m > /dev/null", rewindBinary, m.path])
    let label = records >= 1_000_000 ? "\(records / 1_000_000) M" : "\(records)"
    record("timeline --every 1m over \(label) records (s)", rewind: tl.seconds, peer: 1.0, unit: "s", higherIsBetter: false,
           note: "peer column is the 1 s target; peak RSS \(tl.maxRSSKiB / 1024) MiB")
    var rss: [String] = []
    for cmd in [["timeline", m.path, "--json"], ["status", m.path], ["verify", m.path],
                ["restore", m.path, "--at", "latest", "--to", root + "/mem-restore.img", "--force"]] {
        let r = run(devnull + ["\"$0\" \"$@\" > /dev/null", rewindBinary] + cmd)
        rss.append("\(cmd[0]) \(r.maxRSSKiB / 1024) MiB in \(String(format: "%.1f", r.seconds)) s")
    }
    try? FileManager.default.removeItem(atPath: root + "/mem-restore.img")
    log("peak RSS at \(label) records: " + rss.joined(separator: "; "))
    results.append(Result(name: "peak RSS per command at \(label) records", rewind: 0, peer: 0, unit: "MiB", ratio: 0,
                          note: rss.joined(separator: "; ")))
    try FileManager.default.removeItem(atPath: m.path)
}

/// A replication peer's dirty set (issue 19): its encoded size per TiB of volume at 4 KiB
/// blocks, random and clustered (runs of 256 blocks, 1 MiB), against DRBD's plain bitmap
/// (one bit per block: 32 MiB per TiB).
func benchDirtySetSize() {
    let blocks: UInt64 = 1 << 28  // 1 TiB of 4 KiB blocks
    let bitmap = Double(blocks / 8) / 1_048_576
    for fraction in [0.01, 0.1, 0.5, 1.0] {
        for clustered in [false, true] {
            let started = now()
            let r = DirtySet.sizeReport(blocks: blocks, dirtyFraction: fraction, clustered: clustered, seed: 19)
            let mib = Double(r.bytes) / 1_048_576
            let label = "dirty set per TiB, \(Int(fraction * 100)) % dirty, \(clustered ? "clustered" : "random")"
            log(String(format: "%@: %llu blocks, %.3f MiB (built in %.2f s)", label as NSString, r.count, mib, now() - started))
            results.append(Result(name: label, rewind: mib, peer: bitmap, unit: "MiB", ratio: mib / bitmap,
                                  note: "peer: DRBD's bitmap, 1 bit per 4 KiB block"))
        }
    }
}

do {
    try FileManager.default.createDirectory(atPath: root, withIntermediateDirectories: true)
    func wanted(_ name: String) -> Bool { only == nil || only == name }
    let appendTotal = quick ? 64 << 20 : 1 << 30
    if wanted("append") { for size in [4096, 65536, 1 << 20] { try benchAppend(recordBytes: size, totalBytes: appendTotal) } }
    if wanted("restore") { try benchRestoreAndCompaction(volumeBytes: quick ? 256 << 20 : 4 << 30) }
    if wanted("reads") { try benchPointReads(volumeBytes: quick ? 64 << 20 : 1 << 30, reads: quick ? 20_000 : 200_000) }
    if wanted("timeline") { try benchTimelineAndMemory(records: quick ? 100_000 : 1_000_000) }
    if wanted("dirtyset") { benchDirtySetSize() }
    if !quick && wanted("memory") { try benchTimelineAndMemory(records: 10_000_000) }
} catch {
    log("rewind-bench: \(error)")
    exit(1)
}
if args.contains("--json") {
    let e = JSONEncoder(); e.outputFormatting = [.sortedKeys]
    for r in results { if let data = try? e.encode(r) { print(String(decoding: data, as: UTF8.self)) } }
} else {
    print("| benchmark | rewind | peer | unit | ratio | note |")
    print("|---|---:|---:|---|---:|---|")
    for r in results {
        print(String(format: "| %@ | %.1f | %.1f | %@ | %.3f | %@ |", r.name as NSString, r.rewind, r.peer, r.unit as NSString, r.ratio, r.note as NSString))
    }
}
