/// NBD wire constants (NetworkBlockDevice/nbd doc/proto.md). All integers big-endian.
public enum NBD {
    public static let defaultPort = 10809
    static let nbdMagic: UInt64 = 0x4e42_444d_4147_4943       // "NBDMAGIC"
    static let ihaveopt: UInt64 = 0x4948_4156_454F_5054       // "IHAVEOPT"
    static let optionReplyMagic: UInt64 = 0x0003_e889_0455_65a9
    static let requestMagic: UInt32 = 0x2560_9513
    static let simpleReplyMagic: UInt32 = 0x6744_6698
    static let structuredReplyMagic: UInt32 = 0x668e_33ef

    /// Handshake flags the server sends.
    static let flagFixedNewstyle: UInt16 = 1 << 0  // NBD_FLAG_FIXED_NEWSTYLE
    static let flagNoZeroes: UInt16 = 1 << 1       // NBD_FLAG_NO_ZEROES
    /// Client flags; any other bit set means the server MUST close.
    static let clientFixedNewstyle: UInt32 = 1 << 0
    static let clientNoZeroes: UInt32 = 1 << 1

    /// Limits, each bounding memory a client can make us hold.
    /// Largest option payload we read (names ≤ 4096 bytes plus a few queries); larger ones
    /// are discarded without buffering and answered ERR_TOO_BIG.
    public static let maxOptionBytes = 64 * 1024
    /// Longest message in an option error reply, in bytes (`writeOptionError`).
    public static let optionErrorMessageBytesMax = 1024
    /// Options per handshake before we give up on the client (hostile or broken).
    public static let maxOptions = 128
    public static let maxStringBytes = 4096
    /// Largest READ/WRITE payload (advertised as the maximum block size).
    public static let maxPayloadBytes = 32 * 1024 * 1024
    public static let preferredBlockSize: UInt32 = 4096
}

/// Handshake options (NBD_OPT_*).
enum NBDOption: UInt32 {
    case exportName = 1        // NBD_OPT_EXPORT_NAME
    case abort = 2             // NBD_OPT_ABORT
    case list = 3              // NBD_OPT_LIST
    case startTLS = 5          // NBD_OPT_STARTTLS
    case info = 6              // NBD_OPT_INFO
    case go = 7                // NBD_OPT_GO
    case structuredReply = 8   // NBD_OPT_STRUCTURED_REPLY
    case listMetaContext = 9   // NBD_OPT_LIST_META_CONTEXT
    case setMetaContext = 10   // NBD_OPT_SET_META_CONTEXT
}

/// Option reply types (NBD_REP_*); errors have bit 31 set.
enum NBDOptionReply: UInt32 {
    case ack = 1
    case server = 2
    case info = 3
    case metaContext = 4
    case errUnsupported = 0x8000_0001
    case errPolicy = 0x8000_0002
    case errInvalid = 0x8000_0003
    case errPlatform = 0x8000_0004
    case errTLSRequired = 0x8000_0005
    case errUnknown = 0x8000_0006
    case errShutdown = 0x8000_0007
    case errBlockSizeRequired = 0x8000_0008
    case errTooBig = 0x8000_0009
}

/// NBD_INFO_* types.
enum NBDInfo: UInt16 {
    case export = 0
    case name = 1
    case description = 2
    case blockSize = 3
}

/// Transmission flags (NBD_FLAG_*), sent with the export.
public struct NBDTransmissionFlags: OptionSet, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let hasFlags = Self(rawValue: 1 << 0)
    public static let readOnly = Self(rawValue: 1 << 1)
    public static let sendFlush = Self(rawValue: 1 << 2)
    public static let sendFUA = Self(rawValue: 1 << 3)
    public static let rotational = Self(rawValue: 1 << 4)
    public static let sendTrim = Self(rawValue: 1 << 5)
    public static let sendWriteZeroes = Self(rawValue: 1 << 6)
    public static let sendDF = Self(rawValue: 1 << 7)
    public static let canMultiConn = Self(rawValue: 1 << 8)
    public static let sendCache = Self(rawValue: 1 << 10)
    public static let sendFastZero = Self(rawValue: 1 << 11)
}

/// Transmission commands (NBD_CMD_*).
public enum NBDCommand: UInt16, Sendable, CaseIterable {
    case read = 0
    case write = 1
    case disconnect = 2
    case flush = 3
    case trim = 4
    case cache = 5
    case writeZeroes = 6
    case blockStatus = 7

    public var name: String {
        switch self {
        case .read: "read"
        case .write: "write"
        case .disconnect: "disc"
        case .flush: "flush"
        case .trim: "trim"
        case .cache: "cache"
        case .writeZeroes: "write_zeroes"
        case .blockStatus: "block_status"
        }
    }
}

/// Command flags (NBD_CMD_FLAG_*).
public struct NBDCommandFlags: OptionSet, Sendable {
    public let rawValue: UInt16
    public init(rawValue: UInt16) { self.rawValue = rawValue }
    public static let fua = Self(rawValue: 1 << 0)
    public static let noHole = Self(rawValue: 1 << 1)
    public static let df = Self(rawValue: 1 << 2)
    public static let reqOne = Self(rawValue: 1 << 3)
    public static let fastZero = Self(rawValue: 1 << 4)
}

/// Structured reply chunk types (NBD_REPLY_TYPE_*).
enum NBDChunkType: UInt16 {
    case none = 0
    case offsetData = 1
    case offsetHole = 2
    case blockStatus = 5
    case error = 32769
    case errorOffset = 32770
}

/// Errno values on the wire (NBD_E*); independent of the host's errno numbering.
public enum NBDErrno: UInt32, Error, Sendable {
    case perm = 1
    case io = 5
    case nomem = 12
    case inval = 22
    case nospc = 28
    case overflow = 75
    case notsup = 95
    case shutdown = 108
}

/// `base:allocation` extent flags.
public struct NBDExtentFlags: OptionSet, Sendable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let hole = Self(rawValue: 1 << 0)
    public static let zero = Self(rawValue: 1 << 1)
}

/// The one metadata context we serve, and its id on the wire.
let baseAllocationContext = "base:allocation"
let baseAllocationContextID: UInt32 = 1
