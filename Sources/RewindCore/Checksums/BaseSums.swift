import Foundation
import Glibc

/// `MIRROR/base.sums`: the checksum tree (`SumTree`) of base.img — an XXH3-64 per block and
/// every level above — so a point's tree is base's with the blocks the journal changed laid
/// over it (`PointTree`), never a read of the whole volume.
///
/// ```
///  0  8 magic "RWSUMS01"        24  8 seq: the horizon whose base it describes
///  8  4 format (1)              32 16 volume UUID
/// 12  4 block size              48  4 fanout (16)
/// 16  8 blocks                  52  4 zero
///                               56  8 XXH3-64 of bytes 0..<56
/// 64 …  level 0 (u64 LE per block), then level 1, …, the root
/// ```
///
/// It is valid only while its seq is the mirror's horizon and no compaction is unfinished.
/// A compaction updates it in place after folding (`FoldSums`): first the seq is set to
/// `updating` and synced, then the folded leaves and their ancestors are written, synced, and
/// the seq set to the new horizon. Anything else — missing, damaged, another volume, a crash
/// in between — makes it stale, and the next user rebuilds it from base.img (`rebuild`).
public final class BaseSums: @unchecked Sendable {
    public static let headerSize = 64
    static let magic = Array("RWSUMS01".utf8)
    static let updating = UInt64.max

    public let tree: SumTree
    let file: BlockFile
    /// Byte offset of each level in the file.
    let levelOffsets: [UInt64]

    init(file: BlockFile, tree: SumTree) {
        self.file = file
        self.tree = tree
        var offsets: [UInt64] = []
        var at = UInt64(Self.headerSize)
        for c in tree.counts { offsets.append(at); at += c * 8 }
        levelOffsets = offsets
    }

    var fileSize: UInt64 { levelOffsets[levelOffsets.count - 1] + 8 }

    static func header(tree: SumTree, seq: UInt64, uuid: [UInt8]) -> [UInt8] {
        var b = magic
        b.appendLE(UInt32(1)); b.appendLE(UInt32(tree.blockSize)); b.appendLE(tree.blocks); b.appendLE(seq)
        b += uuid
        b.appendLE(UInt32(SumTree.fanout)); b.appendLE(UInt32(0))
        b.appendLE(xxh3(b))
        return b
    }

    /// The seq the file describes, or nil when its header is not this mirror's.
    static func describedSeq(_ file: BlockFile, tree: SumTree, uuid: [UInt8]) -> UInt64? {
        var raw = [UInt8](repeating: 0, count: headerSize)
        guard (try? raw.withUnsafeMutableBytes { try file.readAvailable(at: 0, into: $0) }) == headerSize else { return nil }
        let seq = raw.withUnsafeBytes { $0.loadLE(at: 24, as: UInt64.self) }
        guard header(tree: tree, seq: seq, uuid: uuid) == raw else { return nil }
        return seq
    }

    func setSeq(_ seq: UInt64, uuid: [UInt8]) throws {
        try file.write(at: 0, Self.header(tree: tree, seq: seq, uuid: uuid))
        try file.dataSync()
    }

    /// Node `index` of `level`.
    public func node(level: Int, index: UInt64) throws -> UInt64 {
        var v: UInt64 = 0
        try withUnsafeMutableBytes(of: &v) { try file.read(at: levelOffsets[level] + index * 8, into: $0) }
        return UInt64(littleEndian: v)
    }

    /// Nodes `range` of `level`, in order.
    public func nodes(level: Int, _ range: Range<UInt64>) throws -> [UInt64] {
        var out = [UInt64](repeating: 0, count: range.count)
        try out.withUnsafeMutableBytes { try file.read(at: levelOffsets[level] + range.lowerBound * 8, into: $0) }
        return out.map { UInt64(littleEndian: $0) }
    }

    func write(level: Int, index: UInt64, _ hashes: [UInt64]) throws {
        let le = hashes.map { $0.littleEndian }
        try le.withUnsafeBytes { try file.write(at: levelOffsets[level] + index * 8, from: $0) }
    }
}

