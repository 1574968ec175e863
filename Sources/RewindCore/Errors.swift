/// Everything that goes wrong in the engine, worded for the person at the terminal.
/// Each case carries what they need to act: the record, the offset, the path.
public enum RewindError: Error, CustomStringConvertible, Sendable {
    case notAMirror(path: String, why: String)
    case mirrorExists(path: String)
    case newerFormat(path: String, found: UInt32, supported: UInt32)
    case damagedMirror(path: String, why: String)
    /// A file of the engine's own outside the journal (a peer's dirty set, `peers/ID.dirty`)
    /// that fails its checks; `what` names it as the user knows it.
    case damagedFile(what: String, why: String)
    case foreignMirror(path: String, expected: String, found: String)
    case invalidArgument(String)
    case outOfRange(offset: UInt64, length: UInt64, size: UInt64)
    case pointBeforeHorizon(point: String, horizon: UInt64)
    case pointAfterLatest(point: String, latest: UInt64)
    case noSuchBookmark(String)
    case noRecordAtTime(String, oldest: String)
    case corruptRecord(seq: UInt64, why: String)
    case corruptBlock(seq: UInt64, block: UInt64, why: String)
    case io(path: String, operation: String, errno: Int32)
    case fileExists(path: String)
    /// A restore target inside a mirror directory (or below one).
    case targetInsideMirror(path: String, mirror: String)
    /// A restore target that is itself a mirror directory.
    case targetIsMirror(path: String, mirror: String)
    /// A restore target a running `rewind serve` holds its exclusive flock on.
    case targetServed(path: String)
    /// A restore target that is neither a regular file nor a block device; `kind` reads "a directory".
    case targetNotAFile(path: String, kind: String)
    case deviceNeedsForce(path: String)
    case deviceInUse(path: String)
    case deviceTooSmall(path: String, bytes: UInt64, volumeBytes: UInt64)
    case danglingSymlink(path: String)
    case busy(path: String, why: String)
    case interruptedRollback(target: UInt64)
    /// A rollback interrupted on its way to seq `target` must be finished as it was started:
    /// with `--source` naming the file it was reverting (`source`, its recorded path), or
    /// without one (nil); `why` says what this run did otherwise.
    case unfinishedRollback(mirror: String, target: UInt64, source: String?, why: String)
    /// `serve` found SOURCE (`source`, as given) changed since its last clean stop at seq `seq`,
    /// with the journal unchanged since; `what` says how. The message holds both recoveries.
    case sourceChanged(source: String, mirror: String, seq: UInt64, what: String, isBlockDevice: Bool)
    case journal(LMDBError)
    case mismatch(offset: UInt64, why: String)
    /// A compaction to seq `target` would fold a point an export reads (`Pin`).
    case pinned(target: UInt64, pin: Pin.Info)
    /// A replication peer asked for records folded into the base (it needs a resync).
    case behindHorizon(seq: UInt64, horizon: UInt64)
    /// The mirror receives a volume from another unit: only `receive` writes it, until `promote`.
    case replica(path: String)

