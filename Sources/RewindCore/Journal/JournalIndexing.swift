/// How a `JournalWriter` indexes the records it appends to the log: in an LMDB write
/// transaction on the writer's thread (`InlineIndexing`), or on a thread of its own
/// (`ThreadedIndexing`, serve).
///
/// One append calls `beginAppend`, then for each record `index` — and, to merge a partial
/// block, `newest` and `readUnindexed` for the block's current content — then `finishAppend`
/// with the header it leaves. Errors are the strategy's own; the writer turns LMDB's into
/// `RewindError.journal`.
protocol JournalIndexing: AnyObject {
    /// The header as of the last append (nil before the first, and inline once committed or
    /// aborted): its `logEnd` is how far `syncLog` makes the log durable.
    var meta: MirrorMeta? { get }
    /// Appended since the last `requestCommit` or `commit` (threaded only).
    var commitOwed: Bool { get }

    /// The header an append starts from; resets the appender's `syncedTo` when it reads it.
    func beginAppend() throws -> MirrorMeta
    /// Index one record of the append (its payload in the chunk being built); `blocks` is how
    /// many block entries it may add (stored and zeroed blocks).
    func index(_ header: RecordHeader, seq: UInt64, blockHashes: [UInt64], blocks: Int) throws
    /// The newest entry of `block` the append can see, or nil: then `readUnindexed` reads it.
    func newest(_ block: UInt64) throws -> (seq: UInt64, content: BlockContent)?
    /// `block`'s content where `newest` found no entry for it.
    func readUnindexed(_ block: UInt64, into dst: UnsafeMutableRawBufferPointer) throws
    /// The append is in the log: stage `meta`, the header it leaves (`sourceSynced` as passed
    /// to `append`).
    func finishAppend(_ meta: MirrorMeta, sourceSynced: UInt64?) throws
    /// Make every append so far visible to readers (after syncing the log).
    func commit() throws
    /// Commit every append so far, soon (not waiting).
    func requestCommit()
    /// Abandon what is staged; with `keepLog` false, the log too where the strategy can.
    func abort(keepLog: Bool)
    /// After `abort`, when the writer goes: end whatever runs on its own.
    func stop()
}
