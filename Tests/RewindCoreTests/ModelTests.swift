import Testing
@testable import RewindCore

/// Invariant 1 (base + records (horizon, k] is exactly the volume after record k) and
/// invariant 3 (seqs contiguous, time never decreasing), against an in-memory model under
/// thousands of random writes, zeroes, trims and flushes with compactions interleaved.
@Suite struct ModelTests {
    @Test(arguments: [(UInt64(1), 512), (UInt64(2), 4096), (UInt64(3), 1024)])
    func randomWorkloadMatchesModelAtEveryCheckedPoint(seed: UInt64, blockSize: Int) throws {
        let dir = TempDir("model")
        defer { dir.remove() }
        var rng = SplitMix(seed: seed)
        let size = UInt64(blockSize * 64)
        let initial = halfFilledVolume(blockSize: blockSize, mul: 31, add: 3)
        try writeFile(dir.file("seed.img"), initial)
        let mirror = try Mirror.create(at: dir.file("m"), from: dir.file("seed.img"), blockSize: blockSize)
        var model = VolumeModel(bytes: initial)
        var states: [UInt64: [UInt8]] = [0: initial]
        var seq: UInt64 = 0
        var horizon: UInt64 = 0
        var compactions = 0
        var checked = 0
        // Every remembered point at or after the horizon must read back exactly as the model.
        func checkAll() throws {
            for (k, expected) in states.sorted(by: { $0.key < $1.key }) where k >= horizon {
                let got = try readAll(mirror, at: .seq(k))
                #expect(firstDifference(got, expected) == nil, "seq:\(k) differs at \(firstDifference(got, expected) ?? -1)")
                checked += 1
            }
            states = states.filter { $0.key >= horizon }
        }
        for round in 0..<300 {
            let batch = (0..<Int.random(in: 1...12, using: &rng)).map { _ in randomChange(&rng, size: size, blockSize: blockSize) }
            let seqs = try mirror.append(batch)
            #expect(seqs.lowerBound == seq + 1 && seqs.upperBound == seq + UInt64(batch.count))
            for c in batch {
                model.apply(c)
                seq += 1
                if Int.random(in: 0..<8, using: &rng) == 0 { states[seq] = model.bytes }
            }
            states[seq] = model.bytes
            if round % 37 == 36 {
                // Compact to a random point between the horizon and now.
                let target = UInt64.random(in: horizon...seq, using: &rng)
                let report = try mirror.compact(to: .seq(target))
                #expect(report.toHorizon == target)
                horizon = target
                compactions += 1
                try checkAll()
                #expect(throws: RewindError.self) { _ = try mirror.resolve(.seq(horizon == 0 ? 0 : horizon - 1)) }
            }
        }
        #expect(compactions > 5)
        #expect(try mirror.meta().lastSeq == seq)
        try checkAll()
        #expect(checked > 300)
        // Points before the horizon are refused with a clear error.
        if horizon > 0 {
            #expect(throws: RewindError.self) { _ = try readAll(mirror, at: .seq(horizon - 1)) }
        }
        // Restore to a file equals the model, byte for byte, at a few points.
        for k in [horizon, (horizon + seq) / 2, seq] {
            guard let expected = states[k] else { continue }
            try mirror.restore(at: .seq(k), to: dir.file("r\(k).img"))
            #expect(firstDifference(fileBytes(dir.file("r\(k).img")), expected) == nil, "restore seq:\(k)")
        }
        let report = try mirror.verify()
        #expect(report.records == seq - horizon)
    }

    @Test func compactionWritesEachFoldedBlockOnceWithItsNewestContent() throws {
        let dir = TempDir("fold")
        defer { dir.remove() }
        let m = try Mirror.create(at: dir.file("m"), size: 64 * 4096)
        // Block 3 written 10 times, block 5 twice, block 7 zeroed after a write: 3 distinct blocks.
        for i in 0..<10 { try m.append([.write(3 * 4096, [UInt8](repeating: UInt8(i + 1), count: 4096))]) }
        try m.append([.write(5 * 4096, [UInt8](repeating: 0xAA, count: 4096)), .write(5 * 4096 + 100, [1, 2, 3])])
        try m.append([.write(7 * 4096, [UInt8](repeating: 0xBB, count: 4096)), .zero(7 * 4096, 4096)])
        let before = try readAll(m, at: .latest)
        let r = try m.compact(to: .latest)
        #expect(r.blocksWritten == 3)
        #expect(r.recordsRemoved == 14)
        #expect(try readAll(m, at: .latest) == before)
        #expect(try m.meta().horizon == 14)
        #expect(try m.status().records == 0)
        _ = try m.verify()
    }

