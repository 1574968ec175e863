import NIOCore
import RewindCore

/// `inspect`: the volume a client wants to compare (`rewind verify --peer`), first on its
/// connection; refused like a hello when the receiver holds another volume.
public struct LinkInspect: Sendable, Equatable {
    public var volumeUUID: [UInt8]
    public var volumeSize: UInt64
    public var blockSize: UInt32

    static let bodyBytes = 16 + 8 + 4

    public init(volumeUUID: [UInt8], volumeSize: UInt64, blockSize: UInt32) {
        self.volumeUUID = volumeUUID
        self.volumeSize = volumeSize
        self.blockSize = blockSize
    }

    public var frame: LinkFrame {
        var b = ByteBuffer()
        b.writeBytes(volumeUUID.count == 16 ? volumeUUID : [UInt8](repeating: 0, count: 16))
        b.writeInteger(volumeSize)
        b.writeInteger(blockSize)
        return LinkFrame(.inspect, body: b)
    }

    public init(_ frame: LinkFrame) throws {
        guard frame.kind == .inspect else { throw LinkMessageError.unexpected(frame.kind, expected: .inspect) }
        var b = frame.body
        guard b.readableBytes == Self.bodyBytes, let uuid = b.readBytes(length: 16), let size: UInt64 = b.readInteger(),
              let bs: UInt32 = b.readInteger() else {
            throw LinkMessageError.malformed(.inspect, bytes: frame.body.readableBytes)
        }
        self.init(volumeUUID: uuid, volumeSize: size, blockSize: bs)
    }
}

/// `inspectReady`: the receiver's point (its newest indexed seq, pinned for the connection)
/// and the root of that point's checksum tree.
public struct LinkInspectReady: Sendable, Equatable {
    public var seq: UInt64
    public var root: UInt64

    public init(seq: UInt64, root: UInt64) {
        self.seq = seq
        self.root = root
    }

    public var frame: LinkFrame {
        var b = ByteBuffer()
        b.writeInteger(seq)
        b.writeInteger(root)
        return LinkFrame(.inspectReady, body: b)
    }

    public init(_ frame: LinkFrame) throws {
        guard frame.kind == .inspectReady else { throw LinkMessageError.unexpected(frame.kind, expected: .inspectReady) }
        var b = frame.body
        guard b.readableBytes == 16, let seq: UInt64 = b.readInteger(), let root: UInt64 = b.readInteger() else {
            throw LinkMessageError.malformed(.inspectReady, bytes: frame.body.readableBytes)
        }
        self.init(seq: seq, root: root)
    }
}

/// `treeQuery`: a level ≥ 1 and up to `maxParents` node indices of it.
public struct LinkTreeQuery: Sendable, Equatable {
    public var level: UInt8
    public var parents: [UInt64]

    public static let maxParents = 4096

    public init(level: UInt8, parents: [UInt64]) {
        self.level = level
        self.parents = parents
    }

    public var frame: LinkFrame {
        var b = ByteBuffer()
        b.writeInteger(level)
        b.writeInteger(UInt32(parents.count))
        for p in parents { b.writeInteger(p) }
        return LinkFrame(.treeQuery, body: b)
    }

    public init(_ frame: LinkFrame) throws {
        guard frame.kind == .treeQuery else { throw LinkMessageError.unexpected(frame.kind, expected: .treeQuery) }
        var b = frame.body
        guard let level: UInt8 = b.readInteger(), let count: UInt32 = b.readInteger(), count <= Self.maxParents,
              b.readableBytes == Int(count) * 8 else {
            throw LinkMessageError.malformed(.treeQuery, bytes: frame.body.readableBytes)
        }
        var parents: [UInt64] = []
        parents.reserveCapacity(Int(count))
        for _ in 0..<count { if let p: UInt64 = b.readInteger() { parents.append(p) } }
        self.init(level: level, parents: parents)
    }
}

/// `treeAnswer`: the hashes of the asked nodes' children, all in order (each node's count
/// follows from the tree's shape, which both ends know).
public struct LinkTreeAnswer: Sendable, Equatable {
    public var hashes: [UInt64]

    public init(hashes: [UInt64]) { self.hashes = hashes }

    /// The answer to `q` from `tree`; a question about a level or node the tree lacks is refused.
    init(answering q: LinkTreeQuery, from tree: some ChecksumTreeSource) throws {
        let level = Int(q.level), shape = tree.shape
        guard level >= 1, level <= shape.top else {
            throw LinkError("a question about level \(level); the tree has levels 1...\(shape.top)")
        }
        var hashes: [UInt64] = []
        for p in q.parents {
            guard p < shape.counts[level] else {
                throw LinkError("a question about node \(p) of level \(level), which has \(shape.counts[level])")
            }
            hashes += try tree.children(level: level, index: p)
        }
        self.init(hashes: hashes)
    }

    /// An answer's hashes as each asked parent's children (counts from the tree's shape).
    static func split(_ all: [UInt64], parents: [UInt64], level: Int, shape: SumTree) throws -> [[UInt64]] {
        var out: [[UInt64]] = []
        var at = 0
        for p in parents {
            let n = shape.children(level: level, index: p).count
            guard at + n <= all.count else { throw LinkError("the peer answered \(all.count) hashes, fewer than asked") }
            out.append(Array(all[at..<at + n]))
            at += n
        }
        guard at == all.count else { throw LinkError("the peer answered \(all.count) hashes, more than asked") }
        return out
    }

    public var frame: LinkFrame {
        var b = ByteBuffer()
        b.reserveCapacity(hashes.count * 8)
        for h in hashes { b.writeInteger(h, endianness: .little) }
        return LinkFrame(.treeAnswer, body: b)
    }

    public init(_ frame: LinkFrame) throws {
        guard frame.kind == .treeAnswer else { throw LinkMessageError.unexpected(frame.kind, expected: .treeAnswer) }
        var b = frame.body
        guard b.readableBytes % 8 == 0, b.readableBytes <= LinkTreeQuery.maxParents * SumTree.fanout * 8 else {
            throw LinkMessageError.malformed(.treeAnswer, bytes: frame.body.readableBytes)
        }
        var hashes: [UInt64] = []
        hashes.reserveCapacity(b.readableBytes / 8)
        while let h: UInt64 = b.readInteger(endianness: .little) { hashes.append(h) }
        self.init(hashes: hashes)
    }
}
