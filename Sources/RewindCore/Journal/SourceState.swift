import Glibc

/// What `serve` saw of its source when it stopped cleanly, so the next start can tell
/// cheaply whether something wrote the source without rewind in between. Recorded in the
/// `meta` database under the key "source-state" after the final fsync of a clean stop
/// (`Mirror.recordSourceState`), compared by the next start before anything is replayed or
/// served (`Mirror.checkSourceAgainstStopState`), and deleted by that start and by a
/// rollback as it begins (`clearSourceState`).
///
/// ```
/// offset size field
///   0     1   format        1
///   1     1   zero
///   2     2   sampleCount   n, 1...66
///   4     4   blockSize     bytes per sampled block: the mirror's block size
///   8     8   lastSeq       the mirror's lastSeq at the stop
///  16     8   generation    the mirror's generation at the stop
///  24     8   sizeBytes     the source's size (a block device's capacity)
///  32     8   modified      the source's st_mtim, ns since 1970 (two's complement)
///  40     8   changed       the source's st_ctim, ns since 1970 (two's complement)
///  48   16n   samples       n × (block u64, XXH3-64 of the block's bytes u64), blocks ascending
/// 48+16n  8   checksum      XXH3-64 of bytes 0..<48+16n
/// ```
/// Integers little-endian.
///
/// Why compare only when the journal did not move since the stop: after a clean stop the
/// source equals the mirror's latest point (invariant 2), so it must still hold what was
/// sampled. A start deletes the state before it serves, so after a crash there is none, and
/// the replay of the journal's tail brings the source up to date as before; a state whose
/// lastSeq or generation is not the mirror's (something appended or rolled back since) is
/// not compared either.
///
/// Why samples: a start must not read the whole volume. 66 one-block reads — the first
/// block, the last, and one at a random place in each 64th of the volume, placed from the
/// mirror's UUID and lastSeq so each stop samples elsewhere — catch a resize, anything that
/// rewrote a good part of the volume (an image copied over it, a `mkfs`: a change to a tenth
/// of the blocks escapes all 64 spread samples once in ~850), the first and last blocks
/// (partition tables, a GPT's backup header) and, on a volume of at most 66 blocks, any
/// change. A few scattered blocks written behind rewind's back are likely missed; `rewind
/// verify MIRROR --against SOURCE` reads everything. The times decide nothing on their own:
/// `touch`, a backup tool restoring them or a copy of the same bytes moves them without
/// changing the volume; a start that finds them moved but every sample equal logs a notice.
public struct SourceState: Equatable, Sendable {
    /// One sampled block and the XXH3-64 of its bytes at the stop.
    public struct Sample: Equatable, Sendable {
        public var block: UInt64
        public var hash: UInt64

        public init(block: UInt64, hash: UInt64) {
            self.block = block
            self.hash = hash
        }
    }

    static let format: UInt8 = 1
    static let key = Array("source-state".utf8)
    static let headerBytes = 48
    static let sampleBytes = 16
    /// Blocks sampled at spread places besides the first and the last: a start reads 66
    /// blocks whatever the volume's size (at most 66 MiB at the largest block size).
    public static let spreadSamples = 64
    /// Every sample there can be: the spread ones, the first block and the last.
    public static let samplesMax = spreadSamples + 2

    public var lastSeq: UInt64
    public var generation: UInt64
    public var blockSize: UInt32
    public var sizeBytes: UInt64
    /// `st_mtim` in ns since 1970.
    public var modifiedNanoseconds: Int64
    /// `st_ctim` in ns since 1970.
    public var changedNanoseconds: Int64
    /// Ascending, no block twice.
    public var samples: [Sample]

    public init(lastSeq: UInt64, generation: UInt64, blockSize: UInt32, sizeBytes: UInt64,
                modifiedNanoseconds: Int64, changedNanoseconds: Int64, samples: [Sample]) {
        self.lastSeq = lastSeq
        self.generation = generation
        self.blockSize = blockSize
        self.sizeBytes = sizeBytes
        self.modifiedNanoseconds = modifiedNanoseconds
        self.changedNanoseconds = changedNanoseconds
        self.samples = samples
    }

