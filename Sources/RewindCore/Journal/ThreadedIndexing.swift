/// Indexing on a thread of its own (`IndexCommitter`, serve): each append's records go to it
/// as one batch, and the writer only writes the log — its appends never wait for LMDB. The
/// header is read once and then kept here, as the index thread will have it once it has
/// indexed every append so far.
///
/// Use from the writer's thread only.
final class ThreadedIndexing: JournalIndexing {
    private let mirror: Mirror
    private var journal: Journal { mirror.journal }
    private let appender: ChunkAppender
    private let committer: IndexCommitter
    /// The volume's current content at a byte offset: what a partial block is merged with,
    /// unless an earlier change of the same append touched it.
    private let readVolume: (UInt64, UnsafeMutableRawBufferPointer) throws -> Void
    private(set) var meta: MirrorMeta?
    /// Set when the index thread was given up (`abort`): appends are refused from then on, since
    /// the log holds records past the index that only the next writer's replay may build on.
    private var indexGivenUp = false
    private(set) var commitOwed = false
    /// What partial blocks of the current append merge with.
    private var staged = StagedBlocks()
    /// The current append's records, for the index thread.
    private var batch = IndexCommitter.Batch()

    /// Start the index thread (`IndexCommitter`), by `policy`; `onFailure` runs on it when
    /// indexing fails — later appends then throw.
    init(mirror: Mirror, appender: ChunkAppender, policy: IndexCommitter.Policy,
         onFailure: @escaping @Sendable (Error) -> Void,
         readVolume: @escaping (UInt64, UnsafeMutableRawBufferPointer) throws -> Void) {
        self.mirror = mirror
        self.appender = appender
        self.readVolume = readVolume
        committer = IndexCommitter(mirror: mirror, policy: policy, onFailure: onFailure)
    }

    /// The header as the index thread will have it once it has indexed every append so far
    /// (read once; then kept here).
    func beginAppend() throws -> MirrorMeta {
        guard !indexGivenUp else { throw RewindError.invalidArgument("the journal's index thread was given up") }
        (staged, batch) = (StagedBlocks(), IndexCommitter.Batch())
        if let meta { return meta }
        let m = try journal.env.read { try journal.readMeta($0) }
        if m.pendingRollback != MirrorMeta.none { throw RewindError.interruptedRollback(target: m.pendingRollback) }
        appender.syncedTo = m.logEnd
        meta = m
        return m
    }

    func index(_ header: RecordHeader, seq: UInt64, blockHashes: [UInt64], blocks: Int) {
        batch.blocks += blocks
        staged.add(header, seq: seq, blockHashes: blockHashes, blockSize: mirror.blockSize)
        batch.records.append((header, seq, blockHashes))
    }

    /// As this append's earlier changes left it (the LMDB transaction is the index thread's).
    func newest(_ block: UInt64) -> (seq: UInt64, content: BlockContent)? {
        staged.newest(block)
    }

    /// The volume: it holds every append before this one.
    func readUnindexed(_ block: UInt64, into dst: UnsafeMutableRawBufferPointer) throws {
        try readVolume(block * UInt64(mirror.blockSize), dst)
    }

    func finishAppend(_ meta: MirrorMeta, sourceSynced: UInt64?) throws {
        var batch = self.batch
        (staged, self.batch) = (StagedBlocks(), IndexCommitter.Batch())
        batch.sourceSynced = sourceSynced.map { _ in meta.sourceSyncedSeq }
        (batch.lastSeq, batch.lastTime, batch.lastCumulative, batch.logEnd) = (meta.lastSeq, meta.lastTime, meta.lastCumulative, meta.logEnd)
        try committer.send(batch)
        commitOwed = true
        self.meta = meta
    }

    /// Wait until the index thread has committed every append so far.
    func commit() throws {
        commitOwed = false
        try committer.commitAndWait()
    }

    func requestCommit() {
        commitOwed = false
        committer.requestCommit()
    }

    /// Have the index thread give up its transaction and queue (whatever `keepLog` says: the
    /// log keeps them); every later append is refused.
    func abort(keepLog: Bool) {
        committer.abandon()
        indexGivenUp = true
    }

    func stop() {
        committer.stop()
    }
}
