/// What `status` shows.
public struct MirrorStatus: Sendable, Codable {
    public var path: String
    public var uuid: String
    public var format: UInt32
    public var volumeSize: UInt64
    public var blockSize: UInt32
    public var records: UInt64
    public var oldestSeq: UInt64
    public var oldestTime: String
    public var newestSeq: UInt64
    public var newestTime: String
    /// Payload bytes the journal holds (what `--keep-size` counts).
    public var journalPayloadBytes: UInt64
    /// Bytes the LMDB data file spans (the index).
    public var journalFileBytes: UInt64
    /// Bytes the payload log's files occupy on disk.
    public var logFileBytes: UInt64
    public var baseAllocatedBytes: UInt64
    public var generation: UInt64
    public var compactionPending: UInt64?
    public var rollbackPending: UInt64?
    public var bookmarks: [String: UInt64]
    /// Payload log files missing or cut short (`LogGap`); empty when the log is whole.
    public var logDamage: [String]
    /// Why a server fenced the volume ("TIME REASON": which file, which errno), until a start
    /// recovers from it (`Mirror.fenceRecord`).
    public var fenced: String?
    /// Points in use by exports (`Pin`), oldest first: no compaction folds past the first.
    public var pins: [PinStatus]
    /// `origin` (serve writes it) or `replica` (receive writes it, until promote).
    public var role: String
    /// Replication peers this mirror streams to, with how far behind each is.
    public var peers: [PeerStatus]
}

/// A replication peer as `status` shows it.
public struct PeerStatus: Sendable, Codable {
    public var id: String
    public var address: String
    public var durableSeq: UInt64
    /// What the peer lacks: records, payload bytes, and how long ago the oldest was written.
    public var lagRecords: UInt64
    public var lagBytes: UInt64
    public var lagSeconds: Double
    /// When the peer was last heard from (RFC 3339), empty if never.
    public var heard: String
    public var state: String
    public var mode: String
    /// `--peer-keep-size`: records kept for it while behind, at most.
    public var keepBytes: UInt64?
    /// In dirty-set mode (records it lacked were folded): the blocks they changed, since which
    /// seq, and the set's size on disk. nil while it holds records.
    public var dirtyBlocks: UInt64?
    public var dirtySince: UInt64?
    public var dirtySetBytes: Int?
    /// Why the records it lacked were folded.
    public var dirtyWhy: String?
    /// `--peer-min-free`.
    public var minFreeBytes: UInt64?
}

/// A pin as `status` shows it.
public struct PinStatus: Sendable, Codable {
    public var seq: UInt64
    public var pid: Int32
    public var since: String
    public var holder: String
}

extension Mirror {
    public func status() throws -> MirrorStatus {
        let m = try meta()
        let oldest = m.oldestPoint
        let oldestTime = oldest == m.horizon ? m.horizonTime : try journal.env.read { try journal.header($0, seq: oldest).timestamp }
        var marks: [String: UInt64] = [:]
        for b in try bookmarks() { marks[b.name] = b.seq }
        // Records held: the records database's entries (a replica's catch-up is one record for
        // many seqs); mid-compaction, by seq, as some of them are on their way out.
        let records = m.target <= m.horizon ? UInt64(try journal.env.read { try $0.count(journal.records) }) : m.lastSeq - oldest
        return MirrorStatus(path: path, uuid: m.uuidString, format: m.format, volumeSize: m.volumeSize,
                            blockSize: m.blockSize, records: records, oldestSeq: oldest,
                            oldestTime: formatRFC3339(oldestTime), newestSeq: m.lastSeq,
                            newestTime: formatRFC3339(m.lastTime), journalPayloadBytes: m.journalBytes,
                            journalFileBytes: try journal.env.usedBytes(), logFileBytes: journal.log.allocatedBytes(),
                            baseAllocatedBytes: try base.allocatedBytes(),
                            generation: m.generation,
                            compactionPending: m.target > m.horizon ? m.target : nil,
                            rollbackPending: m.pendingRollback == MirrorMeta.none ? nil : m.pendingRollback,
                            bookmarks: marks, logDamage: try logGaps().map(\.description), fenced: fenceRecord(),
                            pins: try livePins().map { PinStatus(seq: $0.seq, pid: $0.pid, since: formatRFC3339($0.since), holder: $0.holder) },
                            role: try isReplica() ? "replica" : "origin",
                            peers: try peerRecords().map { p in
                                let lag = try lag(after: p.durableSeq)
                                let dirty = try? peerDirty(p.id)
                                return PeerStatus(id: p.id, address: p.address, durableSeq: p.durableSeq, lagRecords: lag.records,
                                                  lagBytes: lag.bytes, lagSeconds: lag.seconds,
                                                  heard: p.updated == 0 ? "" : formatRFC3339(p.updated), state: p.state, mode: p.mode,
                                                  keepBytes: p.keepBytes, dirtyBlocks: dirty?.blocks.count, dirtySince: dirty?.from,
                                                  dirtySetBytes: dirty?.blocks.encodedSize, dirtyWhy: dirty?.why,
                                                  minFreeBytes: p.minFreeBytes)
                            })
    }
}