    // MARK: sampling

    /// The blocks a stop at `lastSeq` samples on a volume of `blockCount` blocks: every block of
    /// a volume of at most `samplesMax`; else block 0, the last block, and one block at a
    /// pseudo-random place in each of `spreadSamples` equal stretches of the volume, the places
    /// a function of the mirror's `uuid` and `lastSeq` (stable for one stop, different for the
    /// next). Ascending, without repeats.
    static func sampleBlocks(blockCount: UInt64, uuid: [UInt8], lastSeq: UInt64) -> [UInt64] {
        if blockCount <= UInt64(samplesMax) { return Array(0..<blockCount) }
        let seed = xxh3(uuid, seed: lastSeq)
        let n = UInt64(spreadSamples)
        // Stretch i is [start(i), start(i + 1)): q or q + 1 blocks, q >= 1 since blockCount > n.
        let (q, r) = blockCount.quotientAndRemainder(dividingBy: n)
        func start(_ i: UInt64) -> UInt64 { i * q + min(i, r) }
        var blocks: [UInt64] = [0, blockCount - 1]
        for i in 0..<n {
            let width = start(i + 1) - start(i)
            blocks.append(start(i) + splitMix64(seed &+ i &* 0x9E37_79B9_7F4A_7C15) % width)
        }
        return Array(Set(blocks)).sorted()
    }