extension Mirror {
    var baseSumsPath: String { path + "/base.sums" }

    var sumTree: SumTree { SumTree(blocks: volumeSize / UInt64(blockSize), blockSize: blockSize) }

    /// base.img's checksum tree, rebuilt first when stale (`BaseSums`). The caller holds
    /// `base.lock` (shared at least): base.img must not change meanwhile.
    public func baseSums(progress: ProgressObserver? = nil) throws -> BaseSums {
        let m = try meta()
        guard m.target <= m.horizon else {
            throw RewindError.invalidArgument("a compaction of \(path) is unfinished (to seq:\(m.target)); run `rewind compact \(path)` to finish it")
        }
        let tree = sumTree
        if let file = try? BlockFile(path: baseSumsPath, mode: .readOnly),
           BaseSums.describedSeq(file, tree: tree, uuid: m.uuid) == m.horizon,
           (try? file.size()) == BaseSums(file: file, tree: tree).fileSize {
            return BaseSums(file: file, tree: tree)
        }
        return try rebuildBaseSums(horizon: m.horizon, uuid: m.uuid, progress: progress)
    }

    /// For crash tests: nil when `base.sums` is missing or stale (its next user rebuilds it);
    /// else whether it equals one built afresh from base.img, byte for byte.
    public func baseSumsMatchRebuild() throws -> Bool? {
        let m = try meta()
        let tree = sumTree
        guard m.target <= m.horizon, let file = try? BlockFile(path: baseSumsPath, mode: .readOnly),
              BaseSums.describedSeq(file, tree: tree, uuid: m.uuid) == m.horizon,
              (try? file.size()) == BaseSums(file: file, tree: tree).fileSize else { return nil }
        let fresh = path + "/.base.sums.check.\(getpid())"
        unlink(fresh)
        defer { unlink(fresh) }
        _ = try BaseSums.build(of: base, tree: tree, at: fresh, seq: m.horizon, uuid: m.uuid, progress: nil)
        let other = try BlockFile(path: fresh, mode: .readOnly)
        let size = Int(try file.size())
        var a = [UInt8](repeating: 0, count: size), b = a
        try a.withUnsafeMutableBytes { try file.read(at: 0, into: $0) }
        try b.withUnsafeMutableBytes { try other.read(at: 0, into: $0) }
        return a == b
    }

    /// Hash every block of base.img into a new `base.sums` (holes without reading them), then
    /// rename it into place.
    func rebuildBaseSums(horizon: UInt64, uuid: [UInt8], progress: ProgressObserver?) throws -> BaseSums {
        let staging = path + "/.base.sums.\(getpid()).\(UInt64.random(in: 0...UInt64.max))"
        var keep = false
        defer { if !keep { unlink(staging) } }
        _ = try BaseSums.build(of: base, tree: sumTree, at: staging, seq: horizon, uuid: uuid, progress: progress)
        guard rename(staging, baseSumsPath) == 0 else { throw RewindError.io(path: baseSumsPath, operation: "rename", errno: errno) }
        keep = true
        syncDirectory(containing: baseSumsPath)
        return BaseSums(file: try BlockFile(path: baseSumsPath, mode: .readOnly), tree: sumTree)
    }
}

