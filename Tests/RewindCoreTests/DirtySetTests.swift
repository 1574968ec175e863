import Foundation
import Testing
@testable import RewindCore

/// A replication peer's dirty set (`DirtySet`): the same blocks as a plain list of merged
/// ranges under random inserts and unions, containers in their smallest form at exact sizes,
/// never much larger than a plain bitmap, and a decoder that refuses every damaged encoding
/// with a message naming the file.
@Suite struct DirtySetTests {
    /// The reference: ascending ranges, neither overlapping nor touching.
    struct RangeModel: Equatable {
        var ranges: [Range<UInt64>] = []

        var count: UInt64 { ranges.reduce(0) { $0 + UInt64($1.count) } }

        mutating func insert(_ r: Range<UInt64>) {
            guard !r.isEmpty else { return }
            let rs = ranges
            // rs[i..<j] overlap or touch r: they merge with it.
            let i = Self.partitionPoint(rs.count) { rs[$0].upperBound >= r.lowerBound }
            let j = Self.partitionPoint(rs.count) { rs[$0].lowerBound > r.upperBound }
            var merged = r
            if i < j { merged = min(r.lowerBound, rs[i].lowerBound)..<max(r.upperBound, rs[j - 1].upperBound) }
            ranges.replaceSubrange(i..<j, with: [merged])
        }

        func contains(_ block: UInt64) -> Bool {
            let rs = ranges
            let i = Self.partitionPoint(rs.count) { rs[$0].upperBound > block }
            return i < rs.count && rs[i].lowerBound <= block
        }

        func union(_ other: RangeModel) -> RangeModel {
            var out = RangeModel()
            for r in (ranges + other.ranges).sorted(by: { $0.lowerBound < $1.lowerBound }) {
                if let last = out.ranges.last, r.lowerBound <= last.upperBound {
                    out.ranges[out.ranges.count - 1] = last.lowerBound..<max(last.upperBound, r.upperBound)
                } else {
                    out.ranges.append(r)
                }
            }
            return out
        }

        static func partitionPoint(_ count: Int, _ isAtOrPast: (Int) -> Bool) -> Int {
            var lo = 0, hi = count
            while lo < hi {
                let mid = (lo + hi) / 2
                if isAtOrPast(mid) { hi = mid } else { lo = mid + 1 }
            }
            return lo
        }
    }

    /// `a == b`, as a Bool: a failed expectation then prints a line, not both sets' containers.
    /// With `chunks`, only those chunks' containers are compared.
    static func same(_ a: DirtySet, _ b: DirtySet, chunks: [UInt64]? = nil) -> Bool {
        guard let keys = chunks else { return a == b }
        return keys.allSatisfy { a.chunks[$0] == b.chunks[$0] }
    }

    static func runs(of set: DirtySet) -> [Range<UInt64>] {
        var out: [Range<UInt64>] = []
        set.forEachRun { out.append($0) }
        return out
    }

