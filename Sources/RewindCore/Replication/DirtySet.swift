/// The blocks written since a replication peer's position, kept for a peer too far behind to
/// be sent the journal's records: when it returns it is sent these blocks' current contents
/// (as DRBD's bitmap). Its file is meant to be `MIRROR/peers/ID.dirty`.
///
/// A Roaring-style compressed bitmap. A block number splits into a key (`block >> 16`) and
/// its low 16 bits; each key holds a container of low values (one chunk of 65,536 blocks), in
/// whichever of three forms encodes smallest:
///
/// - array: the values ascending, 2 bytes each — while there are at most 4096 (8 KiB, the
///   bitmap's size; at 4096 the array wins the tie);
/// - bitmap: 65,536 bits in 1024 words, 8 KiB whatever it holds;
/// - runs: maximal runs of consecutive values (start, length − 1), 4 bytes each — when that is
///   smaller than both of the others.
///
/// So a set never takes more than a plain bitmap of its chunks (8 KiB per 64 Ki blocks: 32 MiB
/// per TiB at 4 KiB blocks) plus 16 bytes per chunk, and a volume written in long extents costs
/// a few bytes per extent: a fully written TiB is 4096 one-run containers, 96 KiB. The form
/// follows from the values alone, so equal sets are stored alike and `==` compares containers.
/// Block numbers stay below 2^63, so one past a run's last block always fits in a UInt64.
///
/// Encoded (`encoded()`, `decode`), integers little-endian:
/// ```
///  0  8  magic       "RWDIRTY1" (its last byte is the format version)
///  8  8  count       blocks in the set: the sum of the containers' values
/// 16  4  containers  how many containers follow
/// 20  4  zero
/// then each container, keys strictly ascending:
///  0  8  key         block >> 16, below 2^47
///  8  1  kind        1 array, 2 bitmap, 3 runs
///  9  1  zero
/// 10  2  zero
/// 12  4  n           array: values (1...4096); bitmap: words (1024); runs: runs (1...2047)
/// 16     body        array:  n × u16, strictly ascending
///                    bitmap: 1024 × u64; value v is bit v % 64 of word v / 64
///                    runs:   n × (u16 start, u16 length − 1), ascending, neither overlapping
///                            nor touching, none past 65535
///        zeros       to a multiple of 8 bytes
/// last 8: XXH3-64 of every byte before it
/// ```
/// A container is stored only in its smallest form; `decode` refuses any other, as it refuses
/// every malformed input with `RewindError.damagedFile` (it never traps).
public struct DirtySet: Sendable, Equatable {
    /// The containers by key (`block >> 16`); none is empty.
    var chunks: [UInt64: Container] = [:]
    /// Number of blocks in the set.
    public private(set) var count: UInt64 = 0

    /// Values a container covers: the low 16 bits of a block number.
    static let chunkValues = 1 << 16
    /// Most values an array holds: 4096 × 2 bytes is the bitmap's 8 KiB.
    static let arrayMax = 4096
    /// Words of a bitmap container.
    static let bitmapWords = 1024
    /// Bytes of a bitmap body: 65,536 bits.
    static let bitmapBytes = 8192
    /// Most runs a runs container holds: 4 bytes each, fewer than the bitmap's 8192.
    static let runsMax = bitmapBytes / 4 - 1
    /// Block numbers stay below this, so a run's end (one past its last block) fits in a UInt64;
    /// 2^63 blocks of 512 bytes is far past any volume.
    static let blockLimit: UInt64 = 1 << 63
    static let keyLimit: UInt64 = blockLimit >> 16
    static let magic: [UInt8] = Array("RWDIRTY1".utf8)
    static let headerSize = 24
    static let containerHeaderSize = 16
    static let checksumSize = 8

    public init() {}

    public var isEmpty: Bool { count == 0 }

    public mutating func insert(_ block: UInt64) {
        precondition(block < Self.blockLimit, "block \(block) is past the dirty set's limit 2^63")
        let low = Int(block & 0xFFFF)
        insert(key: block >> 16, low, low)
    }

