import Foundation
import Glibc
import Testing
@testable import RewindCore

/// Expect `body` to throw a `RewindError` whose message is exactly `message`.
private func expectMessage(_ message: String, sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> Void) {
    do {
        try body()
        Issue.record("no error; expected: \(message)", sourceLocation: sourceLocation)
    } catch let e as RewindError {
        #expect(e.description == message, sourceLocation: sourceLocation)
    } catch {
        Issue.record("\(error); expected: \(message)", sourceLocation: sourceLocation)
    }
}

/// The source's state at a clean stop of `serve` (`SourceState`): its encoding, where it
/// samples, and what the next start accepts and refuses, with the exact messages.
@Suite struct SourceStateTests {
    static let blockSize = 4096
    static let blocks = 256

    /// A 1 MiB source holding a pattern, its mirror (lastSeq 0, the source synced), and the
    /// source opened for writing.
    static func served(_ dir: TempDir) throws -> (Mirror, BlockFile) {
        let bytes = (0..<(blocks * blockSize)).map { UInt8(truncatingIfNeeded: $0 &* 7 &+ ($0 >> 12)) }
        try writeFile(dir.file("src.img"), bytes)
        let m = try Mirror.create(at: dir.file("src.img.rewind"), from: dir.file("src.img"), blockSize: blockSize)
        return (m, try BlockFile(path: dir.file("src.img"), mode: .readWrite))
    }

    /// Flip one byte of `file` at `offset`.
    static func flip(_ file: BlockFile, at offset: UInt64) throws {
        var b: [UInt8] = [0]
        try b.withUnsafeMutableBytes { try file.read(at: offset, into: $0) }
        try file.write(at: offset, [b[0] ^ 0xFF])
    }

    static func changedMessage(_ dir: TempDir, seq: UInt64, what: String) -> String {
        let (s, m) = ("src.img", dir.file("src.img.rewind"))
        return "\(s) changed since rewind serve stopped at seq:\(seq) (\(what)): something wrote it without rewind. To put back the mirror's version run `rewind restore \(m) --at seq:\(seq) --to \(s).restored && cp --sparse=always \(s).restored \(s) && sync \(s) && rm \(s).restored`; to keep the source as it is now, move the mirror aside (`mv \(m) \(m).old`) and serve again, which starts a new mirror from it"
    }

    // MARK: encoding

