import Glibc

/// How an unfinished rollback was started: its target and whether it was reverting a source,
/// and which file (`SourceIdentity`: canonical path, device, inode). Stored in the `meta`
/// database under the key "pending-rollback-source" in the transaction that sets the header's
/// `pendingRollback`, and deleted in the one that clears it, so the two always agree.
///
/// ```
/// offset size field
///   0     1   format     1
///   1     1   kind       1 without a source, 2 reverting one
///   2     6   zero
///   8     8   target     the seq the rollback cuts back to (the header's pendingRollback)
///  16     n   source     kind 2: the source's identity, encoded as under "source"
///                        (`SourceIdentity`: its own format, path length and checksum); kind 1: none
/// 16+n    8   checksum   XXH3-64 of bytes 0..<16+n
/// ```
/// Integers little-endian.
///
/// Why a run that finishes a rollback must be started as the interrupted one was
/// (`checkFinishing`): the interrupted run may have reverted part of its source, and only a
/// run reverting the same file completes it — forgetting `--source`, or naming another
/// file, would leave the source half reverted while the mirror is cut back (another file would
/// be written with blocks of a volume it does not hold). And a run that adds `--source` to a
/// rollback started without one cannot revert the source correctly: the interrupted run may
/// already have deleted index entries after the target, and the blocks they changed are then
/// no longer found.
public struct PendingRollback: Equatable, Sendable {
    static let format: UInt8 = 1
    static let key = Array("pending-rollback-source".utf8)
    static let headerBytes = 16

    public var target: UInt64
    /// The file the rollback reverts, or nil when it was started without `--source`.
    public var source: SourceIdentity?

    public init(target: UInt64, source: SourceIdentity?) {
        self.target = target
        self.source = source
    }

    /// Refuse a run asked to roll back to `k`, given `--source` `givenPath` (identified as
    /// `given`; both nil without `--source`), unless it finishes this rollback as it was
    /// started: the same target, and the same file or none. `mirror` names the mirror in the
    /// command the message gives.
    func checkFinishing(requested k: UInt64, given: SourceIdentity?, givenPath: String?, mirror: String) throws {
        func refuse(_ why: String) -> RewindError {
            RewindError.unfinishedRollback(mirror: mirror, target: target, source: source?.path, why: why)
        }
        guard k == target else { throw refuse("must be finished before a rollback to seq:\(k)") }
        switch (source, given) {
        case (nil, nil):
            return
        case let (recorded?, given?):
            if recorded.isSameFile(as: given) { return }
            throw refuse("was reverting \(recorded), and \(given) is another file")
        case let (recorded?, nil):
            throw refuse("was reverting \(recorded.path)")
        case (nil, _?):
            throw refuse("was started without --source and may already have deleted records after seq:\(target) that reverting \(givenPath ?? "the source") needs")
        }
    }

    func encoded() -> [UInt8] {
        var b: [UInt8] = [Self.format, source == nil ? 1 : 2, 0, 0, 0, 0, 0, 0]
        b.appendLE(target)
        if let source { b.append(contentsOf: source.encoded()) }
        b.appendLE(xxh3(b))
        return b
    }

    /// Decode a stored value; anything malformed is `damagedMirror` naming `mirror`.
    static func decode(_ raw: UnsafeRawBufferPointer, mirror: String) throws -> PendingRollback {
        func damaged(_ why: String) -> RewindError {
            RewindError.damagedMirror(path: mirror, why: "its record of the interrupted rollback's source (journal meta \"pending-rollback-source\") \(why)")
        }
        guard raw.count >= Self.headerBytes + 8 else { throw damaged("is \(raw.count) bytes, too short") }
        let format = raw[0]
        guard format == Self.format else {
            throw damaged(format > Self.format ? "has format \(format), newer than this rewind understands (\(Self.format))"
                                               : "has unknown format \(format)")
        }
        let end = raw.count - 8
        guard xxh3(UnsafeRawBufferPointer(rebasing: raw[0..<end])) == raw.loadLE(at: end, as: UInt64.self) else {
            throw damaged("fails its checksum")
        }
        let zero = (2..<8).allSatisfy { raw[$0] == 0 }
        let target = raw.loadLE(at: 8, as: UInt64.self)
        switch raw[1] {
        case 1 where zero && end == Self.headerBytes:
            return PendingRollback(target: target, source: nil)
        case 2 where zero && end > Self.headerBytes:
            let source: SourceIdentity
            do {
                source = try SourceIdentity.decode(UnsafeRawBufferPointer(rebasing: raw[Self.headerBytes..<end]), mirror: mirror)
            } catch RewindError.damagedMirror(_, _) {
                throw damaged("holds a damaged source identity")
            }
            return PendingRollback(target: target, source: source)
        default:
            throw damaged("has inconsistent fields")
        }
    }
}

/// The file a rollback reverts, opened once: its identity is what the pending mark records
/// and what a finishing run is checked against, and the same descriptor is written, so the
/// file checked is the file reverted.
struct RollbackSource {
    /// As given on the command line.
    let path: String
    let file: BlockFile
    let identity: SourceIdentity
    let sizeBytes: UInt64

    /// Open `path` for writing and identify it. Throws `invalidArgument` unless it is a
    /// regular file or a block device.
    init(path: String) throws {
        let file = try BlockFile(path: path, mode: .readWrite)
        self.identity = try SourceIdentity(describing: file.fd, path: path)
        self.sizeBytes = try file.size()
        self.file = file
        self.path = path
    }
}

extension Mirror {
    /// How the pending rollback was started, or nil: none pending, or one started by a rewind
    /// that did not record it. Read in `txn`; a damaged value throws `damagedMirror`.
    func pendingRollback(_ txn: LMDBTransaction) throws -> PendingRollback? {
        guard let raw = try txn.get(journal.meta, PendingRollback.key) else { return nil }
        return try PendingRollback.decode(raw, mirror: path)
    }

    /// The error for a command that cannot run while the rollback to `target` is unfinished:
    /// it names the source to give when the rollback was reverting one.
    public func unfinishedRollbackError(target: UInt64) -> RewindError {
        let recorded = try? journal.env.read { txn in try pendingRollback(txn) }
        guard let pending = recorded, pending.target == target else {
            return RewindError.interruptedRollback(target: target)
        }
        return RewindError.unfinishedRollback(mirror: withoutTrailingSlashes(path), target: target,
                                              source: pending.source?.path, why: "is unfinished")
    }
}
