import Foundation
import Glibc

/// A replication peer as its sender records it: `MIRROR/peers/ID.peer`, rewritten (to a new
/// file, then renamed over the old) as the peer acknowledges. Unlike a pin it outlives the
/// sender: while a peer is away, the records after its durable seq stay in the journal —
/// retention and `compact --to` stop there (`retentionHolds`) — so it resumes where it stopped.
/// Removing the file stops holding records for that peer.
public struct PeerRecord: Sendable, Codable, Equatable {
    /// The peer's identity (`rewind id`).
    public var id: String
    /// HOST:PORT it is reached at.
    public var address: String
    /// The newest seq the peer holds durably.
    public var durableSeq: UInt64
    /// When that was last heard (ns since 1970).
    public var updated: UInt64
    /// What the link is doing: `streaming`, `seeding`, `connecting: WHY`, `stopped`.
    public var state: String
    /// The acknowledgement mode: `async` (the host never waits for this peer).
    public var mode: String
    /// Records kept for it while it is behind, at most (payload bytes; `--peer-keep-size`):
    /// past that, retention folds them and it keeps the blocks they changed (`PeerDirty`).
    public var keepBytes: UInt64?
    /// Below this much free space on the journal's file system it holds no records
    /// (`--peer-min-free`): retention folds them and it keeps the blocks they changed.
    public var minFreeBytes: UInt64?

    public init(id: String, address: String, durableSeq: UInt64, updated: UInt64, state: String = "", mode: String = "async",
                keepBytes: UInt64? = nil, minFreeBytes: UInt64? = nil) {
        self.keepBytes = keepBytes
        self.minFreeBytes = minFreeBytes
        self.id = id
        self.address = address
        self.durableSeq = durableSeq
        self.updated = updated
        self.state = state
        self.mode = mode
    }
}

extension Mirror {
    var peersDirectory: String { path + "/peers" }

    /// The oldest seq such that the records after it hold at most `bytes` of payload.
    func seqKeeping(bytes: UInt64) throws -> UInt64 {
        try journal.env.read { txn in
            let m = try journal.readMeta(txn)
            guard m.lastCumulative - m.horizonCumulative > bytes else { return m.horizon }
            var lo = m.horizon + 1, hi = m.lastSeq
            while lo < hi {
                let mid = lo + (hi - lo) / 2
                let c = try journal.record(txn, atOrAfter: mid)?.header.cumulative ?? m.lastCumulative
                if m.lastCumulative - c <= bytes { hi = mid } else { lo = mid + 1 }
            }
            return try journal.record(txn, atOrAfter: lo)?.seq ?? m.lastSeq
        }
    }

    /// Record `peer`'s position; `sync`: durably (the file and the directory entry).
    public func recordPeer(_ peer: PeerRecord, sync: Bool) throws {
        if mkdir(peersDirectory, 0o755) != 0 && errno != EEXIST {
            throw RewindError.io(path: peersDirectory, operation: "mkdir", errno: errno)
        }
        let final = peersDirectory + "/" + peer.id + ".peer", staging = peersDirectory + "/." + peer.id + ".new"
        let body = try JSONEncoder().encode(peer)
        let fd = Glibc.open(staging, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw RewindError.io(path: staging, operation: "open", errno: errno) }
        let written = body.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        let e = errno
        if written != body.count { close(fd); throw RewindError.io(path: staging, operation: "write", errno: e) }
        if sync && fsync(fd) != 0 { let e = errno; close(fd); throw RewindError.io(path: staging, operation: "fsync", errno: e) }
        close(fd)
        guard rename(staging, final) == 0 else { throw RewindError.io(path: final, operation: "rename", errno: errno) }
        if sync { syncDirectory(containing: final) }
    }

    /// The recorded peers, by ID. A file that does not decode is reported as a peer at seq 0
    /// (it keeps every record: a damaged entry never lets retention fold what a peer needs).
    public func peerRecords() throws -> [PeerRecord] {
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: peersDirectory) else { return [] }
        var out: [PeerRecord] = []
        for name in names.sorted() where name.hasSuffix(".peer") && !name.hasPrefix(".") {
            let id = String(name.dropLast(5))
            if let data = FileManager.default.contents(atPath: peersDirectory + "/" + name),
               let peer = try? JSONDecoder().decode(PeerRecord.self, from: data), peer.id == id {
                out.append(peer)
            } else {
                out.append(PeerRecord(id: id, address: "unreadable \(name)", durableSeq: 0, updated: 0))
            }
        }
        return out
    }

    /// What holds retention back, oldest point first: live pins, and each replication peer at
    /// its durable seq (a point in use until the peer has everything after it). A peer already
    /// behind the horizon (folded past when the journal's file system was full) holds nothing:
    /// it needs a new seed.
    public func retentionHolds() throws -> [Pin.Info] {
        let horizon = try meta().horizon
        let free = journal.log.fileSystemSpace()?.free ?? UInt64.max
        let peers = try peerRecords().filter { $0.durableSeq >= horizon && free >= ($0.minFreeBytes ?? 0) }.map { p -> Pin.Info in
            // A bounded peer holds no more than its bound's worth of records.
            var held = p.durableSeq
            if let keep = p.keepBytes { held = max(held, try seqKeeping(bytes: keep)) }
            return Pin.Info(seq: held, pid: 0, since: p.updated, holder: "replication peer \(p.id.prefix(16))… (\(p.address))")
        }
        return (try livePins() + peers).sorted { $0.seq < $1.seq }
    }
}