    public var description: String {
        switch self {
        case let .notAMirror(path, why): return "\(path) is not a rewind mirror: \(why)"
        case let .mirrorExists(path): return "\(path) already exists; refusing to overwrite a mirror"
        case let .newerFormat(path, found, supported):
            return "\(path) has mirror format \(found), newer than this rewind understands (\(supported)); upgrade rewind"
        case let .damagedMirror(path, why): return "mirror \(path) is damaged: \(why)"
        case let .damagedFile(what, why): return "\(what) is damaged: \(why)"
        case let .foreignMirror(path, expected, found):
            return "mirror \(path) belongs to volume \(found), not \(expected)"
        case let .invalidArgument(why): return why
        case let .outOfRange(offset, length, size):
            return "range \(offset)+\(length) lies outside the volume (size \(size))"
        case let .pointBeforeHorizon(point, horizon):
            return "\(point) is before the oldest restorable point seq:\(horizon) (compacted into the base)"
        case let .pointAfterLatest(point, latest):
            return "\(point) is after the newest record seq:\(latest)"
        case let .noSuchBookmark(name): return "no bookmark named \"\(name)\""
        case let .noRecordAtTime(time, oldest): return "no point at or before \(time): the oldest point is \(oldest)"
        case let .corruptRecord(seq, why): return "record seq:\(seq) is corrupt: \(why)"
        case let .corruptBlock(seq, block, why): return "record seq:\(seq) is corrupt: block \(block): \(why)"
        case let .io(path, operation, errno): return "\(operation) \(path): \(String(cString: strerror(errno))) (\(errnoName(errno)))"
        case let .fileExists(path): return "\(path) already exists (use --force to overwrite)"
        case let .targetInsideMirror(path, mirror): return "\(path) is inside the mirror \(mirror); restore to a path outside it"
        case let .targetIsMirror(path, mirror): return "\(path) is the mirror \(mirror); restore to a path outside it"
        case let .targetServed(path):
            return "\(path) is the source of a running rewind serve; stop it first (or restore elsewhere)"
        case let .targetNotAFile(path, kind): return "\(path) is \(kind); restore to a file or a block device"
        case let .deviceNeedsForce(path): return "\(path) is a block device; add --force to overwrite its contents"
        case let .deviceInUse(path): return "\(path) is in use (mounted or opened exclusively)"
        case let .deviceTooSmall(path, bytes, volumeBytes): return "\(path) is \(bytes) bytes, the volume is \(volumeBytes)"
        case let .danglingSymlink(path): return "\(path) is a symlink to a missing file"
        case let .busy(path, why): return "\(path) is busy: \(why)"
        case let .interruptedRollback(target):
            return "an interrupted rollback to seq:\(target) must be finished first: run `rewind rollback MIRROR --at seq:\(target) --yes` (with the same --source)"
        case let .unfinishedRollback(mirror, target, source, why):
            let withSource = source.map { " --source \(shellWord($0))" } ?? ""
            return "an interrupted rollback to seq:\(target) \(why); finish it with `rewind rollback \(shellWord(mirror)) --at seq:\(target)\(withSource) --yes`"
        case let .sourceChanged(source, mirror, seq, what, isBlockDevice):
            // A regular file is put back in place (`cp` into the existing file keeps its inode,
            // which the mirror's record of its source names); `restore --to FILE` would rename a
            // new file over it, and serve would then refuse it as replaced. A device is written in place.
            let (s, m) = (shellWord(source), shellWord(mirror))
            let copy = shellWord(source + ".restored")
            let putBack = isBlockDevice
                ? "rewind restore \(m) --at seq:\(seq) --to \(s) --force"
                : "rewind restore \(m) --at seq:\(seq) --to \(copy) && cp --sparse=always \(copy) \(s) && sync \(s) && rm \(copy)"
            return "\(source) changed since rewind serve stopped at seq:\(seq) (\(what)): something wrote it without rewind. To put back the mirror's version run `\(putBack)`; to keep the source as it is now, move the mirror aside (`mv \(m) \(shellWord(mirror + ".old"))`) and serve again, which starts a new mirror from it"
        case let .journal(error): return error.description
        case let .mismatch(offset, why): return "differs at offset \(offset): \(why)"
        case let .pinned(target, pin):
            return "seq:\(target) is after seq:\(pin.seq), a point in use by \(pin.heldBy); stop it, or compact to seq:\(pin.seq) at most"
        case let .behindHorizon(seq, horizon):
            return "seq:\(seq) was folded into the base (the oldest point is seq:\(horizon)); the peer needs a new seed or a resync"
        case let .replica(path):
            return "\(path) is a replica: it receives its volume from another unit (rewind receive); make it an origin first with `rewind promote \(shellWord(path)) --to SOURCE`"
        }
    }
}

import Glibc

/// The symbolic name of an errno value ("EIO"), as logs and scripts look for it.
public func errnoName(_ code: Int32) -> String {
    let names: [Int32: String] = [
        EPERM: "EPERM", ENOENT: "ENOENT", EINTR: "EINTR", EIO: "EIO", ENXIO: "ENXIO", EBADF: "EBADF",
        EAGAIN: "EAGAIN", ENOMEM: "ENOMEM", EACCES: "EACCES", EBUSY: "EBUSY", EEXIST: "EEXIST", EXDEV: "EXDEV",
        ENODEV: "ENODEV", ENOTDIR: "ENOTDIR", EISDIR: "EISDIR", EINVAL: "EINVAL", EMFILE: "EMFILE", EFBIG: "EFBIG",
        ENOSPC: "ENOSPC", ESPIPE: "ESPIPE", EROFS: "EROFS", EDQUOT: "EDQUOT", ENOSYS: "ENOSYS",
        EOPNOTSUPP: "EOPNOTSUPP", ESTALE: "ESTALE", ETIMEDOUT: "ETIMEDOUT",
    ]
    return names[code] ?? "errno \(code)"
}
