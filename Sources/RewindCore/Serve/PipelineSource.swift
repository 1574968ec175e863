/// Where the serve pipeline (`ServePipeline`) puts journalled writes after the journal:
/// `rewind serve`'s source file, or nothing at all for `rewind tap`, whose upstream server
/// completed each write before it reached the journal.
public protocol PipelineSource: AnyObject, Sendable {
    /// The volume's bytes as the source holds them (reads laid over with queued writes, and
    /// the journal's read-modify-write of a partial block).
    func read(at offset: UInt64, into dst: UnsafeMutableRawBufferPointer) throws
    /// Write one journalled change, cut at `pieceBytes` boundaries.
    func apply(_ op: VolumeOp, pieceBytes: Int) throws
    func dataSync() throws
}

extension BlockFile: PipelineSource {
    public func apply(_ op: VolumeOp, pieceBytes: Int) throws {
        try op.apply(to: self, pieceBytes: pieceBytes)
    }
}

/// The source of a tapped volume: the upstream server already holds every write the pipeline
/// journals, so applying and syncing are nothing. Reads are never needed — a tap journals whole
/// blocks only (`TapVolume` reads a partial block's rest back from the upstream) — and one
/// that comes anyway fails, which fences the volume rather than journal a guess.
public final class JournalOnlySource: PipelineSource {
    public init() {}
    public func read(at offset: UInt64, into dst: UnsafeMutableRawBufferPointer) throws {
        throw RewindError.invalidArgument("a tapped volume has no local source to read at \(offset) (a partial block reached the journal)")
    }
    public func apply(_ op: VolumeOp, pieceBytes: Int) throws {}
    public func dataSync() throws {}
}