    /// SplitMix64's output function: a well-mixed 64-bit value from a counter.
    private static func splitMix64(_ x: UInt64) -> UInt64 {
        var z = x &+ 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// What `file` holds now: its size, times, and the XXH3-64 of each of `blocks` (`pread`,
    /// one block at a time).
    static func capture(_ file: BlockFile, blockSize: Int, blocks: [UInt64], lastSeq: UInt64,
                        generation: UInt64) throws -> SourceState {
        precondition(blocks.count <= samplesMax, "\(blocks.count) samples")
        let observed = try Observed(file)
        var buffer = [UInt8](repeating: 0, count: blockSize)
        var samples: [Sample] = []
        samples.reserveCapacity(blocks.count)
        for block in blocks {
            try buffer.withUnsafeMutableBytes { try file.read(at: block * UInt64(blockSize), into: $0) }
            samples.append(Sample(block: block, hash: xxh3(buffer)))
        }
        return SourceState(lastSeq: lastSeq, generation: generation, blockSize: UInt32(blockSize),
                           sizeBytes: try file.size(), modifiedNanoseconds: observed.modifiedNanoseconds,
                           changedNanoseconds: observed.changedNanoseconds, samples: samples)
    }

    /// How `file` differs from what was recorded, the first thing found: its size, else the
    /// lowest sampled block whose bytes hash differently. nil: size and every sample match.
    func firstDifference(in file: BlockFile) throws -> Difference? {
        let size = try file.size()
        if size != sizeBytes { return .size(recorded: sizeBytes, now: size) }
        var buffer = [UInt8](repeating: 0, count: Int(blockSize))
        for sample in samples {
            try buffer.withUnsafeMutableBytes { try file.read(at: sample.block * UInt64(blockSize), into: $0) }
            if xxh3(buffer) != sample.hash { return .block(sample.block) }
        }
        return nil
    }

    /// What a start found changed in the source.
    enum Difference: Equatable, CustomStringConvertible {
        case size(recorded: UInt64, now: UInt64)
        case block(UInt64)

        var description: String {
            switch self {
            case let .size(recorded, now): return "it is \(now) bytes, it was \(recorded)"
            case let .block(b): return "block \(b) differs from the mirror's latest point"
            }
        }
    }

    /// What `fstat` says of the source beside its bytes.
    struct Observed {
        var modifiedNanoseconds: Int64
        var changedNanoseconds: Int64
        var isBlockDevice: Bool

        /// The corresponding C function is `fstat`.
        init(_ file: BlockFile) throws {
            var st = stat()
            guard fstat(file.fd, &st) == 0 else { throw RewindError.io(path: file.path, operation: "fstat", errno: errno) }
            func nanoseconds(_ t: timespec) -> Int64 { Int64(t.tv_sec) &* 1_000_000_000 &+ Int64(t.tv_nsec) }
            modifiedNanoseconds = nanoseconds(st.st_mtim)
            changedNanoseconds = nanoseconds(st.st_ctim)
            isBlockDevice = (st.st_mode & S_IFMT) == S_IFBLK
        }
    }

    // MARK: encoding

    func encoded() -> [UInt8] {
        precondition(!samples.isEmpty && samples.count <= Self.samplesMax, "\(samples.count) samples")
        var b: [UInt8] = [Self.format, 0]
        b.reserveCapacity(Self.headerBytes + samples.count * Self.sampleBytes + 8)
        b.appendLE(UInt16(samples.count))
        b.appendLE(blockSize)
        b.appendLE(lastSeq)
        b.appendLE(generation)
        b.appendLE(sizeBytes)
        b.appendLE(UInt64(bitPattern: modifiedNanoseconds))
        b.appendLE(UInt64(bitPattern: changedNanoseconds))
        for s in samples {
            b.appendLE(s.block)
            b.appendLE(s.hash)
        }
        b.appendLE(xxh3(b))
        return b
    }

    /// Decode a stored value; anything malformed is `damagedMirror` naming `mirror`.
    static func decode(_ raw: UnsafeRawBufferPointer, mirror: String) throws -> SourceState {
        func damaged(_ why: String) -> RewindError {
            RewindError.damagedMirror(path: mirror, why: "its record of the source at the last clean stop (journal meta \"source-state\") \(why)")
        }
        guard raw.count >= Self.headerBytes + 8 else { throw damaged("is \(raw.count) bytes, too short") }
        let format = raw[0]
        guard format == Self.format else {
            throw damaged(format > Self.format ? "has format \(format), newer than this rewind understands (\(Self.format))"
                                               : "has unknown format \(format)")
        }
        let n = Int(raw.loadLE(at: 2, as: UInt16.self))
        guard n >= 1, n <= Self.samplesMax, raw.count == Self.headerBytes + n * Self.sampleBytes + 8 else {
            throw damaged("is \(raw.count) bytes for \(n) samples")
        }
        let end = Self.headerBytes + n * Self.sampleBytes
        guard xxh3(UnsafeRawBufferPointer(rebasing: raw[0..<end])) == raw.loadLE(at: end, as: UInt64.self) else {
            throw damaged("fails its checksum")
        }
        var state = SourceState(lastSeq: raw.loadLE(at: 8, as: UInt64.self), generation: raw.loadLE(at: 16, as: UInt64.self),
                                blockSize: raw.loadLE(at: 4, as: UInt32.self), sizeBytes: raw.loadLE(at: 24, as: UInt64.self),
                                modifiedNanoseconds: Int64(bitPattern: raw.loadLE(at: 32, as: UInt64.self)),
                                changedNanoseconds: Int64(bitPattern: raw.loadLE(at: 40, as: UInt64.self)), samples: [])
        state.samples.reserveCapacity(n)
        for i in 0..<n {
            let at = Self.headerBytes + i * Self.sampleBytes
            state.samples.append(Sample(block: raw.loadLE(at: at, as: UInt64.self), hash: raw.loadLE(at: at + 8, as: UInt64.self)))
        }
        let bs = state.blockSize
        let blockCount = bs == 0 ? 0 : state.sizeBytes / UInt64(bs)
        let ascending = zip(state.samples, state.samples.dropFirst()).allSatisfy { $0.block < $1.block }
        guard raw[1] == 0, bs >= 512, bs <= 1 << 20, bs & (bs - 1) == 0, ascending,
              let last = state.samples.last, last.block < blockCount else {
            throw damaged("has inconsistent fields")
        }
        return state
    }
}

/// What serve's start found when it compared the source with the last clean stop.
public enum SourceStateCheck: Equatable, Sendable {
    /// No state recorded: the last stop was not clean (a crash, a fenced volume), a start or a
    /// rollback came since, or no `serve` recorded one yet. Nothing compared.
    case notRecorded
    /// Recorded at seq `recordedSeq`, but the journal moved on or was rolled back since. Nothing compared.
    case outdated(recordedSeq: UInt64)
    /// Size, times and every sample as the stop at seq `seq` left them.
    case unchanged(seq: UInt64)
    /// Size and every sample as the stop at seq `seq` left them, but mtime or ctime moved.
    case touched(seq: UInt64)
    /// The record is damaged (`why`): nothing compared.
    case unreadable(String)
}

extension Mirror {
    /// The state the last clean stop of `serve` recorded, or nil. A damaged value throws
    /// `damagedMirror`.
    public func sourceState() throws -> SourceState? {
        let (j, path) = (journal, self.path)
        return try j.env.read { txn in
            guard let raw = try txn.get(j.meta, SourceState.key) else { return nil }
            return try SourceState.decode(raw, mirror: path)
        }
    }