    /// Insert every block of `blocks`. Whole chunks become one run each without looking at
    /// what they held, so a TiB (4096 chunks at 4 KiB blocks) takes 4096 dictionary stores.
    public mutating func insert(_ blocks: Range<UInt64>) {
        guard !blocks.isEmpty else { return }
        precondition(blocks.upperBound <= Self.blockLimit, "blocks \(blocks) run past the dirty set's limit 2^63")
        let last = blocks.upperBound - 1
        let firstKey = blocks.lowerBound >> 16, lastKey = last >> 16
        for key in firstKey...lastKey {
            let lo = key == firstKey ? Int(blocks.lowerBound & 0xFFFF) : 0
            let hi = key == lastKey ? Int(last & 0xFFFF) : 0xFFFF
            insert(key: key, lo, hi)
        }
    }

    /// Add low values `lo...hi` of chunk `key`.
    private mutating func insert(key: UInt64, _ lo: Int, _ hi: Int) {
        if lo == 0 && hi == 0xFFFF {
            let old = chunks.updateValue(Container.full, forKey: key)
            count += UInt64(Self.chunkValues - (old?.cardinality ?? 0))
        } else if let added = chunks[key]?.insert(lo, through: hi) {
            count += UInt64(added)
        } else {
            chunks[key] = Container(runs: [Run(lo, hi)])
            count += UInt64(hi - lo + 1)
        }
    }

    public mutating func formUnion(_ other: DirtySet) {
        for (key, theirs) in other.chunks {
            if let mine = chunks[key] {
                let merged = mine.union(theirs)
                count += UInt64(merged.cardinality - mine.cardinality)
                chunks[key] = merged
            } else {
                chunks[key] = theirs
                count += UInt64(theirs.cardinality)
            }
        }
    }

    public func contains(_ block: UInt64) -> Bool {
        guard let c = chunks[block >> 16] else { return false }
        return c.contains(Int(block & 0xFFFF))
    }

    /// The set as ascending, maximal runs of consecutive blocks (runs that continue across
    /// chunk boundaries are merged into one range).
    public func forEachRun(_ body: (Range<UInt64>) throws -> Void) rethrows {
        var runs = RunIterator(self)
        while let run = runs.next() { try body(run) }
    }

    /// Bytes of `encoded()`, computed without encoding.
    public var encodedSize: Int {
        var size = Self.headerSize + Self.checksumSize
        for c in chunks.values { size += Self.containerHeaderSize + c.paddedBodySize }
        return size
    }

    /// The persistent form (the layout above).
    public func encoded() -> [UInt8] {
        precondition(chunks.count <= Int(UInt32.max), "a dirty set of \(chunks.count) containers does not fit its format")
        var out: [UInt8] = []
        out.reserveCapacity(encodedSize)
        out.append(contentsOf: Self.magic)
        out.appendLE(count)
        out.appendLE(UInt32(chunks.count))
        out.appendLE(UInt32(0))
        for key in chunks.keys.sorted() {
            guard let c = chunks[key] else { continue }
            out.appendLE(key)
            out.append(c.kind.rawValue)
            out.append(0)
            out.appendLE(UInt16(0))
            switch c.form {
            case .array(let values):
                out.appendLE(UInt32(values.count))
                for v in values { out.appendLE(v) }
            case .bitmap(let words):
                out.appendLE(UInt32(words.count))
                for w in words { out.appendLE(w) }
            case .runs(let runs):
                out.appendLE(UInt32(runs.count))
                for r in runs {
                    out.appendLE(r.start)
                    out.appendLE(r.lengthMinusOne)
                }
            }
            // The headers are multiples of 8 bytes, so padding the whole pads the body.
            while out.count % 8 != 0 { out.append(0) }
        }
        let checksum = xxh3(out)
        out.appendLE(checksum)
        return out
    }

    /// Decode `encoded()`'s bytes. Throws `RewindError.damagedFile(what:why:)` ("`what` is
    /// damaged: …") for anything else: another magic or version, a short file, a checksum
    /// mismatch, keys out of order, values or runs out of order, counts out of range, a
    /// container not in its smallest form, a header count its containers do not add up to.
    public static func decode(_ bytes: [UInt8], what: String) throws -> DirtySet {
        func damaged(_ why: String) -> RewindError { .damagedFile(what: what, why: why) }
        if bytes.count >= magic.count {
            guard bytes[0..<7].elementsEqual(magic[0..<7]) else {
                throw damaged("it is not a dirty set (it does not begin with RWDIRTY1)")
            }
            let version = bytes[7]
            guard version == magic[7] else {
                if version >= 0x30 && version <= 0x39 {
                    throw damaged("it is dirty-set format version \(version - 0x30); this rewind reads version 1")
                }
                throw damaged("it is not a dirty set (it does not begin with RWDIRTY1)")
            }
        }
        let smallest = headerSize + checksumSize
        guard bytes.count >= smallest else {
            throw damaged("it is truncated: \(bytes.count) bytes, where a dirty set takes at least \(smallest)")
        }
        return try bytes.withUnsafeBytes { raw in
            let end = raw.count - checksumSize
            guard xxh3(UnsafeRawBufferPointer(rebasing: raw[0..<end])) == raw.loadLE(at: end, as: UInt64.self) else {
                throw damaged("its checksum does not match")
            }
            return try parse(raw, end: end, damaged)
        }
    }

