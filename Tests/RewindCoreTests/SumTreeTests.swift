import Foundation
import Glibc
import Testing
@testable import RewindCore

/// The checksum map and tree (K8): base.sums kept with every fold, a point's tree laid over
/// it from the index, and the top-down comparison that finds exactly the differing blocks.
@Suite struct SumTreeTests {
    static let bs = 512

    /// Every level of the tree of `bytes`, computed the plain way: hash each block, then each
    /// group of `fanout` hashes.
    static func bruteTree(_ bytes: [UInt8], blockSize: Int) -> [[UInt64]] {
        var levels = [bytes.withUnsafeBytes { blockHashes($0, blockSize: blockSize) }]
        while levels[levels.count - 1].count > 1 {
            let below = levels[levels.count - 1]
            levels.append(stride(from: 0, to: below.count, by: SumTree.fanout).map {
                SumTree.node(Array(below[$0..<min($0 + SumTree.fanout, below.count)]))
            })
        }
        return levels
    }

    static func allNodes(_ tree: PointTree) throws -> [[UInt64]] {
        var levels = [try (0..<tree.shape.counts[0]).map { try tree.node(level: 0, index: $0) }]
        for level in 1...max(tree.shape.top, 1) where level <= tree.shape.top {
            levels.append(try (0..<tree.shape.counts[level]).map { try tree.node(level: level, index: $0) })
            // Children as asked over the link agree with the nodes one level down.
            for p in 0..<tree.shape.counts[level] {
                #expect(try tree.children(level: level, index: p) == Array(levels[level - 1][Int(p) * SumTree.fanout..<min(Int(p + 1) * SumTree.fanout, levels[level - 1].count)]))
            }
        }
        return levels
    }

    static func inode(_ path: String) -> UInt64 {
        var st = stat()
        return stat(path, &st) == 0 ? UInt64(st.st_ino) : 0
    }