    /// A random set and its model: single blocks and short ranges in a hot pair of chunks,
    /// stripes of single blocks (every second or third) that push the hot chunk past 4096
    /// values into a bitmap, with `fills` ranges that fill much of it again (bitmap to runs),
    /// ranges across chunks and ending or starting at chunk boundaries, and now and then a
    /// huge range.
    static func randomSet(_ rng: inout SplitMix, operations: Int, fills: Bool) -> (DirtySet, RangeModel) {
        var set = DirtySet(), model = RangeModel()
        let hot = UInt64.random(in: 0..<64, using: &rng) << 16
        func add(_ r: Range<UInt64>) {
            set.insert(r)
            model.insert(r)
        }
        for _ in 0..<operations {
            switch Int.random(in: 0..<100, using: &rng) {
            case 0..<25:
                let b = hot + UInt64.random(in: 0..<(2 << 16), using: &rng)
                set.insert(b)
                model.insert(b..<(b + 1))
            case 25..<33:
                let b = UInt64.random(in: 0..<(1 << 40), using: &rng)
                set.insert(b)
                model.insert(b..<(b + 1))
            case 33..<55:
                let start = hot + UInt64.random(in: 0..<(2 << 16), using: &rng)
                add(start..<(start + UInt64.random(in: 1...300, using: &rng)))
            case 55..<65:
                let start = UInt64.random(in: 0..<(1 << 24), using: &rng)
                add(start..<(start + UInt64.random(in: 1...300_000, using: &rng)))
            case 65..<77:
                let boundary = UInt64.random(in: 1..<256, using: &rng) << 16
                let near = boundary + UInt64.random(in: 0...2, using: &rng) - 1
                let length = UInt64.random(in: 1...70_000, using: &rng)
                add(Bool.random(using: &rng) ? near..<(near + length) : (near - min(near, length))..<near)
            case 77..<91:
                let step = UInt64.random(in: 2...3, using: &rng)
                let start = hot + UInt64.random(in: 0..<(1 << 16), using: &rng)
                var stripe = RangeModel()
                for i in 0..<UInt64.random(in: 1...1000, using: &rng) {
                    let b = start + i * step
                    set.insert(b)
                    stripe.ranges.append(b..<(b + 1))
                }
                model = model.union(stripe)
            case 91..<95 where fills:
                let lo = hot + UInt64.random(in: 0..<2000, using: &rng)
                add(lo..<(lo + UInt64.random(in: 2000...(hot + (1 << 16) - lo), using: &rng)))
            case 91..<98:
                let b = UInt64.random(in: 0..<(1 << 26), using: &rng)
                set.insert(b)
                model.insert(b..<(b + 1))
            default:
                // Up to 128 GiB at 4 KiB (the sizes test inserts a whole TiB).
                let start = UInt64.random(in: 0..<(1 << 36), using: &rng)
                add(start..<(start + UInt64.random(in: 1...(1 << 25), using: &rng)))
            }
        }
        return (set, model)
    }

    /// Everything `set` answers agrees with `model`.
    static func check(_ set: DirtySet, _ model: RangeModel, _ rng: inout SplitMix, _ what: String) throws {
        #expect(set.count == model.count, "\(what): count")
        #expect(set.isEmpty == model.ranges.isEmpty, "\(what): isEmpty")
        var probes: [UInt64] = []
        for _ in 0..<min(64, model.ranges.count) {
            let r = model.ranges[Int.random(in: 0..<model.ranges.count, using: &rng)]
            probes += [r.lowerBound, r.upperBound - 1, r.upperBound, UInt64.random(in: r, using: &rng)]
            if r.lowerBound > 0 { probes.append(r.lowerBound - 1) }
        }
        for _ in 0..<200 { probes.append(UInt64.random(in: 0..<(1 << 26), using: &rng)) }
        for b in probes where set.contains(b) != model.contains(b) {
            Issue.record("\(what): contains(\(b)) is \(set.contains(b)), the model says \(model.contains(b))")
        }
        let found = runs(of: set), expected = model.ranges
        let differ = zip(found, expected).enumerated().first { $0.element.0 != $0.element.1 }?.offset
            ?? (found.count == expected.count ? nil : min(found.count, expected.count))
        #expect(differ == nil, "\(what): runs from \(differ ?? 0) are \(found.dropFirst(differ ?? 0).prefix(3)), the model's \(expected.dropFirst(differ ?? 0).prefix(3))")
        let bytes = set.encoded()
        #expect(bytes.count == set.encodedSize, "\(what): encodedSize")
        let decoded = try DirtySet.decode(bytes, what: what)
        #expect(Self.same(decoded, set), "\(what): round trip")
        // The form follows from the blocks alone: the same blocks inserted otherwise compare equal.
        var rebuilt = DirtySet()
        for r in model.ranges { rebuilt.insert(r) }
        #expect(Self.same(rebuilt, set), "\(what): rebuilt from the model's ranges")
    }

