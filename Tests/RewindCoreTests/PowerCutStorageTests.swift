import Foundation
import Glibc
import Testing
@testable import RewindCore

/// The simulated disk itself (`PowerCutStorage`): what a reboot leaves is what a disk may
/// hold after a power cut — synced pages new; each unsynced page old, new, or torn at
/// 512-byte sectors; the size between the synced one and the current one — and nothing
/// after the cut reaches it.
@Suite struct PowerCutStorageTests {
    @Test func aRebootKeepsSyncedPagesAndAnyMixOfUnsyncedOnes() throws {
        let dir = TempDir("pcs")
        defer { dir.remove() }
        let storage = PowerCutStorage(root: dir.path)
        Storage.install(storage)
        defer { Storage.remove(storage) }
        let path = dir.file("f")
        let page = PowerCutStorage.pageSize, sector = PowerCutStorage.sectorSize
        var counts = (new: 0, old: 0, torn: 0, sizes: Set<Int>())
        for round in 0..<40 {
            unlink(path)
            let f = try BlockFile(path: path, mode: .createNew)
            let old = [UInt8](repeating: 0xA0, count: 8 * page)
            try f.write(at: 0, old)
            try f.dataSync()
            // Pages 0–3 rewritten and synced; 4–7 rewritten, unsynced; 8–9 appended, unsynced.
            let synced = [UInt8](repeating: 0xB1, count: 4 * page)
            try f.write(at: 0, synced)
            try f.dataSync()
            let new = [UInt8](repeating: 0xC2, count: 6 * page)
            try f.write(at: UInt64(4 * page), new)
            #expect(storage.unsyncedPages == 6)
            storage.cut()
            #expect(throws: RewindError.self) { try f.write(at: 0, [1]) }
            #expect(throws: RewindError.self) { try f.dataSync() }
            var rng = SplitMix(seed: UInt64(round))
            storage.reboot(using: &rng)
            let bytes = fileBytes(path)
            counts.sizes.insert(bytes.count)
            #expect(bytes.count >= 8 * page && bytes.count <= 10 * page && bytes.count % sector == 0, "size \(bytes.count)")
            #expect(Array(bytes[0..<4 * page]) == synced, "round \(round): a synced page changed")
            for p in 4..<bytes.count / page {
                let got = Array(bytes[p * page..<min(bytes.count, (p + 1) * page)])
                let wasOld: [UInt8] = p < 8 ? [UInt8](repeating: 0xA0, count: got.count) : [UInt8](repeating: 0, count: got.count)
                let isNew = got.allSatisfy { $0 == 0xC2 }, isOld = got == wasOld
                if isNew { counts.new += 1 } else if isOld { counts.old += 1 } else {
                    counts.torn += 1
                    for s in stride(from: 0, to: got.count, by: sector) {
                        let piece = got[s..<min(got.count, s + sector)]
                        #expect(piece.allSatisfy { $0 == 0xC2 } || Array(piece) == Array(wasOld[s..<min(got.count, s + sector)]),
                                "round \(round): page \(p) sector \(s / sector) is neither old nor new")
                    }
                }
            }
            // After the reboot the power is on and the file is as the disk holds it.
            try f.write(at: 0, [7])
            #expect(storage.unsyncedPages == 1)
            try f.dataSync()
        }
        #expect(counts.new > 0 && counts.old > 0 && counts.torn > 0, "\(counts)")
        #expect(counts.sizes.count > 1, "the size never varied: \(counts.sizes)")
    }

    @Test func aPlannedFailureFailsThatCallOnlyAndKeepsThePagesUnsynced() throws {
        let dir = TempDir("pcs-fail")
        defer { dir.remove() }
        let storage = PowerCutStorage(root: dir.path)
        Storage.install(storage)
        defer { Storage.remove(storage) }
        let f = try BlockFile(path: dir.file("f"), mode: .createNew)
        try f.write(at: 0, [UInt8](repeating: 1, count: 4096))
        storage.fail("fdatasync", pathContaining: "/f", errno: EIO)
        do {
            try f.dataSync()
            Issue.record("the planned fdatasync failure did not happen")
        } catch {
            #expect("\(error)" == "fdatasync \(dir.file("f")): Input/output error (EIO)")
        }
        #expect(storage.unsyncedPages == 1, "a failed sync made nothing durable")
        try f.dataSync()
        #expect(storage.unsyncedPages == 0)
        #expect(storage.injectedFailures == ["fdatasync": 1])
    }
}