    /// The header and containers of a checksummed encoding (`raw[0..<end]`): every length is
    /// checked against what is left before it is read.
    private static func parse(_ raw: UnsafeRawBufferPointer, end: Int, _ damaged: (String) -> RewindError) throws -> DirtySet {
        let headerCount = raw.loadLE(at: 8, as: UInt64.self)
        let containers = Int(raw.loadLE(at: 16, as: UInt32.self))
        guard raw.loadLE(at: 20, as: UInt32.self) == 0 else { throw damaged("its header's reserved bytes are not zero") }
        // The smallest container is 24 bytes: bound the count before reserving for it.
        guard containers <= (end - headerSize) / (containerHeaderSize + 8) else {
            throw damaged("its header names \(containers) containers, more than its \(raw.count) bytes hold")
        }
        var set = DirtySet()
        set.chunks.reserveCapacity(containers)
        var at = headerSize
        var previous: UInt64?
        var total: UInt64 = 0
        for index in 0..<containers {
            guard end - at >= containerHeaderSize else { throw damaged("it is truncated in container \(index)") }
            let key = raw.loadLE(at: at, as: UInt64.self)
            let kindByte = raw[at + 8]
            let n = Int(raw.loadLE(at: at + 12, as: UInt32.self))
            guard raw[at + 9] == 0 && raw.loadLE(at: at + 10, as: UInt16.self) == 0 else {
                throw damaged("container \(index)'s reserved bytes are not zero")
            }
            guard key < keyLimit else { throw damaged("container \(index)'s key \(key) is past the largest block number") }
            if let p = previous, key <= p {
                throw damaged("its container keys are not strictly ascending (key \(key) follows \(p))")
            }
            previous = key
            at += containerHeaderSize
            guard let kind = Container.Kind(rawValue: kindByte) else {
                throw damaged("container \(index) has unknown kind \(kindByte)")
            }
            let body: Int
            switch kind {
            case .array:
                guard n >= 1 && n <= arrayMax else { throw damaged("container \(index) holds \(n) array values (1...\(arrayMax) allowed)") }
                body = 2 * n
            case .bitmap:
                guard n == bitmapWords else { throw damaged("container \(index)'s bitmap has \(n) words, not \(bitmapWords)") }
                body = bitmapBytes
            case .runs:
                guard n >= 1 && n <= runsMax else { throw damaged("container \(index) holds \(n) runs (1...\(runsMax) allowed)") }
                body = 4 * n
            }
            let padded = (body + 7) & ~7
            guard end - at >= padded else { throw damaged("it is truncated in container \(index)") }
            let container = try Container.decode(raw, at: at, kind: kind, n: n) { damaged("container \(index)'s \($0)") }
            for i in (at + body)..<(at + padded) where raw[i] != 0 {
                throw damaged("container \(index)'s padding is not zero")
            }
            let best = Container.Kind.smallest(cardinality: container.cardinality, runCount: container.runCount)
            guard best == kind else {
                throw damaged("container \(index) is stored as \(kind) where \(best) would be smaller")
            }
            at += padded
            // At most 2^32 containers of 65,536 values: no overflow.
            total += UInt64(container.cardinality)
            set.chunks[key] = container
        }
        guard at == end else { throw damaged("\(end - at) bytes follow its last container") }
        guard total == headerCount else {
            throw damaged("its header counts \(headerCount) blocks where its containers hold \(total)")
        }
        set.count = total
        return set
    }

