import Glibc
import Testing
@testable import RewindCore

/// `readIfCached` is what `rewind serve` answers reads with on an event loop: it must give the
/// exact bytes or nothing, and must refuse (not block) when the page cache lacks the range.
@Suite struct BlockFileTests {
    @Test func readIfCachedGivesExactBytesOnlyWhenCached() throws {
        let dir = TempDir("cached")
        defer { dir.remove() }
        let file = try BlockFile(path: dir.file("v.img"), mode: .createNew)
        try file.truncate(to: 64 << 20)
        var rng = SplitMix(seed: 7)
        let bytes = (0..<(1 << 20)).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        try file.write(at: 3 << 20, bytes)

        var got = [UInt8](repeating: 0xAA, count: bytes.count)
        #expect(got.withUnsafeMutableBytes { file.readIfCached(at: 3 << 20, into: $0) })
        #expect(got == bytes)

        // Dropped from the cache (written back, then POSIX_FADV_DONTNEED): refused rather than
        // waited for; a normal read brings it back, and then it is served again.
        try file.dataSync()
        #expect(posix_fadvise(file.fd, 0, 0, Int32(POSIX_FADV_DONTNEED)) == 0)
        got = [UInt8](repeating: 0xAA, count: bytes.count)
        #expect(!got.withUnsafeMutableBytes { file.readIfCached(at: 3 << 20, into: $0) })
        try got.withUnsafeMutableBytes { try file.read(at: 3 << 20, into: $0) }
        #expect(got == bytes)
        got = [UInt8](repeating: 0xAA, count: bytes.count)
        #expect(got.withUnsafeMutableBytes { file.readIfCached(at: 3 << 20, into: $0) })
        #expect(got == bytes)

        // Cached pages followed by uncached ones: refused as a whole, never half-filled.
        try file.write(at: 8 << 20, bytes)
        try file.dataSync()
        #expect(posix_fadvise(file.fd, 8 << 20, 1 << 20, Int32(POSIX_FADV_DONTNEED)) == 0)
        var mixed = [UInt8](repeating: 0, count: 2 << 20)
        #expect(!mixed.withUnsafeMutableBytes { file.readIfCached(at: 7 << 20, into: $0) } || mixed[(1 << 20)...] == bytes[...])
    }

    /// The served source's writes go out cut at 64 KiB boundaries (`VolumeWriter`): every byte
    /// must land where one whole write would have put it, whatever the alignment.
    @Test func writeInPiecesLandsEveryByte() throws {
        let dir = TempDir("pieces")
        defer { dir.remove() }
        let file = try BlockFile(path: dir.file("v.img"), mode: .createNew)
        try file.truncate(to: 4 << 20)
        var rng = SplitMix(seed: 11)
        for (offset, count) in [(0, 1 << 20), (4096, 65536), (65536 - 1, 2), (100_003, 300_001), (3 << 20, 512), (123, 1)] {
            let bytes = (0..<count).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            try file.write(at: UInt64(offset), bytes, piecesOf: 64 << 10)
            var got = [UInt8](repeating: 0, count: count + 2)
            try got.withUnsafeMutableBytes { try file.read(at: UInt64(max(offset, 1) - 1), into: $0) }
            let inner = offset == 0 ? Array(got[0..<count]) : Array(got[1..<count + 1])
            #expect(inner == bytes, "write of \(count) bytes at \(offset)")
        }
        var size = stat()
        #expect(fstat(file.fd, &size) == 0 && size.st_size == 4 << 20)
    }
}