    @Test func matchesAModelOfMergedRanges() throws {
        var rng = SplitMix(seed: 0xD127_5E70)
        var kinds: Set<DirtySet.Container.Kind> = []
        for round in 0..<20 {
            // Odd rounds fill much of the hot chunk now and then (its bitmap becomes runs);
            // even rounds leave it a bitmap.
            let (a, modelA) = Self.randomSet(&rng, operations: 200, fills: round % 2 == 1)
            let (b, modelB) = Self.randomSet(&rng, operations: 100, fills: round % 2 == 1)
            try Self.check(a, modelA, &rng, "round \(round) a")
            try Self.check(b, modelB, &rng, "round \(round) b")
            var union = a
            union.formUnion(b)
            try Self.check(union, modelA.union(modelB), &rng, "round \(round) a ∪ b")
            var reversed = b
            reversed.formUnion(a)
            #expect(Self.same(reversed, union), "round \(round): b ∪ a")
            var twice = a
            twice.formUnion(a)
            #expect(Self.same(twice, a), "round \(round): a ∪ a")
            for s in [a, b, union] { kinds.formUnion(s.chunks.values.map(\.kind)) }
        }
        // The rounds went through all three forms.
        let allKinds: Set<DirtySet.Container.Kind> = [.array, .bitmap, .runs]
        #expect(kinds == allKinds)
    }

    static func le32(_ bytes: [UInt8], at offset: Int) -> UInt32 {
        bytes[offset..<(offset + 4)].reversed().reduce(0) { ($0 << 8) | UInt32($1) }
    }

    @Test func encodedSizesAreExact() throws {
        // Header 24 + checksum 8.
        #expect(DirtySet().encodedSize == 32)
        #expect(DirtySet().encoded().count == 32)
        #expect(DirtySet().isEmpty)

        // One block: a 16-byte container header, one 2-byte value padded to 8.
        var one = DirtySet()
        one.insert(12_345_678)
        let oneBytes = one.encoded()
        #expect(one.encodedSize == 56 && oneBytes.count == 56)
        #expect(oneBytes[32] == 1 && Self.le32(oneBytes, at: 36) == 1)

        // A TiB of 4 KiB blocks: 4096 containers of one run (4 bytes padded to 8).
        var tib = DirtySet()
        tib.insert(0..<(1 << 28))
        #expect(tib.count == 1 << 28)
        #expect(tib.encodedSize == 24 + 4096 * 24 + 8)
        #expect(tib.encodedSize == 98_336 && tib.encodedSize < 100 << 10)
        #expect(tib.chunks.count == 4096 && tib.chunks.values.allSatisfy { $0.kind == .runs })
        let whole: [Range<UInt64>] = [0..<(1 << 28)]
        #expect(Self.runs(of: tib) == whole)
        #expect(Self.same(try DirtySet.decode(tib.encoded(), what: "tib"), tib))

        // Every other block of a chunk: 32768 runs, a bitmap of 8192 bytes.
        var halves = DirtySet()
        for v in stride(from: UInt64(0), to: 1 << 16, by: 2) { halves.insert((7 << 16) + v) }
        let halvesBytes = halves.encoded()
        #expect(halves.count == 32768)
        #expect(halves.encodedSize == 24 + 16 + 8192 + 8 && halvesBytes.count == 8240)
        #expect(halvesBytes[32] == 2 && Self.le32(halvesBytes, at: 36) == 1024)

        // 4096 values none adjacent: an array (8192 bytes, the bitmap's size: the array wins the tie).
        var scattered = DirtySet()
        for i in UInt64(0)..<4096 { scattered.insert(i * 16) }
        let scatteredBytes = scattered.encoded()
        #expect(scattered.encodedSize == 8240 && scatteredBytes.count == 8240)
        #expect(scatteredBytes[32] == 1 && Self.le32(scatteredBytes, at: 36) == 4096)
        // One more, not adjacent either: a bitmap.
        scattered.insert(3)
        #expect(scattered.encodedSize == 8240 && scattered.encoded()[32] == 2)

        // Runs only when strictly smaller: two adjacent values (4 bytes either way) stay an
        // array; three (4 bytes against 6) are a run.
        var pair = DirtySet()
        pair.insert(10..<12)
        #expect(pair.encoded()[32] == 1 && Self.le32(pair.encoded(), at: 36) == 2)
        pair.insert(12)
        #expect(pair.encoded()[32] == 3 && Self.le32(pair.encoded(), at: 36) == 1)
        // 4096 values in 2048 runs: runs would take 8192 bytes, no fewer than the array's: an array.
        var twos = DirtySet()
        for i in UInt64(0)..<2048 { twos.insert((i * 4)..<(i * 4 + 2)) }
        #expect(twos.encoded()[32] == 1 && twos.encodedSize == 8240)
        // One more run: 4196 values in 2049 runs, a bitmap.
        var grown = twos
        grown.insert(8200..<8300)
        #expect(grown.encoded()[32] == 2 && grown.encodedSize == 8240)
        // A range over the first half merges 1001 runs into 0...4001: 6096 values in 1048 runs.
        twos.insert(0..<4000)
        #expect(twos.count == 6096)
        #expect(twos.encoded()[32] == 3 && twos.encodedSize == 24 + 16 + 4 * 1048 + 8)

        // 100 runs of 10: 400 bytes of runs beat 2000 of array.
        var tens = DirtySet()
        for i in UInt64(0)..<100 { tens.insert((i * 100)..<(i * 100 + 10)) }
        let tensBytes = tens.encoded()
        #expect(tens.encodedSize == 24 + 16 + 400 + 8 && tensBytes.count == 448)
        #expect(tensBytes[32] == 3 && Self.le32(tensBytes, at: 36) == 100)

        // 16 TiB: 65,536 whole chunks, one run each, stored without visiting their blocks.
        let started = ContinuousClock.now
        var large = DirtySet()
        large.insert(0..<(1 << 32))
        #expect(large.count == 1 << 32)
        #expect(large.encodedSize == 24 + 65_536 * 24 + 8)
        let elapsed = ContinuousClock.now - started
        #expect(elapsed < Duration.seconds(5))
    }

