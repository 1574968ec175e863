/// The checksum tree (`SumTree`) of one point: base.img's (`BaseSums`) with the leaves the
/// journal changed in (horizon, seq] laid over it, and their ancestors recomputed. Built in
/// one pass over the index (checked as a restore checks it); memory holds only the changed
/// nodes, 16 bytes each. Reads through a `Snapshot`, so base.img and the point stay put.
public final class PointTree: @unchecked Sendable {
    public let snapshot: Snapshot
    public let shape: SumTree
    let sums: BaseSums
    /// Changed nodes per level ≥ 1, ascending by index (parallel arrays).
    private var changedIndex: [[UInt64]]
    private var changedHash: [[UInt64]]
    private let cursor: LMDBCursor
    private let zeroLeaf: UInt64

    public var seq: UInt64 { snapshot.seq }

    public init(snapshot: Snapshot, progress: ProgressObserver? = nil) throws {
        self.snapshot = snapshot
        let mirror = snapshot.mirror
        sums = try mirror.baseSums(progress: progress)
        shape = sums.tree
        zeroLeaf = shape.zeroLeaf()
        cursor = try snapshot.txn.cursor(mirror.journal.blocks)
        changedIndex = Array(repeating: [], count: shape.counts.count)
        changedHash = Array(repeating: [], count: shape.counts.count)
        guard shape.top > 0 else {
            // One block: the root is its leaf.
            return
        }
        // Level 1 from the changed leaves, one parent at a time (the scan is in block order).
        let f = UInt64(SumTree.fanout)
        var parent: UInt64?
        var leaves: [(block: UInt64, hash: UInt64)] = []
        func closeParent() throws {
            guard let p = parent else { return }
            let range = shape.children(level: 1, index: p)
            var children = try sums.nodes(level: 0, range)
            for l in leaves { children[Int(l.block - range.lowerBound)] = l.hash }
            changedIndex[1].append(p)
            changedHash[1].append(SumTree.node(children))
            leaves.removeAll(keepingCapacity: true)
        }
        try snapshot.scanIndex { block, _, content in
            if block / f != parent { try closeParent(); parent = block / f }
            switch content {
            case .zero: leaves.append((block, zeroLeaf))
            case let .data(_, _, hash): leaves.append((block, hash))
            }
        }
        try closeParent()
        guard shape.top > 1 else { return }
        for level in 2...shape.top {
            var i = 0
            let below = changedIndex[level - 1]
            while i < below.count {
                let p = below[i] / f
                let range = shape.children(level: level, index: p)
                var children = try sums.nodes(level: level - 1, range)
                while i < below.count && below[i] / f == p {
                    children[Int(below[i] - range.lowerBound)] = changedHash[level - 1][i]
                    i += 1
                }
                changedIndex[level].append(p)
                changedHash[level].append(SumTree.node(children))
            }
        }
    }

    /// Nodes of levels ≥ 1 that differ from base.img's tree.
    public var changedNodes: Int { changedIndex.reduce(0) { $0 + $1.count } }

    public func root() throws -> UInt64 { try node(level: shape.top, index: 0) }

    public func node(level: Int, index: UInt64) throws -> UInt64 {
        if level == 0 { return try leaf(index) }
        if let h = changed(level, index) { return h }
        return try sums.node(level: level, index: index)
    }

    /// The children of node `index` at `level` ≥ 1, in order.
    public func children(level: Int, index: UInt64) throws -> [UInt64] {
        let range = shape.children(level: level, index: index)
        if level == 1 { return try range.map { try leaf($0) } }
        var out = try sums.nodes(level: level - 1, range)
        for (i, n) in range.enumerated() { if let h = changed(level - 1, n) { out[i] = h } }
        return out
    }

    private func changed(_ level: Int, _ index: UInt64) -> UInt64? {
        let keys = changedIndex[level]
        var lo = 0, hi = keys.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if keys[mid] < index { lo = mid + 1 } else { hi = mid }
        }
        return lo < keys.count && keys[lo] == index ? changedHash[level][lo] : nil
    }

    private func leaf(_ block: UInt64) throws -> UInt64 {
        switch try snapshot.mirror.journal.lookup(cursor, block: block, atOrBefore: snapshot.seq) {
        case nil: return try sums.node(level: 0, index: block)
        case .some((_, .zero)): return zeroLeaf
        case let .some((_, .data(_, _, hash))): return hash
        }
    }
}

/// Finding the blocks where two copies differ by comparing their trees top-down: only the
/// children of differing nodes are asked for.
public enum TreeComparison {
    /// Parents asked about per question, at most.
    public static let batch = 4096

    /// The blocks, ascending, where `local` differs from a copy whose root is `remoteRoot`;
    /// `ask(level, parents)` returns that copy's children of each parent (each list as long as
    /// `local.shape` says). `visited(level, parents)` reports progress.
    public static func differingBlocks(local: PointTree, remoteRoot: UInt64,
                                       ask: (Int, [UInt64]) throws -> [[UInt64]],
                                       visited: (Int, Int) -> Void = { _, _ in }) throws -> [UInt64] {
        guard try local.root() != remoteRoot else { return [] }
        var differing: [UInt64] = [0]
        var level = local.shape.top
        while level > 0 {
            var next: [UInt64] = []
            var at = 0
            while at < differing.count {
                let parents = Array(differing[at..<min(at + batch, differing.count)])
                let theirs = try ask(level, parents)
                guard theirs.count == parents.count else {
                    throw RewindError.invalidArgument("the peer answered \(theirs.count) nodes for \(parents.count) asked")
                }
                for (p, remote) in zip(parents, theirs) {
                    let mine = try local.children(level: level, index: p)
                    guard mine.count == remote.count else {
                        throw RewindError.invalidArgument("the peer's node \(p) at level \(level) has \(remote.count) children, this tree's \(mine.count)")
                    }
                    let first = local.shape.children(level: level, index: p).lowerBound
                    for i in 0..<mine.count where mine[i] != remote[i] { next.append(first + UInt64(i)) }
                }
                at += parents.count
            }
            visited(level, differing.count)
            differing = next
            level -= 1
        }
        return differing
    }
}
