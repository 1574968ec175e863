import ArgumentParser
import Foundation
import RewindCore

struct TimelineCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "timeline", abstract: "List the journal's records, or per-interval summaries with --every.")

    @Argument(help: "The mirror directory.") var mirror: String
    @Option(help: "First record: the one POINT names (seq:N, time:RFC3339, bookmark:NAME, latest, oldest).", transform: parsePoint) var since: Point?
    @Option(help: "Last record: the one POINT names.", transform: parsePoint) var until: Point?
    @Option(help: "One line per interval (e.g. 1m, 1h) with counts and bytes.", transform: parseDuration) var every: UInt64?
    @Flag(help: "JSON Lines: one object per record or interval.") var json = false

    struct RecordLine: Encodable {
        var seq: UInt64, time: String, kind: String, offset: UInt64, length: UInt64, fua: Bool, checksum: String
        /// A catch-up's: the seq it follows and the blocks it sets (its offset and length fields).
        var from: UInt64? = nil, blocks: UInt64? = nil
    }
    struct BucketLine: Encodable {
        var start: String, firstSeq: UInt64, lastSeq: UInt64, records: UInt64, bytes: UInt64
        var writes: UInt64, zeroes: UInt64, trims: UInt64, flushes: UInt64, catchUps: UInt64
    }

    func run() throws {
        try reporting {
            let (m, _) = try openMirrorCaughtUp(mirror)
            let meta = try m.meta()
            let first = max(try since.map { try m.resolve($0) } ?? 0, meta.oldestPoint + 1)
            let last = try until.map { try m.resolve($0) } ?? meta.lastSeq
            guard first <= last else { return }
            if let width = every {
                if !json { print("INTERVAL START                        SEQS                  RECORDS   BYTES     W/Z/T/F") }
                try m.forEachBucket(in: first...last, widthNanoseconds: width) { b in
                    let line = BucketLine(start: formatRFC3339(b.start), firstSeq: b.firstSeq, lastSeq: b.lastSeq,
                                          records: b.records, bytes: b.bytes, writes: b.writes, zeroes: b.zeroes,
                                          trims: b.trims, flushes: b.flushes, catchUps: b.catchUps)
                    if json { printJSON(line) } else {
                        print("\(line.start)  \("\(b.firstSeq)-\(b.lastSeq)".padding(toLength: 20, withPad: " ", startingAt: 0))  \(String(b.records).padding(toLength: 8, withPad: " ", startingAt: 0))  \(humanBytes(b.bytes).padding(toLength: 8, withPad: " ", startingAt: 0))  \(b.writes)/\(b.zeroes)/\(b.trims)/\(b.flushes)\(b.catchUps > 0 ? " + \(b.catchUps) catch-up" : "")")
                    }
                }
            } else {
                if !json { print("SEQ        TIME                            KIND      OFFSET          LENGTH") }
                try m.forEachRecord(in: first...last) { r in
                    let h = r.header
                    if json {
                        let catchUp = h.kind == .catchUp
                        printJSON(RecordLine(seq: r.seq, time: formatRFC3339(h.timestamp), kind: h.kind.name,
                                             offset: h.offset, length: h.length, fua: h.fua,
                                             checksum: "0x" + String(h.checksum, radix: 16),
                                             from: catchUp ? h.offset : nil, blocks: catchUp ? h.length : nil))
                    } else {
                        let kind = h.kind.name + (h.fua ? "+fua" : "")
                        // A catch-up shows the seq it follows and the blocks it sets.
                        let (offset, length) = h.kind == .catchUp ? ("from seq:\(h.offset)", "\(h.length) blocks") : (String(h.offset), String(h.length))
                        print("\(String(r.seq).padding(toLength: 10, withPad: " ", startingAt: 0)) \(formatRFC3339(h.timestamp))  \(kind.padding(toLength: 9, withPad: " ", startingAt: 0)) \(offset.padding(toLength: 15, withPad: " ", startingAt: 0)) \(length)")
                    }
                }
            }
        }
    }
}
