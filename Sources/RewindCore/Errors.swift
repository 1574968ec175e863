/// Everything that goes wrong in the engine, worded for the person at the terminal.
/// Each case carries what they need to act: the record, the offset, the path.
public enum RewindError: Error, CustomStringConvertible, Sendable {
    case notAMirror(path: String, why: String)
    case mirrorExists(path: String)
    case newerFormat(path: String, found: UInt32, supported: UInt32)
    case damagedMirror(path: String, why: String)
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
    case busy(path: String, why: String)
    case interruptedRollback(target: UInt64)
    case journal(LMDBError)
    case mismatch(offset: UInt64, why: String)

    public var description: String {
        switch self {
        case let .notAMirror(path, why): return "\(path) is not a rewind mirror: \(why)"
        case let .mirrorExists(path): return "\(path) already exists; refusing to overwrite a mirror"
        case let .newerFormat(path, found, supported):
            return "\(path) has mirror format \(found), newer than this rewind understands (\(supported)); upgrade rewind"
        case let .damagedMirror(path, why): return "mirror \(path) is damaged: \(why)"
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
        case let .io(path, operation, errno): return "\(operation) \(path): \(String(cString: strerror(errno)))"
        case let .fileExists(path): return "\(path) already exists (use --force to overwrite)"
        case let .busy(path, why): return "\(path) is busy: \(why)"
        case let .interruptedRollback(target):
            return "an interrupted rollback to seq:\(target) must be finished first: run `rewind rollback MIRROR --at seq:\(target) --yes` (with the same --source)"
        case let .journal(error): return error.description
        case let .mismatch(offset, why): return "differs at offset \(offset): \(why)"
        }
    }
}

import Glibc
