/// One write-nature request to a served volume, as the serve pipeline (`ServePipeline`) takes
/// it: what it changes, and whom to tell once it may be answered.
public struct VolumeOp: Sendable {
    public enum Kind: Sendable {
        case write([UInt8])
        case zero(length: UInt64, noHole: Bool)
        case trim(length: UInt64)
        case flush
    }

    /// Why a request was refused: the NBD layer answers EIO, ENOSPC or ESHUTDOWN.
    public enum Failure: Error, Sendable, Equatable {
        case io
        case noSpace
        case shutdown
    }

    /// Called once, from a pipeline thread: nil when the request succeeded.
    public typealias Completion = @Sendable (Failure?) -> Void

    public var kind: Kind
    public var offset: UInt64
    public var fua: Bool
    /// Set until the request is answered; nil once answered.
    var completion: Completion?

    public init(_ kind: Kind, offset: UInt64, fua: Bool = false, completion: Completion?) {
        self.kind = kind
        self.offset = offset
        self.fua = fua
        self.completion = completion
    }

    /// The request a journal change came from (crash tests replay change streams through
    /// the pipeline). A zero keeps its range allocated.
    public init(_ change: Change, completion: Completion?) {
        switch change.kind {
        case .write: self.init(.write(change.data), offset: change.offset, fua: change.fua, completion: completion)
        case .zero: self.init(.zero(length: change.length, noHole: true), offset: change.offset, fua: change.fua, completion: completion)
        case .trim: self.init(.trim(length: change.length), offset: change.offset, fua: change.fua, completion: completion)
        case .flush, .catchUp: self.init(.flush, offset: 0, completion: completion)  // a catch-up is never a host's change
        }
    }

    public var bytes: Int { if case .write(let d) = kind { return d.count } else { return 0 } }

    /// A FLUSH, or a write the client asked to be durable before its answer (FUA).
    public var needsSync: Bool {
        if fua { return true }
        if case .flush = kind { return true }
        return false
    }

    public var range: Range<UInt64> {
        switch kind {
        case .write(let d): return offset..<offset + UInt64(d.count)
        case let .zero(length, _), let .trim(length): return offset..<offset + length
        case .flush: return 0..<0
        }
    }

    /// The journal change this request becomes.
    var change: Change {
        switch kind {
        case .write(let data): return .write(offset, data, fua: fua)
        case let .zero(length, _): return .zero(offset, length, fua: fua)
        case let .trim(length): return .trim(offset, length, fua: fua)
        case .flush: return .flush
        }
    }

    /// Apply this change to `bytes`, which hold the volume from `base` on.
    public func lay(over bytes: UnsafeMutableRawBufferPointer, at base: UInt64) {
        let r = range.clamped(to: base..<base + UInt64(bytes.count))
        guard !r.isEmpty else { return }
        let dst = UnsafeMutableRawBufferPointer(rebasing: bytes[Int(r.lowerBound - base)..<Int(r.upperBound - base)])
        switch kind {
        case .write(let data):
            let src = Int(r.lowerBound - offset)
            data.withUnsafeBytes { dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[src..<src + r.count])) }
        case .zero, .trim:
            dst.initializeMemory(as: UInt8.self, repeating: 0)
        case .flush: break
        }
    }

    /// Write this change to the source (a journalled batch's, in seq order). Writes are cut at
    /// `pieceBytes` boundaries (`ServePipeline.sourceWritePieceBytes`).
    func apply(to source: BlockFile, pieceBytes: Int) throws {
        switch kind {
        case .write(let data): try source.write(at: offset, data, piecesOf: pieceBytes)
        case let .zero(length, noHole):
            if noHole {
                if try !source.zeroRange(at: offset, length: length) { try source.writeZeros(at: offset, length: length) }
            } else {
                try source.punchHole(at: offset, length: length)
            }
        case let .trim(length): try source.punchHole(at: offset, length: length)
        case .flush: break
        }
    }
}

/// What the serve pipeline tells the daemon (metrics, logs). Called from pipeline threads.
public protocol ServePipelineObserver: AnyObject, Sendable {
    /// A group commit's records are in the log (not yet durable).
    func journalAppended(records: Int, bytes: Int, lastSeq: UInt64)
    /// A sync finished: which one, and how long it took.
    func synced(_ kind: ServePipeline.SyncKind, nanoseconds: UInt64)
    /// The volume is fenced: every later write-nature request fails. Called once.
    func fenced(_ why: String)
    /// The journal was full (`error`) and its oldest history was folded into the base
    /// (`ServePipeline.FullPolicy.compact`) to make room.
    func madeRoom(_ report: CompactionReport, after error: String)
}
