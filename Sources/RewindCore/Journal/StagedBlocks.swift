/// The blocks one append has changed so far, newest first: what a later partial write in the
/// same append is merged with when the index is built on another thread (`IndexCommitter`),
/// and the LMDB transaction cannot be asked. Stored blocks by block; whole blocks a zero or
/// trim cleared as ranges (a large trim would otherwise cost an entry per block).
struct StagedBlocks {
    private var stored: [UInt64: (seq: UInt64, content: BlockContent)] = [:]
    private var zeroed: [(seq: UInt64, blocks: Range<UInt64>)] = []

    /// Record what `index` would for this record (`Mirror.index`): an entry per stored block,
    /// and the whole blocks it zeroes.
    mutating func add(_ h: RecordHeader, seq: UInt64, blockHashes: [UInt64], blockSize: Int) {
        let (blocks, zeroRange) = Mirror.layout(kind: h.kind, offset: h.offset, length: h.length, blockSize: UInt64(blockSize))
        for (i, block) in blocks.enumerated() {
            stored[block] = (seq, .data(segment: h.segment, offset: h.segmentOffset + UInt32(i * blockSize), hash: blockHashes[i]))
        }
        if !zeroRange.isEmpty { zeroed.append((seq, zeroRange)) }
    }

    /// The newest content this append gave `block`, or nil if it has not touched it.
    func newest(_ block: UInt64) -> (seq: UInt64, content: BlockContent)? {
        var found = stored[block]
        for z in zeroed.reversed() where z.blocks.contains(block) {
            if found.map({ z.seq > $0.seq }) ?? true { found = (z.seq, .zero) }
            break
        }
        return found
    }
}