extension BaseSums {
    /// Hash every block of `image` (holes without reading them) into a new sums file at `path`.
    public static func build(of image: BlockFile, tree: SumTree, at path: String, seq: UInt64, uuid: [UInt8],
                             progress: ProgressObserver?) throws -> BaseSums {
        let file = try BlockFile(path: path, mode: .createNew)
        let sums = BaseSums(file: file, tree: tree)
        let blockSize = tree.blockSize
        let volumeSize = tree.blocks * UInt64(blockSize)
        try file.truncate(to: sums.fileSize)
        // Each level's nodes are written in order: buffered per level, 64 KiB at a time.
        var buffers = Array(repeating: [UInt64](), count: tree.counts.count)
        var flushedTo = Array(repeating: UInt64(0), count: tree.counts.count)
        func flush(_ level: Int) throws {
            guard !buffers[level].isEmpty else { return }
            try sums.write(level: level, index: flushedTo[level], buffers[level])
            flushedTo[level] += UInt64(buffers[level].count)
            buffers[level].removeAll(keepingCapacity: true)
        }
        var builder = SumTreeBuilder(tree: tree) { level, _, hash in
            buffers[level].append(hash)
            if buffers[level].count >= 8192 { try flush(level) }
        }
        let bs = UInt64(blockSize)
        progress?.begin(phase: "hashing \(image.path) (its checksum tree)", total: volumeSize)
        try forEachNonZeroRun(of: image, size: volumeSize, blockSize: blockSize, reached: { progress?.update(done: $0) }) { offset, bytes in
            try builder.addZeros(offset / bs - builder.leaves)
            for h in blockHashes(bytes, blockSize: blockSize) { try builder.add(leaf: h) }
        }
        try builder.addZeros(tree.blocks - builder.leaves)
        try builder.finish()
        for level in 0..<tree.counts.count { try flush(level) }
        progress?.end()
        try sums.setSeq(seq, uuid: uuid)
        return sums
    }
}

/// A compaction's update of `base.sums`: the leaves it folds, then their ancestors. Started
/// only when the file describes the horizon being folded from (else it stays stale and is
/// rebuilt when next needed).
final class FoldSums {
    private let sums: BaseSums
    private let uuid: [UInt8]
    private let zeroLeaf: UInt64
    /// Leaves waiting to be written: consecutive blocks from `runStart`.
    private var runStart: UInt64 = 0
    private var run: [UInt64] = []
    /// Level-1 nodes whose children changed, ascending, without repeats.
    private var touched: [UInt64] = []

    init?(mirror: Mirror, from horizon: UInt64, uuid: [UInt8]) throws {
        let tree = mirror.sumTree
        guard let file = try? BlockFile(path: mirror.baseSumsPath, mode: .readWrite),
              BaseSums.describedSeq(file, tree: tree, uuid: uuid) == horizon else { return nil }
        sums = BaseSums(file: file, tree: tree)
        guard (try? file.size()) == sums.fileSize else { return nil }
        self.uuid = uuid
        zeroLeaf = tree.zeroLeaf()
        try sums.setSeq(BaseSums.updating, uuid: uuid)
    }

    /// Block `block` now holds content hashing to `hash` (nil: zeros). Blocks come ascending.
    func folded(_ block: UInt64, hash: UInt64?) throws {
        if !run.isEmpty && runStart + UInt64(run.count) != block || run.count >= 8192 { try flushRun() }
        if run.isEmpty { runStart = block }
        run.append(hash ?? zeroLeaf)
        if sums.tree.top > 0 {
            let parent = block / UInt64(SumTree.fanout)
            if touched.last != parent { touched.append(parent) }
        }
    }

    private func flushRun() throws {
        guard !run.isEmpty else { return }
        try sums.write(level: 0, index: runStart, run)
        run.removeAll(keepingCapacity: true)
    }

    /// Recompute the ancestors of every folded leaf, sync, and name `horizon`.
    func finish(horizon: UInt64) throws {
        try flushRun()
        let tree = sums.tree
        var level = 1
        var parents = touched
        while level <= tree.top && !parents.isEmpty {
            var next: [UInt64] = []
            for p in parents {
                let h = SumTree.node(try sums.nodes(level: level - 1, tree.children(level: level, index: p)))
                try sums.write(level: level, index: p, [h])
                let up = p / UInt64(SumTree.fanout)
                if level < tree.top && next.last != up { next.append(up) }
            }
            parents = next
            level += 1
        }
        try sums.file.dataSync()
        try sums.setSeq(horizon, uuid: uuid)
    }
}