    /// For the benchmark: a set over a volume of `blocks` blocks with about `dirtyFraction` of
    /// them, and its encoded size. Random: each block independently with that probability
    /// (built a chunk of bitmap words at a time). Clustered: runs of 256 blocks (1 MiB at
    /// 4 KiB) at random places until the fraction is reached. 2^28 blocks (a TiB at 4 KiB)
    /// take seconds and at most the set itself (≤ 8 KiB per chunk).
    public static func sizeReport(blocks: UInt64, dirtyFraction: Double, clustered: Bool, seed: UInt64) -> (count: UInt64, bytes: Int) {
        let set = clustered
            ? clusteredSample(blocks: blocks, fraction: dirtyFraction, seed: seed)
            : randomSample(blocks: blocks, probability: dirtyFraction, seed: seed)
        return (set.count, set.encodedSize)
    }

    /// Each block of `0..<blocks` with probability `probability`, drawn from `seed`.
    static func randomSample(blocks: UInt64, probability: Double, seed: UInt64) -> DirtySet {
        precondition(blocks <= blockLimit, "a volume of \(blocks) blocks is past the dirty set's limit 2^63")
        var set = DirtySet()
        guard blocks > 0, probability > 0 else { return set }
        if probability >= 1 { set.insert(0..<blocks); return set }
        let scaled = probability * 0x1p64
        let threshold = scaled >= 0x1p64 ? UInt64.max : UInt64(scaled)
        var rng = SampleRandom(state: seed)
        var words = [UInt64](repeating: 0, count: bitmapWords)
        let chunkCount = ((blocks - 1) >> 16) + 1
        for key in 0..<chunkCount {
            let inChunk = Int(min(blocks - (key << 16), UInt64(chunkValues)))
            for k in 0..<bitmapWords {
                var w: UInt64 = 0
                let bits = min(64, inChunk - k * 64)
                if bits > 0 {
                    for b in 0..<bits where rng.next() < threshold { w |= 1 &<< UInt64(b) }
                }
                words[k] = w
            }
            let c = Container(words: words)
            guard c.cardinality > 0 else { continue }
            set.chunks[key] = c
            set.count += UInt64(c.cardinality)
        }
        return set
    }

    /// Runs of 256 blocks at random places in `0..<blocks` until `fraction` of them are in.
    static func clusteredSample(blocks: UInt64, fraction: Double, seed: UInt64) -> DirtySet {
        precondition(blocks <= blockLimit, "a volume of \(blocks) blocks is past the dirty set's limit 2^63")
        var set = DirtySet()
        guard blocks > 0, fraction > 0 else { return set }
        let target = fraction >= 1 ? blocks : min(blocks, UInt64((Double(blocks) * fraction).rounded()))
        // Every block at once: waiting for random runs to cover the last few would take long.
        if target == blocks { set.insert(0..<blocks); return set }
        let length = min(256, blocks)
        var rng = SampleRandom(state: seed)
        while set.count < target {
            let start = rng.next() % (blocks - length + 1)
            set.insert(start..<(start + length))
        }
        return set
    }
}

/// SplitMix64: `sizeReport`'s samples, the same for the same seed.
private struct SampleRandom {
    var state: UInt64

    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

extension DirtySet {
    /// A run of consecutive low values: `start...start + lengthMinusOne`.
    struct Run: Sendable, Equatable {
        var start: UInt16
        var lengthMinusOne: UInt16

        init(start: UInt16, lengthMinusOne: UInt16) {
            self.start = start
            self.lengthMinusOne = lengthMinusOne
        }

        /// The run `lo...hi` (0 ≤ lo ≤ hi ≤ 65535).
        init(_ lo: Int, _ hi: Int) {
            self.init(start: UInt16(lo), lengthMinusOne: UInt16(hi - lo))
        }

        var first: Int { Int(start) }
        var last: Int { Int(start) + Int(lengthMinusOne) }
    }

    /// The low values of one chunk, in their smallest form, with the two numbers that choose it.
    struct Container: Sendable, Equatable {
        enum Form: Sendable, Equatable {
            case array([UInt16])
            case bitmap([UInt64])
            case runs([Run])
        }

        /// The `kind` byte of the encoding.
        enum Kind: UInt8, Sendable, CustomStringConvertible {
            case array = 1, bitmap = 2, runs = 3