    @Test func aRandomHalfIsNoLargerThanAPlainBitmap() {
        let blocks: UInt64 = 1 << 22
        let set = DirtySet.randomSample(blocks: blocks, probability: 0.5, seed: 0x5EED)
        let containers = set.chunks.count
        #expect(containers == 64)
        #expect(abs(Double(set.count) - Double(blocks) / 2) < Double(blocks) / 100)
        #expect(set.encodedSize <= Int(blocks / 8) + 64 * containers + 32)
        // Every chunk a bitmap: 16 + 8192 bytes each.
        #expect(set.encodedSize == 24 + 64 * (16 + 8192) + 8)
        let report = DirtySet.sizeReport(blocks: blocks, dirtyFraction: 0.5, clustered: false, seed: 0x5EED)
        #expect(report.count == set.count && report.bytes == set.encodedSize)
        // The same blocks inserted a run at a time come to the same containers.
        var inserted = DirtySet()
        set.forEachRun { r in
            if r.lowerBound < 2 << 16 { inserted.insert(r.lowerBound..<min(r.upperBound, 2 << 16)) }
        }
        #expect(inserted.chunks.count == 2)
        #expect(Self.same(inserted, set, chunks: [0, 1]))
    }

    /// What decoding `bytes` throws, as the user reads it; nil when it decodes.
    static func failure(_ bytes: [UInt8]) -> String? {
        do {
            _ = try DirtySet.decode(bytes, what: "peers/B.dirty")
            return nil
        } catch let e as RewindError {
            return e.description
        } catch {
            return "not a RewindError: \(error)"
        }
    }

