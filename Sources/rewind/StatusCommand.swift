import ArgumentParser
import Foundation
import RewindCore

struct StatusCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "status", abstract: "Show a mirror's size, window, journal and bookmarks.",
        discussion: "Exits 1, after printing, when payload log files the journal needs are missing or cut short, or when a server fenced the volume (a write or sync failed) and no start has recovered since.")

    @Argument(help: "The mirror directory.") var mirror: String
    @Flag(help: "Print as one JSON object.") var json = false

    func run() throws {
        var damaged = false
        try reporting {
            let s = try openMirror(mirror).status()
            damaged = !s.logDamage.isEmpty || s.fenced != nil
            if json {
                printJSON(s)
            } else {
                print("""
                mirror       \(s.path)
                volume       \(s.uuid), \(s.volumeSize) bytes (\(humanBytes(s.volumeSize))), block size \(s.blockSize)
                records      \(s.records)
                oldest       seq:\(s.oldestSeq) at \(s.oldestTime)
                newest       seq:\(s.newestSeq) at \(s.newestTime)
                journal      \(humanBytes(s.journalPayloadBytes)) of payload; log files \(humanBytes(s.logFileBytes)), index \(humanBytes(s.journalFileBytes))
                base         \(humanBytes(s.baseAllocatedBytes)) allocated
                generation   \(s.generation)
                role         \(s.role == "replica" ? "replica (rewind receive writes it; promote makes it an origin)" : "origin")
                """)
                if let c = s.compactionPending { print("compaction   unfinished, to seq:\(c) (finished by the next compact or serve)") }
                if let r = s.rollbackPending { print("rollback     unfinished, to seq:\(r) (run rollback again)") }
                for (name, seq) in s.bookmarks.sorted(by: { $0.value < $1.value }) { print("bookmark     \(name) = seq:\(seq)") }
                for pin in s.pins { print("pin          seq:\(pin.seq) held by \(pin.holder) (pid \(pin.pid)) since \(pin.since)") }
                for p in s.peers {
                    var line = "peer         \(p.id.prefix(16))… at \(p.address): durable seq:\(p.durableSeq), behind by \(p.lagRecords) records, \(humanBytes(p.lagBytes)), \(String(format: "%.1f", p.lagSeconds)) s; \(p.mode), \(p.state.isEmpty ? "never connected" : p.state)"
                    if let keep = p.keepBytes { line += "; keeps at most \(humanBytes(keep)) of records for it" }
                    if let minFree = p.minFreeBytes { line += ", none below \(humanBytes(minFree)) free" }
                    if let blocks = p.dirtyBlocks, let since = p.dirtySince {
                        line += "; dirty set: \(blocks) blocks changed since seq:\(since) (\(humanBytes(UInt64(p.dirtySetBytes ?? 0)))), as \(p.dirtyWhy ?? "records it lacked were folded"): caught up as one point when it returns"
                    }
                    print(line)
                }
                if let oldest = s.pins.first { print("retention    stops at seq:\(oldest.seq) while it is pinned") }
                for gap in s.logDamage { print("log          DAMAGED: \(gap)") }
                if let f = s.fenced { print("fenced       \(f)") }
            }
            if let first = s.logDamage.first { printError("the journal's log is damaged: \(first)") }
            if let f = s.fenced {
                printError("the volume was fenced (writes refused) since \(f); the next `rewind serve` brings the source up to the journal")
            }
        }
        if damaged { throw ExitCode(1) }
    }
}