            /// The form that encodes `cardinality` values in `runCount` runs in the fewest bytes
            /// (array 2 per value, bitmap 8192, runs 4 per run); an array wins its tie with the bitmap.
            static func smallest(cardinality: Int, runCount: Int) -> Kind {
                if 4 * runCount < min(2 * cardinality, DirtySet.bitmapBytes) { return .runs }
                return cardinality <= DirtySet.arrayMax ? .array : .bitmap
            }

            var description: String {
                switch self {
                case .array: return "an array"
                case .bitmap: return "a bitmap"
                case .runs: return "runs"
                }
            }
        }

        private(set) var form: Form
        /// Values held.
        private(set) var cardinality: Int
        /// Maximal runs of consecutive values.
        private(set) var runCount: Int

        /// Every value of the chunk: one run.
        static let full = Container(runs: [Run(0, 0xFFFF)])

        private init(form: Form, cardinality: Int, runCount: Int) {
            self.form = form
            self.cardinality = cardinality
            self.runCount = runCount
        }

        /// The values of `runs` (ascending, neither overlapping nor touching), in their smallest form.
        init(runs: [Run]) {
            var n = 0
            for r in runs { n += Int(r.lengthMinusOne) + 1 }
            switch Kind.smallest(cardinality: n, runCount: runs.count) {
            case .runs: self.init(form: .runs(runs), cardinality: n, runCount: runs.count)
            case .array: self.init(form: .array(Self.array(ofRuns: runs, count: n)), cardinality: n, runCount: runs.count)
            case .bitmap: self.init(form: .bitmap(Self.words(ofRuns: runs)), cardinality: n, runCount: runs.count)
            }
        }

        /// The values of 1024 bitmap words, in their smallest form.
        init(words: [UInt64]) {
            var n = 0, r = 0
            for k in words.indices {
                n += words[k].nonzeroBitCount
                r += Self.runStarts(words, k).nonzeroBitCount
            }
            switch Kind.smallest(cardinality: n, runCount: r) {
            case .bitmap: self.init(form: .bitmap(words), cardinality: n, runCount: r)
            case .runs: self.init(form: .runs(Self.runs(ofWords: words)), cardinality: n, runCount: r)
            case .array: self.init(form: .array(Self.array(ofRuns: Self.runs(ofWords: words), count: n)), cardinality: n, runCount: r)
            }
        }

        var kind: Kind {
            switch form {
            case .array: return .array
            case .bitmap: return .bitmap
            case .runs: return .runs
            }
        }

        /// Bytes of the encoded body, padded to a multiple of 8.
        var paddedBodySize: Int {
            let body: Int
            switch form {
            case .array(let values): body = 2 * values.count
            case .bitmap: body = DirtySet.bitmapBytes
            case .runs(let runs): body = 4 * runs.count
            }
            return (body + 7) & ~7
        }

        func contains(_ v: Int) -> Bool {
            switch form {
            case .array(let values):
                let i = Self.partitionPoint(values.count) { Int(values[$0]) >= v }
                return i < values.count && Int(values[i]) == v
            case .bitmap(let words):
                return (words[v >> 6] &>> UInt64(v & 63)) & 1 == 1
            case .runs(let runs):
                let i = Self.partitionPoint(runs.count) { runs[$0].last >= v }
                return i < runs.count && runs[i].first <= v
            }
        }

        /// Add `lo...hi` (0 ≤ lo ≤ hi ≤ 65535), staying in the smallest form; returns how many
        /// values were new. Counts change in place where they can, so adding to a full array or
        /// bitmap costs the values touched, not the container.
        mutating func insert(_ lo: Int, through hi: Int) -> Int {
            let before = cardinality
            switch form {
            case .array(var values):
                form = .runs([])  // `values` now holds the only reference: changed in place
                insert(lo, hi, intoArray: &values)
            case .bitmap(var words):
                form = .runs([])
                insert(lo, hi, intoBitmap: &words)
            case .runs(var runs):
                form = .runs([])
                let change = Self.merge(&runs, lo, hi)
                let n = cardinality + change.values, r = runCount + change.runs
                if Kind.smallest(cardinality: n, runCount: r) == .runs {
                    self = Container(form: .runs(runs), cardinality: n, runCount: r)
                } else {
                    self = Container(runs: runs)
                }
            }
            return cardinality - before
        }