    static func le<T: FixedWidthInteger>(_ v: T) -> [UInt8] {
        withUnsafeBytes(of: v.littleEndian) { Array($0) }
    }

    static func u16s(_ values: [UInt16]) -> [UInt8] { values.flatMap { le($0) } }

    /// One container of a forged encoding: its header fields and its body (before padding).
    struct Part {
        var key: UInt64
        var kind: UInt8
        var n: UInt32
        var body: [UInt8]

        init(_ key: UInt64, _ kind: UInt8, _ n: UInt32, _ body: [UInt8]) {
            self.key = key
            self.kind = kind
            self.n = n
            self.body = body
        }
    }

    /// An encoding built by hand, with a valid checksum.
    static func forge(count: UInt64, _ parts: [Part]) -> [UInt8] {
        var b = Array("RWDIRTY1".utf8)
        b += le(count)
        b += le(UInt32(parts.count))
        b += le(UInt32(0))
        for p in parts {
            b += le(p.key)
            b += [p.kind, 0, 0, 0]
            b += le(p.n)
            b += p.body
            while b.count % 8 != 0 { b.append(0) }
        }
        b += le(xxh3(b))
        return b
    }

    @Test func decodeRefusesDamage() throws {
        let damaged = "peers/B.dirty is damaged: "
        var small = DirtySet()
        small.insert(5)
        small.insert(7)
        small.insert(100)
        small.insert(((1 << 16) + 10)..<((1 << 16) + 5000))
        small.insert(((3 << 16) - 2)..<((3 << 16) + 3))
        let bytes = small.encoded()
        #expect(bytes.count == 24 + 4 * 24 + 8)
        #expect(try DirtySet.decode(bytes, what: "small") == small)

        var journal = bytes
        journal.replaceSubrange(0..<8, with: Array("RWJOURN1".utf8))
        #expect(Self.failure(journal) == damaged + "it is not a dirty set (it does not begin with RWDIRTY1)")
        var newer = bytes
        newer[7] = UInt8(ascii: "2")
        #expect(Self.failure(newer) == damaged + "it is dirty-set format version 2; this rewind reads version 1")
        #expect(Self.failure([]) == damaged + "it is truncated: 0 bytes, where a dirty set takes at least 32")

        // Every prefix: too short for a header, or a checksum that does not match.
        for length in 0..<bytes.count {
            let why = Self.failure(Array(bytes[0..<length])) ?? "accepted"
            let expected = length < 32 ? "it is truncated" : "its checksum does not match"
            #expect(why.hasPrefix(damaged + expected), "prefix of \(length) bytes: \(why)")
        }
        // Every bit: the magic, the version, or the checksum.
        for bit in 0..<(bytes.count * 8) {
            var flipped = bytes
            flipped[bit / 8] ^= 1 << UInt8(bit % 8)
            let why = Self.failure(flipped) ?? "accepted"
            let expected = bit / 8 < 7 ? ["it is not a dirty set"]
                : bit / 8 == 7 ? ["it is not a dirty set", "it is dirty-set format version"]
                : ["its checksum does not match"]
            #expect(expected.contains { why.hasPrefix(damaged + $0) }, "bit \(bit): \(why)")
        }

        // Forged with valid checksums. First one that is sound, so the helper is right.
        var threeFive = DirtySet()
        threeFive.insert(3)
        threeFive.insert(5)
        let sound = Self.forge(count: 2, [Part(0, 1, 2, Self.u16s([3, 5]))])
        #expect(try DirtySet.decode(sound, what: "forged") == threeFive)
        func refused(_ bytes: [UInt8], _ why: String) {
            let found = Self.failure(bytes)
            #expect(found == damaged + why)
        }
        refused(Self.forge(count: 2, [Part(0, 1, 2, Self.u16s([5, 3]))]),
                "container 0's array values are not strictly ascending (3 follows 5)")
        refused(Self.forge(count: 2, [Part(0, 1, 2, Self.u16s([3, 3]))]),
                "container 0's array values are not strictly ascending (3 follows 3)")
        refused(Self.forge(count: 3, [Part(0, 1, 2, Self.u16s([3, 5]))]),
                "its header counts 3 blocks where its containers hold 2")
        refused(Self.forge(count: 4, [Part(2, 1, 2, Self.u16s([3, 5])), Part(1, 1, 2, Self.u16s([3, 5]))]),
                "its container keys are not strictly ascending (key 1 follows 2)")
        refused(Self.forge(count: 150, [Part(0, 3, 2, Self.u16s([0, 99, 50, 99]))]),
                "container 0's runs overlap, touch or are out of order")
        refused(Self.forge(count: 20, [Part(0, 3, 2, Self.u16s([0, 9, 10, 9]))]),
                "container 0's runs overlap, touch or are out of order")
        refused(Self.forge(count: 1000, [Part(0, 3, 1, Self.u16s([65000, 999]))]),
                "container 0's run 65000+1000 runs past 65535")
        let evens: [UInt16] = (0..<4097).map { UInt16($0 * 2) }
        refused(Self.forge(count: 4097, [Part(0, 1, 4097, Self.u16s(evens))]),
                "container 0 holds 4097 array values (1...4096 allowed)")
        refused(Self.forge(count: 4, [Part(0, 1, 4, Self.u16s([0, 1, 2, 3]))]),
                "container 0 is stored as an array where runs would be smaller")
        refused(Self.forge(count: 2, [Part(0, 4, 2, Self.u16s([3, 5]))]),
                "container 0 has unknown kind 4")
        refused(Self.forge(count: 2, [Part(1 << 47, 1, 2, Self.u16s([3, 5]))]),
                "container 0's key 140737488355328 is past the largest block number")
        refused(Self.forge(count: 0, [Part(0, 2, 1023, [UInt8](repeating: 0, count: 8))]),
                "container 0's bitmap has 1023 words, not 1024")
        refused(Self.forge(count: 2, [Part(0, 1, 2, Self.u16s([3, 5]) + [0, 0, 1, 0])]),
                "container 0's padding is not zero")
        refused(Self.forge(count: 2, [Part(0, 1, 2, Self.u16s([3, 5]) + [UInt8](repeating: 0, count: 12))]),
                "8 bytes follow its last container")
        // The containers' number changed after the checksum was taken.
        var altered = sound
        altered[16] = 2
        refused(altered, "its checksum does not match")
        // A header naming more containers than follow, checksum retaken.
        var short = Array(altered[0..<(altered.count - 8)])
        let checksum = xxh3(short)
        short += Self.le(checksum)
        refused(short, "its header names 2 containers, more than its 56 bytes hold")
    }

    @Test func clusteredWritesEncodeFarSmaller() {
        let blocks: UInt64 = 1 << 20
        let target = Double(blocks) / 100
        let random = DirtySet.sizeReport(blocks: blocks, dirtyFraction: 0.01, clustered: false, seed: 41)
        let clustered = DirtySet.sizeReport(blocks: blocks, dirtyFraction: 0.01, clustered: true, seed: 41)
        #expect(abs(Double(random.count) - target) <= target / 10, "random: \(random.count) blocks")
        #expect(abs(Double(clustered.count) - target) <= target / 10, "clustered: \(clustered.count) blocks")
        #expect(clustered.bytes * 5 <= random.bytes, "clustered \(clustered.bytes) bytes, random \(random.bytes)")
        // Nothing and everything.
        let none = DirtySet.sizeReport(blocks: blocks, dirtyFraction: 0, clustered: false, seed: 1)
        #expect(none.count == 0 && none.bytes == 32)
        let all = DirtySet.sizeReport(blocks: blocks, dirtyFraction: 1, clustered: true, seed: 1)
        #expect(all.count == blocks && all.bytes == 24 + 16 * 24 + 8)
    }
}
