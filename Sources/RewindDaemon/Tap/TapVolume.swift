import Logging
import NIOConcurrencyHelpers
import NIOCore
import RewindCore
import RewindNBD

/// The `BlockTarget` of `rewind tap`: every command goes to the upstream server, and a
/// write-nature command the upstream completed becomes a journal record before the host is
/// answered. One the upstream failed goes back to the host with the upstream's errno and is
/// never journalled.
///
/// - Order: requests touching a common mirror block pass `WriteOrder` one at a time, so the
///   upstream and the journal see them in one order; the rest stay in flight together.
/// - Whole blocks: the journal is given whole blocks only. A write that covers a block in
///   part is widened with that block read back from the upstream after the write (it holds
///   this write and no later one: `WriteOrder`); so the mirror needs no local copy.
/// - TRIM is rewind's zeroing (CLI.md): it goes upstream as WRITE_ZEROES without NO_HOLE
///   (the server may still punch a hole), so the upstream reads back what the journal says.
///   TRIM is offered only where the upstream offers WRITE_ZEROES.
/// - FLUSH is answered once the upstream's FLUSH and the journal's sync are both done; FUA
///   goes upstream as FUA (or as a write then FLUSH, where FUA is not offered) and waits for
///   the journal's sync too.
/// - A request whose upstream outcome is unknown (the connection dropped under it) leaves
///   its range in doubt: before the next connection is used, those blocks are read back and
///   journalled as they are (`settleDoubts`), so the mirror stays in step either way.
final class TapVolume: BlockTarget, Sendable {
    let size: UInt64
    let readOnly: Bool
    let canFastZero: Bool
    let offeredFlags: NBDTransmissionFlags?
    let blockSizes: NBDBlockSizes?
    private let link: UpstreamLink
    private let writer: ServePipeline
    private let order: WriteOrder
    private let blockSize: UInt64
    private let upstreamFlags: NBDTransmissionFlags
    private let hasBlockStatus: Bool
    private let doubts = NIOLockedValueBox<[Range<UInt64>]>([])
    private let logger: Logger
    /// Ranges read back per request when settling doubts.
    static let settlePieceBytes: UInt64 = 4 << 20
    /// A zero or trim covering blocks in part is journalled as one write up to this size.
    static let zeroAsWriteMaxBytes = 1 << 20

    init(link: UpstreamLink, writer: ServePipeline, blockSize: Int, logger: Logger) {
        let info = link.info
        let f = info.flags
        size = info.size
        readOnly = f.contains(.readOnly)
        canFastZero = f.contains(.sendFastZero)
        var offered: NBDTransmissionFlags = []
        if f.contains(.sendWriteZeroes) { offered.formUnion([.sendWriteZeroes, .sendTrim]) }
        if f.contains(.sendFastZero) { offered.insert(.sendFastZero) }
        offeredFlags = offered
        blockSizes = info.blockSizes
        upstreamFlags = f
        hasBlockStatus = info.baseAllocationID != nil
        self.link = link
        self.writer = writer
        self.blockSize = UInt64(blockSize)
        order = WriteOrder(blockSize: blockSize)
        self.logger = logger
        link.onReconnect { [weak self] client in
            guard let self else { return client.eventLoop.makeSucceededVoidFuture() }
            return settleDoubts(on: client)
        }
    }

    /// The errno a host gets for `error` (a lost or broken upstream is EIO).
    static func errno(_ error: Error) -> NBDErrno {
        if let e = error as? NBDErrno { return e }
        if let e = error as? NBDClientError { return e.errno }
        return .io
    }

    /// Whether the upstream may have done the request despite `error`: all but its own answer.
    static func leavesDoubt(_ error: Error) -> Bool {
        if case .server = error as? NBDClientError { return false }
        return true
    }

    /// Blocks still in doubt (journalled once the upstream is back).
    var blocksInDoubt: UInt64 {
        doubts.withLockedValue { $0.reduce(0) { $0 + UInt64(widened($1).count) / blockSize } }
    }