        private mutating func insert(_ lo: Int, _ hi: Int, intoArray values: inout [UInt16]) {
            let i = Self.partitionPoint(values.count) { Int(values[$0]) >= lo }
            let j = Self.partitionPoint(values.count) { Int(values[$0]) > hi }
            let added = (hi - lo + 1) - (j - i)
            guard added > 0 else { form = .array(values); return }
            // The runs with a value in lo - 1...hi + 1 merge with lo...hi into one.
            let from = i > 0 && Int(values[i - 1]) == lo - 1 ? i - 1 : i
            let to = j < values.count && Int(values[j]) == hi + 1 ? j + 1 : j
            var met = from < to ? 1 : 0
            if from + 1 < to {
                for k in (from + 1)..<to where Int(values[k]) != Int(values[k - 1]) + 1 { met += 1 }
            }
            let n = cardinality + added, r = runCount + 1 - met
            if Kind.smallest(cardinality: n, runCount: r) == .array {
                if lo == hi {
                    values.insert(UInt16(lo), at: i)  // added > 0: lo is not there yet
                } else {
                    values.replaceSubrange(i..<j, with: (lo...hi).map { UInt16($0) })
                }
                self = Container(form: .array(values), cardinality: n, runCount: r)
            } else {
                var runs = Self.runs(ofArray: values)
                Self.merge(&runs, lo, hi)
                self = Container(runs: runs)
            }
        }

        private mutating func insert(_ lo: Int, _ hi: Int, intoBitmap words: inout [UInt64]) {
            let added = (hi - lo + 1) - Self.countBits(lo, hi) { words[$0] }
            guard added > 0 else { form = .bitmap(words); return }
            let met = Self.runsMeeting(words, max(lo - 1, 0), min(hi + 1, 0xFFFF))
            for k in (lo >> 6)...(hi >> 6) { words[k] |= Self.mask(k, lo, hi) }
            let n = cardinality + added, r = runCount + 1 - met
            if Kind.smallest(cardinality: n, runCount: r) == .bitmap {
                self = Container(form: .bitmap(words), cardinality: n, runCount: r)
            } else {
                self = Container(words: words)
            }
        }

        /// Both containers' values, in their smallest form.
        func union(_ other: Container) -> Container {
            switch (form, other.form) {
            case (.bitmap(var words), _):
                other.setBits(in: &words)
                return Container(words: words)
            case (_, .bitmap(var words)):
                setBits(in: &words)
                return Container(words: words)
            default:
                return Container(runs: Self.unionOfRuns(asRuns, other.asRuns))
            }
        }

        /// The values as runs, whatever the form.
        var asRuns: [Run] {
            switch form {
            case .array(let values): return Self.runs(ofArray: values)
            case .bitmap(let words): return Self.runs(ofWords: words)
            case .runs(let runs): return runs
            }
        }

        /// Set this container's values in `words`.
        private func setBits(in words: inout [UInt64]) {
            switch form {
            case .array(let values):
                for v in values { words[Int(v) >> 6] |= 1 &<< UInt64(v & 63) }
            case .bitmap(let mine):
                for k in words.indices { words[k] |= mine[k] }
            case .runs(let runs):
                for r in runs {
                    for k in (r.first >> 6)...(r.last >> 6) { words[k] |= Self.mask(k, r.first, r.last) }
                }
            }
        }

        /// The run at or after `position`, which it moves past that run (an index into an array
        /// or a runs list, a value of a bitmap); nil when there is none.
        func run(from position: inout Int) -> (lo: Int, hi: Int)? {
            switch form {
            case .array(let values):
                guard position < values.count else { return nil }
                let lo = Int(values[position])
                var hi = lo
                position += 1
                while position < values.count && Int(values[position]) == hi + 1 {
                    hi += 1
                    position += 1
                }
                return (lo, hi)
            case .runs(let runs):
                guard position < runs.count else { return nil }
                let r = runs[position]
                position += 1
                return (r.first, r.last)
            case .bitmap(let words):
                guard let r = Self.nextRun(words, from: position) else { return nil }
                position = r.hi + 1
                return r
            }
        }

