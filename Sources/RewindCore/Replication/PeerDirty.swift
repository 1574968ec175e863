import Foundation
import Glibc

/// What a replication peer lacks once records it had not received were folded (its bound,
/// `--peer-keep-size`, passed, or the journal's file system full): not the records, but the
/// blocks they changed (`DirtySet`), kept in `MIRROR/peers/ID.dirty` so a restart keeps it.
/// The peer is then caught up from the horizon in one consistent point (`CatchUp`).
///
/// ```
///  0  8 magic "RWPEERDS"    24  4 n: bytes of the reason
///  8  8 from: the peer's    28  4 zero
///       durable seq then    32  8 XXH3-64 of bytes 0..<32, the reason and the set
/// 16  8 through: the        40  n the reason (UTF-8): why records it lacked were folded
///       horizon it reaches  40+n  the set (`DirtySet.encoded()`)
/// ```
public struct PeerDirty: Sendable, Equatable {
    /// The blocks records (from, through] changed.
    public var from: UInt64
    public var through: UInt64
    public var blocks: DirtySet
    /// Why the records it lacked were folded (the first fold's reason).
    public var why: String

    public init(from: UInt64, through: UInt64, blocks: DirtySet, why: String = "") {
        self.from = from
        self.through = through
        self.blocks = blocks
        self.why = why
    }

    static let magic = Array("RWPEERDS".utf8)

    func encoded() -> [UInt8] {
        let reason = Array(why.utf8.prefix(1024))
        var head = Self.magic
        head.appendLE(from); head.appendLE(through); head.appendLE(UInt32(reason.count)); head.appendLE(UInt32(0))
        let set = blocks.encoded()
        var b = head
        b.appendLE(xxh3(head + reason + set))
        return b + reason + set
    }

    static func decode(_ bytes: [UInt8], what: String) throws -> PeerDirty {
        guard bytes.count >= 40, Array(bytes[0..<8]) == magic else {
            throw RewindError.damagedFile(what: what, why: "it is not a peer's dirty set")
        }
        let (from, through, n, check) = bytes.withUnsafeBytes {
            ($0.loadLE(at: 8, as: UInt64.self), $0.loadLE(at: 16, as: UInt64.self), Int($0.loadLE(at: 24, as: UInt32.self)),
             $0.loadLE(at: 32, as: UInt64.self))
        }
        guard n <= 1024, bytes.count >= 40 + n else { throw RewindError.damagedFile(what: what, why: "it is cut short") }
        let reason = Array(bytes[40..<40 + n]), set = Array(bytes[(40 + n)...])
        guard xxh3(Array(bytes[0..<32]) + reason + set) == check else { throw RewindError.damagedFile(what: what, why: "its checksum does not match") }
        return PeerDirty(from: from, through: through, blocks: try DirtySet.decode(set, what: what),
                         why: String(decoding: reason, as: UTF8.self))
    }
}

extension Mirror {
    func peerDirtyPath(_ id: String) -> String { peersDirectory + "/" + id + ".dirty" }

    /// The peer's dirty set, or nil when it has none (it holds records, or needs a resync).
    public func peerDirty(_ id: String) throws -> PeerDirty? {
        let path = peerDirtyPath(id)
        guard let data = FileManager.default.contents(atPath: path) else { return nil }
        return try PeerDirty.decode([UInt8](data), what: "peers/\(id.prefix(16))….dirty")
    }

    /// Record it durably (new file, fsync, rename, directory).
    func recordPeerDirty(_ id: String, _ dirty: PeerDirty) throws {
        let final = peerDirtyPath(id), staging = peersDirectory + "/." + id + ".dirty.new"
        let f = try BlockFile(path: staging, mode: .createOrTruncate)
        try f.write(at: 0, dirty.encoded())
        try f.sync()
        guard rename(staging, final) == 0 else { throw RewindError.io(path: final, operation: "rename", errno: errno) }
        syncDirectory(containing: final)
    }

    /// Stop keeping anything for a peer: its entry and its dirty set.
    public func forgetPeer(_ id: String) {
        unlink(peersDirectory + "/" + id + ".peer")
        unlink(peerDirtyPath(id))
        syncDirectory(containing: peerDirtyPath(id))
    }

    /// The peer was caught up: it holds records again.
    public func removePeerDirty(_ id: String) {
        unlink(peerDirtyPath(id))
        syncDirectory(containing: peerDirtyPath(id))
    }

    /// Before a compaction folds (horizon, target]: each peer that lacks some of those records
    /// gets the blocks they changed added to its dirty set, durably, first. A peer already
    /// behind the horizon with no dirty set reaching it has lost track (a resync finds what
    /// differs) and is left alone. Idempotent: a redone compaction finds `through` reached.
    func recordFoldForPeers(horizon: UInt64, target: UInt64) throws {
        let m = try meta()
        for peer in try peerRecords() where peer.durableSeq < target {
            let existing = try? peerDirty(peer.id)
            if let existing, existing.through >= target { continue }
            let start: UInt64
            var dirty: PeerDirty
            if let existing, existing.through == horizon, existing.from <= peer.durableSeq || peer.durableSeq < horizon {
                start = horizon
                dirty = existing
            } else if peer.durableSeq >= horizon {
                start = peer.durableSeq
                dirty = PeerDirty(from: peer.durableSeq, through: horizon, blocks: DirtySet(), why: try foldReason(peer, m))
            } else {
                continue
            }
            try forEachChangedRange(in: start + 1...target) { dirty.blocks.insert($0) }
            dirty.through = target
            try recordPeerDirty(peer.id, dirty)
        }
    }

    /// Why retention folds records `peer` lacks: its bound, low free space, or a full disk.
    private func foldReason(_ peer: PeerRecord, _ m: MirrorMeta) throws -> String {
        if let keep = peer.keepBytes, try lag(after: peer.durableSeq).bytes > keep {
            return "the records it lacked passed --peer-keep-size \(keep) bytes"
        }
        if let minFree = peer.minFreeBytes, let space = journal.log.fileSystemSpace(), space.free < minFree {
            return "the journal's free space fell below --peer-min-free \(minFree) bytes"
        }
        return "the journal's file system was full"
    }

    /// The block ranges the records in `seqs` changed, record by record.
    func forEachChangedRange(in seqs: ClosedRange<UInt64>, _ body: (Range<UInt64>) throws -> Void) throws {
        let bs = UInt64(blockSize)
        var catchUps: [(UInt64, RecordHeader)] = []
        try forEachRecord(in: seqs) { r in
            let h = r.header
            switch h.kind {
            case .flush: break
            case .catchUp: catchUps.append((r.seq, h))
            case .write, .zero, .trim:
                if h.length > 0 { try body(h.offset / bs..<(h.offset + h.length + bs - 1) / bs) }
            }
        }
        for (seq, h) in catchUps { for run in try catchUpRuns(h, seq: seq) { try body(run.blocks) } }
    }
}