    @Test func zeroingAnAlreadyZeroRangeStoresNoIndexEntries() throws {
        let dir = TempDir("zero")
        defer { dir.remove() }
        let m = try Mirror.create(at: dir.file("m"), size: 1 << 30)  // sparse 1 GiB: a discard of all of it
        try m.append([.trim(0, 1 << 30)])
        let entries = try m.journal.env.read { try $0.count(m.journal.blocks) }
        #expect(entries == 0)
        try m.append([.write(4096, [UInt8](repeating: 9, count: 8192)), .zero(0, 1 << 30)])
        #expect(try m.journal.env.read { try $0.count(m.journal.blocks) } == 4)  // 2 writes + 2 zeros
        #expect(try Snapshot(mirror: m, point: .seq(2)).read(at: 4096, count: 4) == [9, 9, 9, 9])
        #expect(try Snapshot(mirror: m, point: .latest).read(at: 4096, count: 4) == [0, 0, 0, 0])
    }

    @Test func rollbackCutsHistoryAndRevertsTheSourceInPlace() throws {
        let dir = TempDir("rollback")
        defer { dir.remove() }
        var rng = SplitMix(seed: 9)
        let size: UInt64 = 128 * 512
        let m = try Mirror.create(at: dir.file("m"), size: size, blockSize: 512)
        var model = VolumeModel(bytes: [UInt8](repeating: 0, count: Int(size)))
        var states: [[UInt8]] = [model.bytes]
        for _ in 0..<200 {
            let c = randomChange(&rng, size: size, blockSize: 512)
            try m.append([c]); model.apply(c); states.append(model.bytes)
        }
        try writeFile(dir.file("source.img"), model.bytes)
        try m.setBookmark("keep", at: .seq(50))
        try m.setBookmark("gone", at: .seq(150))
        let r = try m.rollback(to: .seq(120), source: dir.file("source.img"))
        #expect(r.toSeq == 120 && r.fromSeq == 200 && r.recordsRemoved == 80)
        #expect(r.bookmarksRemoved == ["gone"])
        #expect(fileBytes(dir.file("source.img")) == states[120])
        #expect(try readAll(m, at: .latest) == states[120])
        #expect(try m.meta().generation == 1)
        // Writing goes on from seq 121.
        let next = try m.append([.write(0, [1, 2, 3])])
        #expect(next == 121...121)
        _ = try m.verify()
        #expect(try readAll(m, at: .seq(50)) == states[50])
    }

    @Test func timeAndBookmarkPointsResolve() throws {
        let dir = TempDir("points")
        defer { dir.remove() }
        let m = try Mirror.create(at: dir.file("m"), size: 1 << 20)
        try m.append([.write(0, [1])])
        let t1 = try m.meta().lastTime
        usleep(2000)
        try m.append([.write(0, [2]), .write(0, [3])])
        #expect(try m.resolve(.time(t1, text: "t1")) == 1)
        #expect(try m.resolve(.time(t1 + 1_000_000, text: "t1+1ms")) == 1)
        #expect(try m.resolve(.time(UInt64.max - 1, text: "far")) == 3)
        #expect(throws: RewindError.self) { _ = try m.resolve(.time(1, text: "1970")) }
        try m.setBookmark("b", at: .seq(2))
        #expect(try m.resolve(.bookmark("b")) == 2)
        #expect(throws: RewindError.self) { try m.setBookmark("b") }
        #expect(throws: RewindError.self) { _ = try m.resolve(.bookmark("nope")) }
        #expect(throws: RewindError.self) { _ = try m.resolve(.seq(4)) }
        #expect(parseRFC3339("2026-11-25T14:00:00Z") == 1_795_615_200_000_000_000)
        #expect(parseRFC3339("2026-11-25T15:00:00.5+01:00") == 1_795_615_200_500_000_000)
        #expect(formatRFC3339(1_795_615_200_000_000_001) == "2026-11-25T14:00:00.000000001Z")
        #expect(parseRFC3339("2026-13-25T14:00:00Z") == nil)
        #expect(parseRFC3339("yesterday") == nil)
    }
}

import Glibc
func writeFile(_ path: String, _ bytes: [UInt8]) throws {
    let f = try BlockFile(path: path, mode: .createOrTruncate)
    try f.write(at: 0, bytes)
}