    @Test func encodedStateDecodesAndAnyFlippedByteIsDamage() throws {
        let state = SourceState(lastSeq: 12, generation: 3, blockSize: 4096, sizeBytes: 1 << 20,
                                modifiedNanoseconds: 1_700_000_000_123_456_789, changedNanoseconds: -5,
                                samples: [.init(block: 0, hash: 1), .init(block: 17, hash: 2), .init(block: 255, hash: 3)])
        let bytes = state.encoded()
        #expect(bytes.count == SourceState.headerBytes + 3 * SourceState.sampleBytes + 8)
        #expect(try bytes.withUnsafeBytes { try SourceState.decode($0, mirror: "m") } == state)
        for i in bytes.indices {
            var damaged = bytes
            damaged[i] ^= 0x40
            #expect(throws: RewindError.self, "byte \(i) flipped") {
                try damaged.withUnsafeBytes { _ = try SourceState.decode($0, mirror: "m") }
            }
        }
        let why = "mirror m is damaged: its record of the source at the last clean stop (journal meta \"source-state\")"
        var flipped = bytes
        flipped[60] ^= 1
        expectMessage("\(why) fails its checksum") { try flipped.withUnsafeBytes { _ = try SourceState.decode($0, mirror: "m") } }
        expectMessage("\(why) is 40 bytes, too short") { try Array(bytes.prefix(40)).withUnsafeBytes { _ = try SourceState.decode($0, mirror: "m") } }
        var newer = bytes
        newer[0] = 2
        expectMessage("\(why) has format 2, newer than this rewind understands (1)") {
            try newer.withUnsafeBytes { _ = try SourceState.decode($0, mirror: "m") }
        }
        // Well-formed and checksummed, but the fields do not fit: samples out of order, past the end.
        for samples: [SourceState.Sample] in [[.init(block: 17, hash: 2), .init(block: 0, hash: 1)], [.init(block: 256, hash: 1)]] {
            var odd = state
            odd.samples = samples
            expectMessage("\(why) has inconsistent fields") { try odd.encoded().withUnsafeBytes { _ = try SourceState.decode($0, mirror: "m") } }
        }
    }

    @Test func samplesSpreadOverTheVolumeAndMoveWithEachStop() {
        let uuid = (0..<16).map { UInt8($0 * 11) }
        #expect(SourceState.sampleBlocks(blockCount: 1, uuid: uuid, lastSeq: 5) == [0])
        #expect(SourceState.sampleBlocks(blockCount: 66, uuid: uuid, lastSeq: 5) == Array(0..<66))
        for count: UInt64 in [67, 1000, 1 << 20, 1 << 40] {
            let b = SourceState.sampleBlocks(blockCount: count, uuid: uuid, lastSeq: 5)
            #expect(b == SourceState.sampleBlocks(blockCount: count, uuid: uuid, lastSeq: 5), "stable for one stop")
            #expect(b.first == 0 && b.last == count - 1)
            #expect(zip(b, b.dropFirst()).allSatisfy { $0 < $1 })
            #expect(b.count >= SourceState.spreadSamples && b.count <= SourceState.samplesMax)
            // One sample in each 64th of the volume.
            let (q, r) = count.quotientAndRemainder(dividingBy: 64)
            for i in UInt64(0)..<64 {
                let range = (i * q + min(i, r))..<((i + 1) * q + min(i + 1, r))
                #expect(b.contains { range.contains($0) }, "no sample in \(range) of \(count) blocks")
            }
            if count >= 1000 {
                #expect(b != SourceState.sampleBlocks(blockCount: count, uuid: uuid, lastSeq: 6), "the next stop samples elsewhere")
            }
        }
    }

    @Test func commandsInMessagesQuotePathsForTheShell() {
        #expect(shellWord("/srv/vm1.img") == "/srv/vm1.img")
        #expect(shellWord("my disk.img") == "'my disk.img'")
        #expect(shellWord("it's.img") == "'it'\\''s.img'")
        #expect(shellWord("~x") == "'~x'")
        #expect(withoutTrailingSlashes("m//") == "m" && withoutTrailingSlashes("/") == "/")
        let e = RewindError.sourceChanged(source: "my disk.img", mirror: "m", seq: 4, what: "block 0 differs from the mirror's latest point",
                                          isBlockDevice: false)
        #expect(e.description == "my disk.img changed since rewind serve stopped at seq:4 (block 0 differs from the mirror's latest point): something wrote it without rewind. To put back the mirror's version run `rewind restore m --at seq:4 --to 'my disk.img.restored' && cp --sparse=always 'my disk.img.restored' 'my disk.img' && sync 'my disk.img' && rm 'my disk.img.restored'`; to keep the source as it is now, move the mirror aside (`mv m m.old`) and serve again, which starts a new mirror from it")
        let device = RewindError.sourceChanged(source: "/dev/vg0/vm1", mirror: "/srv/vm1.rewind", seq: 9, what: "block 3 differs from the mirror's latest point",
                                               isBlockDevice: true)
        #expect(device.description == "/dev/vg0/vm1 changed since rewind serve stopped at seq:9 (block 3 differs from the mirror's latest point): something wrote it without rewind. To put back the mirror's version run `rewind restore /srv/vm1.rewind --at seq:9 --to /dev/vg0/vm1 --force`; to keep the source as it is now, move the mirror aside (`mv /srv/vm1.rewind /srv/vm1.rewind.old`) and serve again, which starts a new mirror from it")
    }

    // MARK: stop and start

    @Test func startAcceptsTheSameOrATouchedSourceAndRefusesAChangedOne() throws {
        let dir = TempDir("state")
        defer { dir.remove() }
        let (m, src) = try Self.served(dir)
        #expect(try m.checkSourceAgainstStopState(src, given: "src.img") == .notRecorded)
        let state = try #require(try m.recordSourceState(of: src))
        #expect(try m.sourceState() == state)
        #expect(state.lastSeq == 0 && state.sizeBytes == UInt64(Self.blocks * Self.blockSize))
        #expect(state.samples.first?.block == 0 && state.samples.last?.block == UInt64(Self.blocks - 1))
        #expect(try m.checkSourceAgainstStopState(src, given: "src.img") == .unchanged(seq: 0))

        // `touch`: the times move, the bytes do not.
        var times = [timespec(tv_sec: 1_000_000, tv_nsec: 0), timespec(tv_sec: 1_000_000, tv_nsec: 0)]
        let touched = futimens(src.fd, &times)
        #expect(touched == 0)
        #expect(try m.checkSourceAgainstStopState(src, given: "src.img") == .touched(seq: 0))

        // One byte in block 0, then in a sampled block further on: refused, naming the block.
        try Self.flip(src, at: 100)
        expectMessage(Self.changedMessage(dir, seq: 0, what: "block 0 differs from the mirror's latest point")) {
            _ = try m.checkSourceAgainstStopState(src, given: "src.img")
        }
        try Self.flip(src, at: 100)
        let middle = state.samples[state.samples.count / 2].block
        try Self.flip(src, at: middle * UInt64(Self.blockSize) + 4095)
        expectMessage(Self.changedMessage(dir, seq: 0, what: "block \(middle) differs from the mirror's latest point")) {
            _ = try m.checkSourceAgainstStopState(src, given: "src.img")
        }
        try Self.flip(src, at: middle * UInt64(Self.blockSize) + 4095)
        // A block no sample covers is not seen: what `verify --against` is for.
        let sampled = Set(state.samples.map(\.block))
        let unsampled = try #require((0..<UInt64(Self.blocks)).first { !sampled.contains($0) })
        try Self.flip(src, at: unsampled * UInt64(Self.blockSize))
        #expect(try m.checkSourceAgainstStopState(src, given: "src.img") == .touched(seq: 0))
        try Self.flip(src, at: unsampled * UInt64(Self.blockSize))

        // Grown by a block: refused on its size.
        try src.truncate(to: UInt64((Self.blocks + 1) * Self.blockSize))
        expectMessage(Self.changedMessage(dir, seq: 0, what: "it is \((Self.blocks + 1) * Self.blockSize) bytes, it was \(Self.blocks * Self.blockSize)")) {
            _ = try m.checkSourceAgainstStopState(src, given: "src.img")
        }
        try src.truncate(to: UInt64(Self.blocks * Self.blockSize))
        #expect(try m.checkSourceAgainstStopState(src, given: "src.img") == .touched(seq: 0))

        // A start deletes the state: a crash after it compares against nothing.
        try m.clearSourceState()
        #expect(try m.sourceState() == nil)
        #expect(try m.checkSourceAgainstStopState(src, given: "src.img") == .notRecorded)
    }

    @Test func onlyACleanStopRecordsAndOnlyAnUnmovedJournalCompares() throws {
        let dir = TempDir("state-seq")
        defer { dir.remove() }
        let (m, src) = try Self.served(dir)
        try #require(try m.recordSourceState(of: src) != nil)
        // The journal moved on since the stop (the source not yet known synced): not compared,
        // and no state is recorded while records may be missing from the source.
        try m.append([.write(0, [1, 2, 3])])
        try Self.flip(src, at: 0)
        #expect(try m.checkSourceAgainstStopState(src, given: "src.img") == .outdated(recordedSeq: 0))
        try m.clearSourceState()
        #expect(try m.recordSourceState(of: src) == nil)
        #expect(try m.sourceState() == nil)
        try src.write(at: 0, [1, 2, 3])
        try m.markSourceSynced(1)
        let state = try #require(try m.recordSourceState(of: src))
        #expect(state.lastSeq == 1)
        #expect(try m.checkSourceAgainstStopState(src, given: "src.img") == .unchanged(seq: 1))
        // A rollback forgets it as it begins: the source is reverted, or left behind the cut.
        _ = try m.rollback(to: .seq(0), source: nil)
        #expect(try m.sourceState() == nil)
    }

    @Test func aDamagedStateIsReportedNotFatal() throws {
        let dir = TempDir("state-damaged")
        defer { dir.remove() }
        let (m, src) = try Self.served(dir)
        try m.journal.env.write { txn in try txn.put(m.journal.meta, SourceState.key, [1, 2, 3]) }
        #expect(try m.checkSourceAgainstStopState(src, given: "src.img")
            == .unreadable("its record of the source at the last clean stop (journal meta \"source-state\") is 3 bytes, too short"))
        try m.clearSourceState()
        #expect(try m.sourceState() == nil)
    }
}

