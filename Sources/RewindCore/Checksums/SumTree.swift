/// The shape of a checksum tree over a volume's blocks (K8): level 0 holds one XXH3-64 per
/// block (of its content; a block that reads as zeros has `zeroLeaf`), and each node of level
/// k ≥ 1 is the XXH3-64 of its up to `fanout` children at level k − 1, little-endian, in order.
/// The top level has one node, the root. Two copies with equal roots hold the same bytes;
/// where roots differ, comparing children level by level finds the differing blocks while
/// exchanging only the hashes of differing subtrees.
public struct SumTree: Sendable, Equatable {
    public static let fanout = 16
    public let blocks: UInt64
    public let blockSize: Int
    /// Nodes per level, leaves first; the last level has one node.
    public let counts: [UInt64]

    public init(blocks: UInt64, blockSize: Int) {
        self.blocks = blocks
        self.blockSize = blockSize
        var counts = [max(blocks, 1)]
        while counts[counts.count - 1] > 1 {
            let below = counts[counts.count - 1]
            counts.append((below + UInt64(Self.fanout) - 1) / UInt64(Self.fanout))
        }
        self.counts = counts
    }

    public var top: Int { counts.count - 1 }

    /// The children of node `index` at `level` ≥ 1: a range of nodes at `level` − 1.
    public func children(level: Int, index: UInt64) -> Range<UInt64> {
        let f = UInt64(Self.fanout)
        return index * f..<min(index * f + f, counts[level - 1])
    }

    /// The hash of a node from its children's hashes.
    public static func node(_ children: UnsafeBufferPointer<UInt64>) -> UInt64 {
        xxh3(UnsafeRawBufferPointer(children))
    }

    public static func node(_ children: [UInt64]) -> UInt64 {
        children.withUnsafeBufferPointer { node($0) }
    }

    /// The leaf of a block that reads as zeros.
    public func zeroLeaf() -> UInt64 { xxh3([UInt8](repeating: 0, count: blockSize)) }

    /// The hash of a full node (`fanout` children) all of whose blocks are zeros, per level.
    public func fullZeroNodes() -> [UInt64] {
        var out = [zeroLeaf()]
        for _ in 1..<max(counts.count, 2) {
            out.append(Self.node([UInt64](repeating: out[out.count - 1], count: Self.fanout)))
        }
        return out
    }
}

/// Builds every level of a `SumTree` from its leaves given in block order, holding at most
/// `fanout` hashes per level: each finished node goes to `emit(level, index, hash)`. Runs of
/// zero blocks cost one step per full zero node, not one per block.
struct SumTreeBuilder {
    let tree: SumTree
    private let zeroNodes: [UInt64]
    private var pending: [[UInt64]]
    private var produced: [UInt64]
    private let emit: (Int, UInt64, UInt64) throws -> Void

    init(tree: SumTree, emit: @escaping (Int, UInt64, UInt64) throws -> Void) {
        self.tree = tree
        zeroNodes = tree.fullZeroNodes()
        pending = Array(repeating: [], count: tree.counts.count)
        produced = Array(repeating: 0, count: tree.counts.count)
        self.emit = emit
    }

    /// Leaves so far.
    var leaves: UInt64 { produced[0] }

    mutating func add(leaf: UInt64) throws { try add(level: 0, hash: leaf) }

    /// `count` consecutive zero blocks.
    mutating func addZeros(_ count: UInt64) throws { try addZeros(level: 0, count: count) }

    /// Close the last, partial nodes of every level.
    mutating func finish() throws {
        for level in 0..<tree.top where !pending[level].isEmpty {
            let h = SumTree.node(pending[level])
            pending[level].removeAll(keepingCapacity: true)
            try add(level: level + 1, hash: h)
        }
    }

    private mutating func add(level: Int, hash: UInt64) throws {
        try emit(level, produced[level], hash)
        produced[level] += 1
        guard level < tree.top else { return }
        pending[level].append(hash)
        if pending[level].count == SumTree.fanout {
            let h = SumTree.node(pending[level])
            pending[level].removeAll(keepingCapacity: true)
            try add(level: level + 1, hash: h)
        }
    }

    private mutating func addZeros(level: Int, count: UInt64) throws {
        var left = count
        let f = UInt64(SumTree.fanout)
        // Fill the open node one by one, then whole zero nodes one level up, then the rest.
        while left > 0 && (!pending[level].isEmpty || level == tree.top || left < f
                           || produced[level] + f > tree.counts[level]) {
            try add(level: level, hash: zeroNodes[level])
            left -= 1
        }
        guard left > 0 else { return }
        let whole = left / f
        // Every node of a whole zero group is emitted too (the file holds every level).
        for _ in 0..<(whole * f) {
            try emit(level, produced[level], zeroNodes[level])
            produced[level] += 1
        }
        try addZeros(level: level + 1, count: whole)
        for _ in 0..<(left % f) { try add(level: level, hash: zeroNodes[level]) }
    }
}

/// A checksum tree one can ask about: a point's (`PointTree`) or a file's (`BaseSums`, such
/// as a stale copy's) — what the link's tree answers read from.
public protocol ChecksumTreeSource {
    var shape: SumTree { get }
    /// The children of node `index` at `level` ≥ 1, in order.
    func children(level: Int, index: UInt64) throws -> [UInt64]
}

extension PointTree: ChecksumTreeSource {}

extension BaseSums: ChecksumTreeSource {
    public var shape: SumTree { tree }

    public func children(level: Int, index: UInt64) throws -> [UInt64] {
        try nodes(level: level - 1, tree.children(level: level, index: index))
    }
}
