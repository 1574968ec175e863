/// The chunk being built for one group commit: its payload — bytes copied into `payload`,
/// and large aligned writes kept as the caller's arrays — and its record headers.
struct ChunkBuilder {
    enum Part {
        case copied(from: Int, length: Int)  // a run of `payload`
        case direct([UInt8])
    }
    let start: UInt64
    let firstSeq: UInt64
    let generation: UInt64
    /// The copied bytes (its capacity is reused between group commits).
    var payload: [UInt8] = []
    private(set) var parts: [Part] = []
    /// Where each part starts in the chunk's payload.
    private var partStarts: [Int] = []
    private(set) var payloadBytes = 0
    var records: [UInt8] = []
    private(set) var count: UInt32 = 0

    init(start: UInt64, firstSeq: UInt64, generation: UInt64) {
        (self.start, self.firstSeq, self.generation) = (start, firstSeq, generation)
    }

    /// Stream position of the payload (what records and index entries call the segment).
    var payloadStart: UInt64 { start + UInt64(LogChunk.headerSize) }

    private mutating func grow(copied n: Int) {
        if case let .copied(from, length)? = parts.last {
            parts[parts.count - 1] = .copied(from: from, length: length + n)
        } else {
            parts.append(.copied(from: payload.count - n, length: n))
            partStarts.append(payloadBytes)
        }
        payloadBytes += n
    }

    mutating func appendCopied(_ data: [UInt8]) {
        payload.append(contentsOf: data)
        grow(copied: data.count)
    }

    /// Append `n` zero bytes to the copied payload; returns where they start in `payload`.
    mutating func appendZeros(_ n: Int) -> Int {
        let at = payload.count
        payload.append(contentsOf: repeatElement(0, count: n))
        grow(copied: n)
        return at
    }

    mutating func appendDirect(_ data: [UInt8]) {
        parts.append(.direct(data))
        partStarts.append(payloadBytes)
        payloadBytes += data.count
    }

    /// Copy `dst.count` bytes from payload offset `offset` (within one part: a block).
    func copy(from offset: Int, into dst: UnsafeMutableRawBufferPointer) {
        var lo = 0, hi = partStarts.count - 1
        while lo < hi {  // the last part starting at or before offset
            let mid = (lo + hi + 1) / 2
            if partStarts[mid] <= offset { lo = mid } else { hi = mid - 1 }
        }
        let inPart = offset - partStarts[lo]
        switch parts[lo] {
        case let .copied(from, _):
            payload.withUnsafeBytes { dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[from + inPart..<from + inPart + dst.count])) }
        case let .direct(data):
            data.withUnsafeBytes { dst.copyMemory(from: UnsafeRawBufferPointer(rebasing: $0[inPart..<inPart + dst.count])) }
        }
    }

    mutating func add(_ header: RecordHeader) {
        records.append(contentsOf: header.encoded(seq: firstSeq + UInt64(count)))
        count += 1
    }

    func header() -> LogChunk {
        LogChunk(generation: generation, firstSeq: firstSeq, count: count, payloadBytes: UInt64(payloadBytes),
                 recordsCheck: xxh3(records))
    }
}
