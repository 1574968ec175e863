/// The kind of a journal record; the raw value is what is stored on disk.
public enum ChangeKind: UInt8, Sendable, CaseIterable {
    case write = 1   // NBD_CMD_WRITE
    case zero = 2    // NBD_CMD_WRITE_ZEROES
    case trim = 3    // NBD_CMD_TRIM, recorded as zeroing
    case flush = 4   // NBD_CMD_FLUSH
    case catchUp = 5 // a replica's consistent catch-up: many blocks at once (`CatchUp`)

    public var name: String {
        switch self {
        case .write: "write"
        case .zero: "zero"
        case .trim: "trim"
        case .flush: "flush"
        case .catchUp: "catch-up"
        }
    }
}

/// One write-nature command handed to the journal.
public struct Change: Sendable {
    public var kind: ChangeKind
    public var offset: UInt64
    public var length: UInt64
    public var fua: Bool
    /// The bytes of a `.write`; empty for the others.
    public var data: [UInt8]

    public static func write(_ offset: UInt64, _ data: [UInt8], fua: Bool = false) -> Change {
        Change(kind: .write, offset: offset, length: UInt64(data.count), fua: fua, data: data)
    }
    public static func zero(_ offset: UInt64, _ length: UInt64, fua: Bool = false) -> Change {
        Change(kind: .zero, offset: offset, length: length, fua: fua, data: [])
    }
    public static func trim(_ offset: UInt64, _ length: UInt64, fua: Bool = false) -> Change {
        Change(kind: .trim, offset: offset, length: length, fua: fua, data: [])
    }
    public static let flush = Change(kind: .flush, offset: 0, length: 0, fua: false, data: [])
}