        /// Decode a body of `n` entries at `at` (in bounds: the caller checked), checking its order.
        static func decode(_ raw: UnsafeRawBufferPointer, at: Int, kind: Kind, n: Int,
                           _ damaged: (String) -> RewindError) throws -> Container {
            switch kind {
            case .array:
                var values: [UInt16] = []
                values.reserveCapacity(n)
                var r = 0
                for k in 0..<n {
                    let v = raw.loadLE(at: at + 2 * k, as: UInt16.self)
                    if let p = values.last {
                        guard v > p else { throw damaged("array values are not strictly ascending (\(v) follows \(p))") }
                        if Int(v) != Int(p) + 1 { r += 1 }
                    } else {
                        r = 1
                    }
                    values.append(v)
                }
                return Container(form: .array(values), cardinality: n, runCount: r)
            case .bitmap:
                var words = [UInt64](repeating: 0, count: DirtySet.bitmapWords)
                for k in words.indices { words[k] = raw.loadLE(at: at + 8 * k, as: UInt64.self) }
                var c = 0, r = 0
                for k in words.indices {
                    c += words[k].nonzeroBitCount
                    r += runStarts(words, k).nonzeroBitCount
                }
                return Container(form: .bitmap(words), cardinality: c, runCount: r)
            case .runs:
                var runs: [Run] = []
                runs.reserveCapacity(n)
                var c = 0
                for k in 0..<n {
                    let run = Run(start: raw.loadLE(at: at + 4 * k, as: UInt16.self),
                                  lengthMinusOne: raw.loadLE(at: at + 4 * k + 2, as: UInt16.self))
                    guard run.last <= 0xFFFF else {
                        throw damaged("run \(run.start)+\(Int(run.lengthMinusOne) + 1) runs past 65535")
                    }
                    if let p = runs.last {
                        guard run.first > p.last + 1 else { throw damaged("runs overlap, touch or are out of order") }
                    }
                    c += Int(run.lengthMinusOne) + 1
                    runs.append(run)
                }
                return Container(form: .runs(runs), cardinality: c, runCount: n)
            }
        }

        // MARK: conversions and helpers

        /// The first index in `0..<count` where `isAtOrPast` holds (it holds from some index on).
        static func partitionPoint(_ count: Int, _ isAtOrPast: (Int) -> Bool) -> Int {
            var lo = 0, hi = count
            while lo < hi {
                let mid = (lo + hi) / 2
                if isAtOrPast(mid) { hi = mid } else { lo = mid + 1 }
            }
            return lo
        }

        /// Add `lo...hi` to ascending, neither overlapping nor touching `runs`, keeping them so;
        /// returns how many values and runs that added (runs: 1 less those it merged).
        @discardableResult
        static func merge(_ runs: inout [Run], _ lo: Int, _ hi: Int) -> (values: Int, runs: Int) {
            // Runs i..<j have a value in lo - 1...hi + 1: they merge with lo...hi.
            let i = partitionPoint(runs.count) { runs[$0].last >= lo - 1 }
            let j = partitionPoint(runs.count) { runs[$0].first > hi + 1 }
            var merged = (lo: lo, hi: hi)
            var replaced = 0
            if i < j {
                merged.lo = min(lo, runs[i].first)
                merged.hi = max(hi, runs[j - 1].last)
                for k in i..<j { replaced += Int(runs[k].lengthMinusOne) + 1 }
            }
            runs.replaceSubrange(i..<j, with: CollectionOfOne(Run(merged.lo, merged.hi)))
            return (merged.hi - merged.lo + 1 - replaced, 1 - (j - i))
        }

        /// The union of two ascending, neither overlapping nor touching run lists.
        static func unionOfRuns(_ x: [Run], _ y: [Run]) -> [Run] {
            var out: [Run] = []
            out.reserveCapacity(x.count + y.count)
            var i = 0, j = 0
            var current: (lo: Int, hi: Int)?
            while i < x.count || j < y.count {
                let r: Run
                if j >= y.count || (i < x.count && x[i].start <= y[j].start) {
                    r = x[i]
                    i += 1
                } else {
                    r = y[j]
                    j += 1
                }
                if let c = current, r.first <= c.hi + 1 {
                    current = (c.lo, max(c.hi, r.last))
                } else {
                    if let c = current { out.append(Run(c.lo, c.hi)) }
                    current = (r.first, r.last)
                }
            }
            if let c = current { out.append(Run(c.lo, c.hi)) }
            return out
        }

        static func runs(ofArray values: [UInt16]) -> [Run] {
            var out: [Run] = []
            var position = 0
            let c = Container(form: .array(values), cardinality: values.count, runCount: 0)
            while let r = c.run(from: &position) { out.append(Run(r.lo, r.hi)) }
            return out
        }