    /// Invariant (K8): at every sampled point, through random writes, zeroes and trims and
    /// compactions, the tree rewind computes (base.sums + the index) is the tree of the
    /// point's bytes, node for node; each compaction updates base.sums in place (same file)
    /// to the new horizon, and it equals a rebuild from base.img.
    @Test func aPointsTreeIsTheTreeOfItsBytes() throws {
        let dir = TempDir("sumtree-model")
        defer { dir.remove() }
        let bs = Self.bs
        // 1000 blocks: not a multiple of the fanout, so every level ends in a partial node.
        var initial = [UInt8](repeating: 0, count: bs * 1000)
        for i in 0..<initial.count / 3 { initial[i] = UInt8(truncatingIfNeeded: i &* 13 &+ 5) }
        try writeFile(dir.file("seed.img"), initial)
        let m = try Mirror.create(at: dir.file("m.rewind"), from: dir.file("seed.img"), blockSize: bs)
        var model = VolumeModel(bytes: initial)
        var points: [UInt64: [UInt8]] = [0: initial]
        var rng = SplitMix(seed: 19)
        func check(_ seq: UInt64, _ bytes: [UInt8]) throws {
            let s = try Snapshot(mirror: m, point: .seq(seq))
            defer { s.close() }
            let tree = try PointTree(snapshot: s)
            #expect(try Self.allNodes(tree) == Self.bruteTree(bytes, blockSize: bs), "seq:\(seq)")
        }
        try check(0, initial)
        var sumsInode: UInt64 = 0
        for round in 0..<6 {
            for _ in 0..<25 {
                let changes = (0..<Int.random(in: 1...4, using: &rng)).map { _ in randomChange(&rng, size: m.volumeSize, blockSize: bs) }
                changes.forEach { model.apply($0) }
                let seqs = try m.append(changes)
                points[seqs.upperBound] = model.bytes
            }
            let meta = try m.meta()
            for seq in points.keys.filter({ $0 >= meta.horizon }).shuffled(using: &rng).prefix(4) {
                try check(seq, try #require(points[seq]))
            }
            if round == 0 { sumsInode = Self.inode(dir.file("m.rewind/base.sums")) }
            // Fold about half of what is there.
            let target = meta.horizon + (meta.lastSeq - meta.horizon) / 2
            if let fold = points.keys.filter({ $0 >= target }).min() {
                _ = try m.compact(to: .seq(fold))
                #expect(BaseSums.describedSeq(try BlockFile(path: dir.file("m.rewind/base.sums"), mode: .readOnly),
                                              tree: m.sumTree, uuid: meta.uuid) == fold)
                #expect(Self.inode(dir.file("m.rewind/base.sums")) == sumsInode, "the fold rewrote base.sums instead of updating it")
            }
        }
        // What the folds left equals a rebuild from base.img.
        let kept = try m.baseSums()
        let rebuilt = try m.rebuildBaseSums(horizon: try m.meta().horizon, uuid: try m.meta().uuid, progress: nil)
        for level in 0...kept.tree.top {
            #expect(try kept.nodes(level: level, 0..<kept.tree.counts[level]) == rebuilt.nodes(level: level, 0..<rebuilt.tree.counts[level]))
        }
    }

    /// A base.sums that is stale — damaged, mid-update, of another volume — is rebuilt, never used.
    @Test func aStaleMapIsRebuilt() throws {
        let dir = TempDir("sumtree-stale")
        defer { dir.remove() }
        let bs = Self.bs
        let initial = halfFilledVolume(blockSize: bs, mul: 5, add: 1)
        try writeFile(dir.file("seed.img"), initial)
        let m = try Mirror.create(at: dir.file("m.rewind"), from: dir.file("seed.img"), blockSize: bs)
        let root = try m.baseSums().node(level: m.sumTree.top, index: 0)
        #expect(root == Self.bruteTree(initial, blockSize: bs).last?.first)
        let path = dir.file("m.rewind/base.sums")
        for damage in [24, 40, 60, 64 + 8 * 3] {  // the seq, the UUID, the check, a leaf
            let f = try BlockFile(path: path, mode: .readWrite)
            var b: [UInt8] = [0]
            try b.withUnsafeMutableBytes { try f.read(at: UInt64(damage), into: $0) }
            b[0] ^= 0x10
            try f.write(at: UInt64(damage), b)
            let sums = try m.baseSums()
            if damage < 64 {
                #expect(try sums.node(level: m.sumTree.top, index: 0) == root, "byte \(damage)")
            } else {
                // A leaf's damage is below the header's check: the point's tree says so by
                // comparing unequal, which costs a resend, never a missed difference.
                #expect(try sums.node(level: 0, index: 3) != Self.bruteTree(initial, blockSize: bs)[0][3])
                _ = try m.rebuildBaseSums(horizon: 0, uuid: try m.meta().uuid, progress: nil)
            }
        }
    }

    /// Comparing two copies top-down finds exactly the blocks whose bytes differ (1 % changed
    /// at random, some of them to zeros), asking only about differing subtrees; identical
    /// copies exchange nothing past the root.
    @Test func comparingFindsExactlyTheDifferingBlocks() throws {
        let dir = TempDir("sumtree-diff")
        defer { dir.remove() }
        let bs = 4096
        let blocks = 4096
        var rng = SplitMix(seed: 8)
        var image = [UInt8](repeating: 0, count: bs * blocks)
        for i in stride(from: 0, to: image.count * 3 / 4, by: 8) {
            withUnsafeBytes(of: rng.next()) { for (j, x) in $0.enumerated() { image[i + j] = x } }
        }
        try writeFile(dir.file("x.img"), image)
        let a = try Mirror.create(at: dir.file("a.rewind"), from: dir.file("x.img"), blockSize: bs)
        let b = try Mirror.create(at: dir.file("b.rewind"), from: dir.file("x.img"), blockSize: bs)
        var changed = Set<UInt64>()
        while changed.count < blocks / 100 { changed.insert(UInt64.random(in: 0..<UInt64(blocks), using: &rng)) }
        for block in changed.sorted() {
            if block % 5 == 0 {
                try b.append([.zero(block * UInt64(bs), UInt64(bs))])
            } else {
                try b.append([.write(block * UInt64(bs), (0..<bs).map { _ in UInt8.random(in: 0...255, using: &rng) })])
            }
        }
        // A block written with the bytes it already had is not a difference.
        try b.append([.write(7 * UInt64(bs), Array(image[7 * bs..<8 * bs]))])
        let expected = changed.filter { block in
            let i = Int(block) * bs
            return block % 5 != 0 || image[i..<i + bs].contains { $0 != 0 }
        }.sorted()
        func compare(_ x: Mirror, _ y: Mirror) throws -> (blocks: [UInt64], asked: Int, hashes: Int) {
            let sx = try Snapshot(mirror: x, point: .latest), sy = try Snapshot(mirror: y, point: .latest)
            defer { sx.close(); sy.close() }
            let tx = try PointTree(snapshot: sx), ty = try PointTree(snapshot: sy)
            var asked = 0, hashes = 0
            let found = try TreeComparison.differingBlocks(local: tx, remoteRoot: try ty.root(), ask: { level, parents in
                asked += 1
                let answer = try parents.map { try ty.children(level: level, index: $0) }
                hashes += answer.reduce(0) { $0 + $1.count }
                return answer
            })
            return (found, asked, hashes)
        }
        let diff = try compare(a, b)
        #expect(diff.blocks == expected)
        // Only the children of differing nodes were asked for: at most fanout per differing
        // node of each level above the leaves.
        let shape = a.sumTree
        var bound = 0
        var differing = Set(expected)
        for _ in 1...shape.top {
            bound += differing.count * SumTree.fanout
            differing = Set(differing.map { $0 / UInt64(SumTree.fanout) })
        }
        #expect(diff.hashes <= bound)
        print("tree comparison, \(expected.count) of \(blocks) blocks differing (\(expected.count * bs) bytes): \(diff.asked) questions, \(diff.hashes) hashes (\(diff.hashes * 8) bytes)")
        let same = try compare(a, a)
        #expect(same.blocks.isEmpty && same.asked == 0 && same.hashes == 0)
        // A point before the changes is identical to A again.
        let sb = try Snapshot(mirror: b, point: .seq(0)), sa = try Snapshot(mirror: a, point: .latest)
        defer { sb.close(); sa.close() }
        #expect(try PointTree(snapshot: sb).root() == PointTree(snapshot: sa).root())
    }
}