/// A rollback interrupted while reverting a source is finished only by a run reverting the
/// same file; one started without a source only without one. The interrupted run is the
/// state a crash at "rollback.target-recorded" leaves (`recordRollbackTarget`, synced).
@Suite struct PendingRollbackTests {
    static let blockSize = 512
    static let size = UInt64(64 * 512)

    /// A mirror of 40 random changes, its source at seq:40, and the volume at every seq.
    static func mirror(_ dir: TempDir) throws -> (Mirror, states: [[UInt8]]) {
        var rng = SplitMix(seed: 31)
        let m = try Mirror.create(at: dir.file("m"), size: size, blockSize: blockSize)
        var model = VolumeModel(size: size)
        var states = [model.bytes]
        for _ in 0..<40 {
            let c = randomChange(&rng, size: size, blockSize: blockSize)
            try m.append([c])
            model.apply(c)
            states.append(model.bytes)
        }
        try writeFile(dir.file("src.img"), model.bytes)
        try writeFile(dir.file("other.img"), model.bytes)
        return (m, states)
    }

    static func identity(_ path: String) throws -> SourceIdentity {
        let file = try BlockFile(path: path, mode: .readOnly)
        return try withExtendedLifetime(file) { try SourceIdentity(describing: file.fd, path: path) }
    }