        static func runs(ofWords words: [UInt64]) -> [Run] {
            var out: [Run] = []
            var position = 0
            while let r = nextRun(words, from: position) {
                out.append(Run(r.lo, r.hi))
                position = r.hi + 1
            }
            return out
        }

        static func array(ofRuns runs: [Run], count: Int) -> [UInt16] {
            var out: [UInt16] = []
            out.reserveCapacity(count)
            for r in runs {
                for v in r.first...r.last { out.append(UInt16(v)) }
            }
            return out
        }

        static func words(ofRuns runs: [Run]) -> [UInt64] {
            var words = [UInt64](repeating: 0, count: DirtySet.bitmapWords)
            Container(form: .runs(runs), cardinality: 0, runCount: runs.count).setBits(in: &words)
            return words
        }

        /// The run of set bits at or after bit `from`, nil when there is none.
        static func nextRun(_ words: [UInt64], from: Int) -> (lo: Int, hi: Int)? {
            guard from < DirtySet.chunkValues else { return nil }
            var k = from >> 6
            var w = words[k] & (UInt64.max &<< UInt64(from & 63))
            while w == 0 {
                k += 1
                if k == words.count { return nil }
                w = words[k]
            }
            let lo = (k << 6) + w.trailingZeroBitCount
            var clear = ~words[k] & (UInt64.max &<< UInt64(lo & 63))
            while clear == 0 {
                k += 1
                if k == words.count { return (lo, DirtySet.chunkValues - 1) }
                clear = ~words[k]
            }
            return (lo, (k << 6) + clear.trailingZeroBitCount - 1)
        }

        /// Bits of word `k` that begin a run (set, with the bit before them clear).
        @inline(__always)
        static func runStarts(_ words: [UInt64], _ k: Int) -> UInt64 {
            let carry = k > 0 ? words[k - 1] &>> 63 : 0
            return words[k] & ~((words[k] &<< 1) | carry)
        }

        /// The bits `lo...hi` that fall in word `k`.
        @inline(__always)
        static func mask(_ k: Int, _ lo: Int, _ hi: Int) -> UInt64 {
            var m = UInt64.max
            if k == lo >> 6 { m &= UInt64.max &<< UInt64(lo & 63) }
            if k == hi >> 6 { m &= UInt64.max &>> UInt64(63 - (hi & 63)) }
            return m
        }

        /// Set bits among `lo...hi` of the words `word(k)` gives; 0 when lo > hi.
        static func countBits(_ lo: Int, _ hi: Int, _ word: (Int) -> UInt64) -> Int {
            guard lo <= hi else { return 0 }
            var total = 0
            for k in (lo >> 6)...(hi >> 6) { total += (word(k) & mask(k, lo, hi)).nonzeroBitCount }
            return total
        }

        /// Runs with a value in `a...b`.
        static func runsMeeting(_ words: [UInt64], _ a: Int, _ b: Int) -> Int {
            let atA = Int((words[a >> 6] &>> UInt64(a & 63)) & 1)
            return atA + countBits(a + 1, b) { runStarts(words, $0) }
        }
    }

    /// The set's runs, ascending, merged across chunk boundaries (`forEachRun`).
    struct RunIterator: IteratorProtocol {
        private let chunks: [UInt64: Container]
        private let keys: [UInt64]
        private var keyIndex = 0
        private var current: Container?
        private var position = 0
        private var pending: Range<UInt64>?

        init(_ set: DirtySet) {
            chunks = set.chunks
            keys = set.chunks.keys.sorted()
        }

        mutating func next() -> Range<UInt64>? {
            while let run = nextInChunk() {
                guard let p = pending else { pending = run; continue }
                if p.upperBound == run.lowerBound {
                    pending = p.lowerBound..<run.upperBound
                    continue
                }
                pending = run
                return p
            }
            let last = pending
            pending = nil
            return last
        }

        /// The next run within one container, ascending across containers.
        private mutating func nextInChunk() -> Range<UInt64>? {
            while keyIndex < keys.count {
                if current == nil {
                    current = chunks[keys[keyIndex]]
                    position = 0
                }
                if let c = current, let r = c.run(from: &position) {
                    let base = keys[keyIndex] << 16
                    return (base + UInt64(r.lo))..<(base + UInt64(r.hi) + 1)
                }
                current = nil
                keyIndex += 1
            }
            return nil
        }
    }
}