    /// At a clean stop of `serve`, after the final fsync and before `owner.lock` is released:
    /// record what `source` holds now (size, times, sampled blocks), durably. Only when the
    /// source is known synced up to the journal's latest record and no rollback is pending —
    /// else the stop was not clean, and the next start brings the source to the journal
    /// instead. Returns the state recorded, or nil.
    @discardableResult
    public func recordSourceState(of source: BlockFile) throws -> SourceState? {
        let m = try meta()
        guard m.sourceSyncedSeq == m.lastSeq, m.pendingRollback == MirrorMeta.none,
              try source.size() == volumeSize else { return nil }
        let blocks = SourceState.sampleBlocks(blockCount: volumeSize / UInt64(blockSize), uuid: uuid, lastSeq: m.lastSeq)
        let state = try SourceState.capture(source, blockSize: blockSize, blocks: blocks, lastSeq: m.lastSeq,
                                            generation: m.generation)
        // The blocks were read outside the transaction: record them only if the journal has
        // not moved meanwhile.
        let j = journal
        let stored = try j.env.write { txn -> Bool in
            let now = try j.readMeta(txn)
            guard now.lastSeq == m.lastSeq, now.generation == m.generation, now.sourceSyncedSeq == now.lastSeq,
                  now.pendingRollback == MirrorMeta.none else { return false }
            try txn.put(j.meta, SourceState.key, state.encoded())
            return true
        }
        guard stored else { return nil }
        try sync()
        return state
    }

    /// At the start of `serve`, before anything is replayed into or served from `source` (given
    /// on the command line as `given`): compare it with what the last clean stop recorded, if
    /// that stop is still the journal's latest point. Throws `sourceChanged`, whose message holds
    /// the recovery, when its size or a sampled block differs.
    public func checkSourceAgainstStopState(_ source: BlockFile, given: String) throws -> SourceStateCheck {
        let m = try meta()
        let recorded: SourceState?
        do {
            recorded = try sourceState()
        } catch RewindError.damagedMirror(_, let why) {
            return .unreadable(why)
        }
        guard let state = recorded else { return .notRecorded }
        guard state.lastSeq == m.lastSeq, state.generation == m.generation else {
            return .outdated(recordedSeq: state.lastSeq)
        }
        guard state.blockSize == UInt32(blockSize) else {
            return .unreadable("its record of the source at the last clean stop (journal meta \"source-state\") samples \(state.blockSize)-byte blocks, the mirror's are \(blockSize) bytes")
        }
        let observed = try SourceState.Observed(source)
        if let difference = try state.firstDifference(in: source) {
            throw RewindError.sourceChanged(source: given, mirror: withoutTrailingSlashes(path), seq: state.lastSeq,
                                            what: difference.description, isBlockDevice: observed.isBlockDevice)
        }
        let untouched = observed.modifiedNanoseconds == state.modifiedNanoseconds
            && observed.changedNanoseconds == state.changedNanoseconds
        return untouched ? .unchanged(seq: state.lastSeq) : .touched(seq: state.lastSeq)
    }

    /// Delete the state a clean stop recorded, durably. A start of `serve` calls it once it has
    /// compared the source, so that no later start — after a crash — compares against a stop
    /// that is no longer the last thing that happened to the source.
    public func clearSourceState() throws {
        let j = journal
        let deleted = try j.env.write { txn -> Bool in try txn.delete(j.meta, SourceState.key) }
        if deleted { try sync() }
    }
}