    private func widened(_ r: Range<UInt64>) -> Range<UInt64> {
        r.lowerBound / blockSize * blockSize..<min(size, (r.upperBound + blockSize - 1) / blockSize * blockSize)
    }

    // MARK: reads and the rest

    func read(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<[ReadExtent]> {
        guard length > 0 else { return loop.makeSucceededFuture([]) }
        guard let client = link.client else { return loop.makeFailedFuture(NBDErrno.io) }
        // Runs of zeros go back as holes (fewer bytes to the host), as serve's reads do.
        return client.read(offset: offset, length: length)
            .map { length > ServeVolume.holeDetectionMinBytes ? ServeVolume.splitZeroRuns($0, at: offset) : [.data(offset: offset, bytes: $0)] }
            .flatMapErrorThrowing { throw Self.errno($0) }
    }

    func cache(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<Void> {
        guard let client = link.client else { return loop.makeFailedFuture(NBDErrno.io) }
        guard upstreamFlags.contains(.sendCache) else { return loop.makeSucceededVoidFuture() }  // advice only
        return client.cache(offset: offset, length: length).flatMapErrorThrowing { throw Self.errno($0) }
    }

    func blockStatus(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<[AllocationExtent]> {
        guard let client = link.client else { return loop.makeFailedFuture(NBDErrno.io) }
        // Without the upstream's `base:allocation`, everything is data (always true).
        guard hasBlockStatus else { return loop.makeSucceededFuture([AllocationExtent(length: length, flags: [])]) }
        return client.blockStatus(offset: offset, length: length).flatMapErrorThrowing { throw Self.errno($0) }
    }

    func flush(on loop: EventLoop) -> EventLoopFuture<Void> {
        guard let client = link.client else { return loop.makeFailedFuture(NBDErrno.io) }
        let upstream = upstreamFlags.contains(.sendFlush) ? client.flush() : loop.makeSucceededVoidFuture()
        let journal = writer.submit(.flush, offset: 0, fua: false, on: loop)
        return upstream.flatMapErrorThrowing { throw Self.errno($0) }.and(journal).map { _ in }
    }

    // MARK: write-nature requests

    func write(offset: UInt64, data: [UInt8], fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        guard !data.isEmpty else { return loop.makeSucceededVoidFuture() }
        let range = offset..<offset + UInt64(data.count)
        return change(range, fua: fua, on: loop, forward: { client in
            client.write(offset: offset, data: ByteBuffer(bytes: data), fua: fua && self.upstreamFlags.contains(.sendFUA))
        }, journal: { edges in
            guard !edges.isEmpty else { return [(.write(data), offset)] }
            let whole = self.widened(range)
            var bytes = self.widenedBytes(whole, edges: edges)
            let at = Int(offset - whole.lowerBound)
            bytes.replaceSubrange(at..<at + data.count, with: data)
            return [(.write(bytes), whole.lowerBound)]
        })
    }

    func writeZeroes(offset: UInt64, length: UInt32, noHole: Bool, fastZero: Bool, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        guard length > 0 else { return loop.makeSucceededVoidFuture() }
        guard upstreamFlags.contains(.sendWriteZeroes) else { return loop.makeFailedFuture(NBDErrno.notsup) }
        return zeroing(offset..<offset + UInt64(length), fua: fua, on: loop, noHole: noHole) { client in
            client.writeZeroes(offset: offset, length: length, fua: fua && self.upstreamFlags.contains(.sendFUA), noHole: noHole, fastZero: fastZero)
        }
    }

    func trim(offset: UInt64, length: UInt32, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        guard length > 0 else { return loop.makeSucceededVoidFuture() }
        guard upstreamFlags.contains(.sendWriteZeroes) else { return loop.makeFailedFuture(NBDErrno.notsup) }
        return zeroing(offset..<offset + UInt64(length), fua: fua, on: loop, noHole: nil) { client in
            client.writeZeroes(offset: offset, length: length, fua: fua && self.upstreamFlags.contains(.sendFUA))
        }
    }

    /// A zero (`noHole` given) or a trim (nil). Over whole blocks: one zero or trim record.
    /// Covering blocks in part and up to `zeroAsWriteMaxBytes` widened: one write record of
    /// the widened range, the edges as the upstream holds them and zeros between. Larger: the
    /// whole blocks as the zeroing and each partial end as a write of what the upstream holds
    /// (up to three records for the one request).
    private func zeroing(_ range: Range<UInt64>, fua: Bool, on loop: EventLoop, noHole: Bool?,
                         forward: @escaping @Sendable (NBDClient) -> EventLoopFuture<Void>) -> EventLoopFuture<Void> {
        change(range, fua: fua, on: loop, forward: forward) { edges in
            let bs = self.blockSize
            let whole = self.widened(range)
            if !edges.isEmpty && whole.count <= Self.zeroAsWriteMaxBytes {
                var bytes = self.widenedBytes(whole, edges: edges)
                let at = Int(range.lowerBound - whole.lowerBound)
                bytes.replaceSubrange(at..<at + range.count, with: repeatElement(0, count: range.count))
                return [(.write(bytes), whole.lowerBound)]
            }
            var ops: [(VolumeOp.Kind, UInt64)] = edges.map { block, content in
                (.write(content.getBytes(at: content.readerIndex, length: content.readableBytes) ?? []), block * bs)
            }
            let first = (range.lowerBound + bs - 1) / bs * bs, end = range.upperBound / bs * bs
            if first < end {
                let length = end - first
                ops.append((noHole.map { .zero(length: length, noHole: $0) } ?? .trim(length: length), first))
            }
            return ops
        }
    }

    /// One write-nature request: wait for its turn (`WriteOrder`), forward it, read back the
    /// blocks it covers in part, journal what `journal` makes of them, and answer once the
    /// journal has (at once for a plain write; after the log's sync for FUA).
    private func change(_ range: Range<UInt64>, fua: Bool, on loop: EventLoop,
                        forward: @escaping @Sendable (NBDClient) -> EventLoopFuture<Void>,
                        journal: @escaping @Sendable ([UInt64: ByteBuffer]) -> [(VolumeOp.Kind, UInt64)]) -> EventLoopFuture<Void> {
        // A fenced journal refuses the write: nothing goes upstream that it could not hold.
        guard writer.fenceReason == nil else { return loop.makeFailedFuture(NBDErrno.io) }
        let promise = loop.makePromise(of: Void.self)
        let needsFlush = fua && !upstreamFlags.contains(.sendFUA) && upstreamFlags.contains(.sendFlush)
        let partial = partialBlocks(of: range)
        order.enter(range) { [self] id in
            guard let client = link.client else {
                order.leave(id)
                return promise.fail(NBDErrno.io)
            }
            // Queue the journal's part, let the next request on these blocks go, answer.
            @Sendable func journalled(_ edges: [UInt64: ByteBuffer]) {
                let ops = journal(edges)
                if ops.count == 1 {
                    writer.submit(ops[0].0, offset: ops[0].1, fua: fua, on: loop).cascade(to: promise)
                } else {
                    let queued = ops.map { kind, offset in writer.submit(kind, offset: offset, fua: fua, on: loop) }
                    EventLoopFuture.andAllSucceed(queued, on: loop).cascade(to: promise)
                }
                order.leave(id)
            }
            @Sendable func failed(_ error: Error, upstreamDone: Bool) {
                if upstreamDone || Self.leavesDoubt(error) {
                    doubts.withLockedValue { $0.append(range) }
                    logger.warning("a write at \(range.lowerBound)+\(range.count) may or may not be upstream (\(error)); it is journalled as the upstream holds it once the connection is back")
                    // Settled on the next connection: end this one if it is still up.
                    if upstreamDone { _ = client.close() }
                }
                order.leave(id)
                promise.fail(Self.errno(error))
            }
            forward(client).whenComplete { [self] result in
                if case let .failure(error) = result { return failed(error, upstreamDone: false) }
                // The common case: whole blocks, no FLUSH owed — no more round trips.
                guard needsFlush || !partial.isEmpty else { return journalled([:]) }
                // FUA where the upstream offers no FUA: its FLUSH instead (where it has one).
                let flushed = needsFlush ? client.flush() : client.eventLoop.makeSucceededVoidFuture()
                flushed.flatMap { [self] in
                    readBlocks(partial, from: client)
                }.whenComplete { result in
                    switch result {
                    case let .success(edges): journalled(edges)
                    case let .failure(error): failed(error, upstreamDone: true)
                    }
                }
            }
        }
        return promise.futureResult
    }

    /// `whole` (block-aligned) as zeros with the partial blocks read back laid in.
    private func widenedBytes(_ whole: Range<UInt64>, edges: [UInt64: ByteBuffer]) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: whole.count)
        for (block, content) in edges {
            let at = Int(block * blockSize - whole.lowerBound)
            content.withUnsafeReadableBytes { src in
                bytes.withUnsafeMutableBytes { UnsafeMutableRawBufferPointer(rebasing: $0[at..<at + src.count]).copyMemory(from: src) }
            }
        }
        return bytes
    }

    /// The blocks `range` covers only in part.
    private func partialBlocks(of range: Range<UInt64>) -> [UInt64] {
        let bs = blockSize
        let head = range.lowerBound / bs, last = (range.upperBound - 1) / bs
        var partial: [UInt64] = []
        if range.lowerBound % bs != 0 || range.upperBound < (head + 1) * bs { partial.append(head) }
        if last != head && range.upperBound % bs != 0 { partial.append(last) }
        return partial
    }

    /// `blocks`' content, read from the upstream.
    private func readBlocks(_ blocks: [UInt64], from client: NBDClient) -> EventLoopFuture<[UInt64: ByteBuffer]> {
        let bs = blockSize
        guard !blocks.isEmpty else { return client.eventLoop.makeSucceededFuture([:]) }
        let reads = blocks.map { block in
            client.read(offset: block * bs, length: UInt32(min(bs, size - block * bs))).map { (block, $0) }
        }
        return EventLoopFuture.whenAllSucceed(reads, on: client.eventLoop).map { Dictionary(uniqueKeysWithValues: $0) }
    }

    /// Journal the blocks of requests left in doubt as the upstream now holds them, on a new
    /// connection before it is used; a failure keeps them in doubt for the next one.
    func settleDoubts(on client: NBDClient) -> EventLoopFuture<Void> {
        let loop = client.eventLoop
        let ranges = doubts.withLockedValue { d -> [Range<UInt64>] in let r = d; d = []; return r }
        guard !ranges.isEmpty else { return loop.makeSucceededVoidFuture() }
        var pieces: [Range<UInt64>] = []
        for r in ranges.map(widened).sorted(by: { $0.lowerBound < $1.lowerBound }) {
            var at = r.lowerBound
            while at < r.upperBound {
                let end = min(r.upperBound, at + Self.settlePieceBytes)
                pieces.append(at..<end)
                at = end
            }
        }
        let journalled = pieces.map { piece in
            client.read(offset: piece.lowerBound, length: UInt32(piece.count)).flatMap { [writer] buffer in
                writer.submit(.write(buffer.getBytes(at: buffer.readerIndex, length: buffer.readableBytes) ?? []),
                              offset: piece.lowerBound, fua: false, on: loop)
            }
        }
        let bytes = pieces.reduce(0) { $0 + $1.count }
        return EventLoopFuture.andAllSucceed(journalled, on: loop).map { [logger] in
            logger.notice("journalled \(bytes) bytes in \(ranges.count) ranges that were in doubt when the upstream dropped, as it holds them now")
        }.flatMapErrorThrowing { [doubts] error in
            doubts.withLockedValue { $0.append(contentsOf: ranges) }
            throw error
        }
    }
}