    @Test func encodedPendingRollbackDecodesAndAnyFlippedByteIsDamage() throws {
        let dir = TempDir("pending-enc")
        defer { dir.remove() }
        try writeFile(dir.file("src.img"), [0])
        let identity = try Self.identity(dir.file("src.img"))
        for value in [PendingRollback(target: 20, source: nil), PendingRollback(target: 7, source: identity)] {
            let bytes = value.encoded()
            #expect(try bytes.withUnsafeBytes { try PendingRollback.decode($0, mirror: "m") } == value)
            for i in bytes.indices {
                var damaged = bytes
                damaged[i] ^= 0x10
                #expect(throws: RewindError.self, "byte \(i) flipped") {
                    try damaged.withUnsafeBytes { _ = try PendingRollback.decode($0, mirror: "m") }
                }
            }
            var flipped = bytes
            flipped[9] ^= 1
            expectMessage("mirror m is damaged: its record of the interrupted rollback's source (journal meta \"pending-rollback-source\") fails its checksum") {
                try flipped.withUnsafeBytes { _ = try PendingRollback.decode($0, mirror: "m") }
            }
        }
    }

    @Test func aRollbackRevertingASourceIsFinishedOnlyWithThatFile() throws {
        let dir = TempDir("pending-src")
        defer { dir.remove() }
        let (m, states) = try Self.mirror(dir)
        let (src, other) = (dir.file("src.img"), dir.file("other.img"))
        _ = try m.recordRollbackTarget(.seq(20), source: RollbackSource(path: src))
        try m.sync()
        let recorded = try Self.identity(src)
        let another = try Self.identity(other)
        let finish = "finish it with `rewind rollback \(m.path) --at seq:20 --source \(recorded.path) --yes`"
        #expect(try m.journal.env.read { try m.pendingRollback($0) } == PendingRollback(target: 20, source: recorded))

        expectMessage("an interrupted rollback to seq:20 was reverting \(recorded.path); \(finish)") {
            _ = try m.rollback(to: .seq(20), source: nil)
        }
        expectMessage("an interrupted rollback to seq:20 was reverting \(recorded), and \(another) is another file; \(finish)") {
            _ = try m.rollback(to: .seq(20), source: other)
        }
        expectMessage("an interrupted rollback to seq:20 must be finished before a rollback to seq:10; \(finish)") {
            _ = try m.rollback(to: .seq(10), source: src)
        }
        // What serve says: the same command.
        #expect(m.unfinishedRollbackError(target: 20).description == "an interrupted rollback to seq:20 is unfinished; \(finish)")
        // The refusals changed nothing: still pending, writers still stopped, no file written.
        #expect(try m.status().rollbackPending == 20)
        #expect(throws: RewindError.self) { _ = try m.append([.flush]) }
        #expect(fileBytes(src) == states[40] && fileBytes(other) == states[40])

        // The same file under another name (moved) finishes it.
        let moved = dir.file("moved.img")
        #expect(rename(src, moved) == 0)
        let r = try m.rollback(to: .seq(20), source: moved)
        #expect(r.toSeq == 20 && r.recordsRemoved == 20)
        #expect(fileBytes(moved) == states[20])
        #expect(fileBytes(other) == states[40])
        #expect(try m.status().rollbackPending == nil)
        #expect(try m.journal.env.read { try m.pendingRollback($0) } == nil)
        #expect(try readAll(m, at: .latest) == states[20])
    }

    @Test func aRollbackStartedWithoutASourceIsFinishedWithoutOne() throws {
        let dir = TempDir("pending-none")
        defer { dir.remove() }
        let (m, states) = try Self.mirror(dir)
        let src = dir.file("src.img")
        _ = try m.recordRollbackTarget(.seq(20), source: nil)
        try m.sync()
        expectMessage("an interrupted rollback to seq:20 was started without --source and may already have deleted records after seq:20 that reverting \(src) needs; finish it with `rewind rollback \(m.path) --at seq:20 --yes`") {
            _ = try m.rollback(to: .seq(20), source: src)
        }
        #expect(fileBytes(src) == states[40])
        let r = try m.rollback(to: .seq(20), source: nil)
        #expect(r.toSeq == 20)
        #expect(fileBytes(src) == states[40])  // not reverted: it was not started with one
        #expect(try m.journal.env.read { try m.pendingRollback($0) } == nil)
        // The next rollback records afresh, and reverts the source (brought to seq:20 first).
        try writeFile(src, states[20])
        _ = try m.rollback(to: .seq(10), source: src)
        #expect(fileBytes(src) == states[10])
    }

    @Test func aSourceOfAnotherSizeIsRefusedBeforeAnythingIsRecorded() throws {
        let dir = TempDir("pending-size")
        defer { dir.remove() }
        let (m, _) = try Self.mirror(dir)
        try writeFile(dir.file("small.img"), [UInt8](repeating: 1, count: 512))
        expectMessage("\(dir.file("small.img")) is 512 bytes but the mirror's volume is \(Self.size): not its source") {
            _ = try m.rollback(to: .seq(20), source: dir.file("small.img"))
        }
        #expect(try m.status().rollbackPending == nil)
        #expect(try m.journal.env.read { try m.pendingRollback($0) } == nil)
    }
}
