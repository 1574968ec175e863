/// The mirror's identity and positions, one checksummed value in the `meta` database under
/// the key "mirror".
///
/// ```
/// offset size field
///   0     8   magic             "REWINDMR"
///   8     4   format            mirror format version (3: payload in log/ files, every
///                               index entry, record and bookmark self-checking)
///  12     4   blockSize         bytes per block, a power of two 512...1 MiB
///  16    16   uuid              volume UUID, shared by every copy of the volume
///  32     8   volumeSize        bytes, a multiple of blockSize
///  40     8   horizon           oldest restorable seq: base.img is the volume as of it
///  48     8   horizonTime       timestamp of the horizon record (creation time at seq 0)
///  56     8   lastSeq           newest record
///  64     8   lastTime          its timestamp
///  72     8   target            compaction target; > horizon while a compaction is unfinished
///  80     8   generation        bumped by every rollback, so copies can tell histories apart
///  88     8   pendingRollback   seq of an unfinished rollback, or UInt64.max
///  96     8   sourceSyncedSeq   seq up to which the served source is known fsynced
/// 104     8   createdTime       ns since 1970
/// 112     8   horizonCumulative payload bytes stored up to the horizon
/// 120     8   lastCumulative    payload bytes stored up to lastSeq
/// 128     8   logEnd            payload-log position just past the chunk of lastSeq: where
///                               replay of an unindexed log tail starts (`PayloadLog`)
/// 136     8   checksum          XXH3-64 of bytes 0..<136
/// ```
/// Integers little-endian.
public struct MirrorMeta: Equatable, Sendable {
    static let magic: [UInt8] = Array("REWINDMR".utf8)
    public static let currentFormat: UInt32 = 3
    static let size = 144
    static let none = UInt64.max

    public var format: UInt32 = currentFormat
    public var blockSize: UInt32
    public var uuid: [UInt8]
    public var volumeSize: UInt64
    public var horizon: UInt64 = 0
    public var horizonTime: UInt64
    public var lastSeq: UInt64 = 0
    public var lastTime: UInt64
    public var target: UInt64 = 0
    public var generation: UInt64 = 0
    public var pendingRollback: UInt64 = none
    public var sourceSyncedSeq: UInt64 = 0
    public var createdTime: UInt64
    public var horizonCumulative: UInt64 = 0
    public var lastCumulative: UInt64 = 0
    public var logEnd: UInt64 = PayloadLog.firstPosition

    public var blockCount: UInt64 { volumeSize / UInt64(blockSize) }
    public var uuidString: String { formatUUID(uuid) }
    /// Payload bytes the journal holds between the horizon and the newest record.
    public var journalBytes: UInt64 { lastCumulative - horizonCumulative }
    /// The oldest point a reader may ask for: the horizon, or an unfinished compaction's target.
    public var oldestPoint: UInt64 { max(horizon, target) }

    init(blockSize: UInt32, uuid: [UInt8], volumeSize: UInt64, now: UInt64) {
        self.blockSize = blockSize
        self.uuid = uuid
        self.volumeSize = volumeSize
        self.horizonTime = now
        self.lastTime = now
        self.createdTime = now
    }

    func encoded() -> [UInt8] {
        var b = Self.magic
        b.reserveCapacity(Self.size)
        b.appendLE(format); b.appendLE(blockSize)
        b.append(contentsOf: uuid)
        for v in [volumeSize, horizon, horizonTime, lastSeq, lastTime, target, generation,
                  pendingRollback, sourceSyncedSeq, createdTime, horizonCumulative, lastCumulative, logEnd] {
            b.appendLE(v)
        }
        b.appendLE(xxh3(b))
        return b
    }

    static func decode(_ raw: UnsafeRawBufferPointer, path: String) throws -> MirrorMeta {
        guard raw.count >= 12, Array(raw[0..<8]) == magic else {
            throw RewindError.notAMirror(path: path, why: "the journal has no rewind header")
        }
        let format = raw.loadLE(at: 8, as: UInt32.self)
        guard format <= currentFormat else {
            throw RewindError.newerFormat(path: path, found: format, supported: currentFormat)
        }
        guard format == currentFormat else {
            let why = format == 2
                ? "mirror format 2 has no checks on its block index entries"
                : "mirror format \(format) keeps payload inside LMDB"
            throw RewindError.damagedMirror(path: path, why: "\(why); this rewind reads format \(currentFormat) only (restore it with the rewind that wrote it, then re-create)")
        }
        guard raw.count == size else {
            throw RewindError.damagedMirror(path: path, why: "header is \(raw.count) bytes, expected \(size)")
        }
        guard xxh3(UnsafeRawBufferPointer(rebasing: raw[0..<136])) == raw.loadLE(at: 136, as: UInt64.self) else {
            throw RewindError.damagedMirror(path: path, why: "header checksum mismatch")
        }
        var m = MirrorMeta(blockSize: raw.loadLE(at: 12, as: UInt32.self), uuid: Array(raw[16..<32]),
                           volumeSize: raw.loadLE(at: 32, as: UInt64.self), now: 0)
        m.format = format
        m.horizon = raw.loadLE(at: 40, as: UInt64.self)
        m.horizonTime = raw.loadLE(at: 48, as: UInt64.self)
        m.lastSeq = raw.loadLE(at: 56, as: UInt64.self)
        m.lastTime = raw.loadLE(at: 64, as: UInt64.self)
        m.target = raw.loadLE(at: 72, as: UInt64.self)
        m.generation = raw.loadLE(at: 80, as: UInt64.self)
        m.pendingRollback = raw.loadLE(at: 88, as: UInt64.self)
        m.sourceSyncedSeq = raw.loadLE(at: 96, as: UInt64.self)
        m.createdTime = raw.loadLE(at: 104, as: UInt64.self)
        m.horizonCumulative = raw.loadLE(at: 112, as: UInt64.self)
        m.lastCumulative = raw.loadLE(at: 120, as: UInt64.self)
        m.logEnd = raw.loadLE(at: 128, as: UInt64.self)
        guard m.blockSize >= 512, m.blockSize <= 1 << 20, m.blockSize & (m.blockSize - 1) == 0,
              m.volumeSize % UInt64(m.blockSize) == 0, m.horizon <= m.lastSeq, m.target <= m.lastSeq,
              m.horizonCumulative <= m.lastCumulative, m.logEnd >= PayloadLog.firstPosition else {
            throw RewindError.damagedMirror(path: path, why: "header fields are inconsistent")
        }
        return m
    }
}

public func formatUUID(_ u: [UInt8]) -> String {
    let hex = u.map { String($0, radix: 16).leftPadded(2) }.joined()
    let c = Array(hex)
    guard c.count == 32 else { return hex }
    return String(c[0..<8]) + "-" + String(c[8..<12]) + "-" + String(c[12..<16]) + "-" + String(c[16..<20]) + "-" + String(c[20..<32])
}

extension String {
    func leftPadded(_ width: Int, with pad: Character = "0") -> String {
        count >= width ? self : String(repeating: pad, count: width - count) + self
    }
}
