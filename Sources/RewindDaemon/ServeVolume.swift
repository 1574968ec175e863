import Foundation
import Logging
import NIOCore
import NIOPosix
import RewindCore
import RewindNBD

/// The `BlockTarget` of `rewind serve`: reads come from the source file (on a thread pool,
/// never on an event loop); writes go through the `ServePipeline` into the journal and the source.
final class ServeVolume: BlockTarget, @unchecked Sendable {
    let size: UInt64
    let readOnly = false
    let canFastZero: Bool
    private let source: BlockFile
    private let writer: ServePipeline
    private let pool: NIOThreadPool
    /// Extents reported per BLOCK_STATUS reply, bounding its size.
    static let maxExtents = 1024
    /// Reads up to this size are answered as data without asking the file system for holes.
    static let holeDetectionMinBytes: UInt32 = 64 * 1024
    /// Reads up to this size are tried on the event loop first (`readIfCached`).
    static let inlineReadMaxBytes: UInt32 = 4 << 20

    init(source: BlockFile, writer: ServePipeline, pool: NIOThreadPool, canFastZero: Bool) throws {
        self.source = source
        self.writer = writer
        self.pool = pool
        self.size = try source.size()
        self.canFastZero = canFastZero
    }

    func write(offset: UInt64, data: [UInt8], fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        guard !data.isEmpty else { return loop.makeSucceededVoidFuture() }
        return writer.submit(.write(data), offset: offset, fua: fua, on: loop)
    }

    func writeZeroes(offset: UInt64, length: UInt32, noHole: Bool, fastZero: Bool, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        guard length > 0 else { return loop.makeSucceededVoidFuture() }
        return writer.submit(.zero(length: UInt64(length), noHole: noHole), offset: offset, fua: fua, on: loop)
    }

    func trim(offset: UInt64, length: UInt32, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        guard length > 0 else { return loop.makeSucceededVoidFuture() }
        return writer.submit(.trim(length: UInt64(length)), offset: offset, fua: fua, on: loop)
    }

    func flush(on loop: EventLoop) -> EventLoopFuture<Void> {
        writer.submit(.flush, offset: 0, fua: false, on: loop)
    }

    func read(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<[ReadExtent]> {
        guard length > 0 else { return loop.makeSucceededFuture([]) }
        if let cached = readIfCached(offset: offset, length: length) {
            return loop.makeSucceededFuture(cached)
        }
        let (source, writer) = (self.source, self.writer)
        return pool.runIfActive(eventLoop: loop) {
            let end = offset + UInt64(length)
            // Answered writes not yet in the source: read, then lay them over in order.
            let pending = writer.overlay(offset..<end)
            if !pending.isEmpty {
                let n = Int(length)
                var buffer = ByteBufferAllocator().buffer(capacity: n)
                try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: n) { raw in
                    let bytes = UnsafeMutableRawBufferPointer(rebasing: raw[0..<n])
                    try source.read(at: offset, into: bytes)
                    for op in pending { op.lay(over: bytes, at: offset) }
                    return n
                }
                return [.data(offset: offset, bytes: buffer)]
            }
            // Small reads skip hole detection (two lseeks) and just read.
            if length <= Self.holeDetectionMinBytes {
                return [.data(offset: offset, bytes: try Self.read(source, offset..<end))]
            }
            return try Self.allocation(source, offset..<end).map { range, isData in
                isData ? .data(offset: range.lowerBound, bytes: try Self.read(source, range))
                       : .hole(offset: range.lowerBound, length: UInt32(range.count))
            }
        }.flatMapErrorThrowing { _ in throw NBDErrno.io }
    }

    /// The read answered on the event loop, when it can be without blocking: no queued write
    /// overlaps it and the page cache holds all of it (`RWF_NOWAIT`). Saves the thread-pool
    /// round trip that otherwise halves small-read throughput. A large read's runs of zero
    /// blocks go out as holes (the page cache cannot say which were holes on disk).
    private func readIfCached(offset: UInt64, length: UInt32) -> [ReadExtent]? {
        guard length <= Self.inlineReadMaxBytes, !writer.overlaps(offset..<offset + UInt64(length)) else { return nil }
        guard let buffer = ByteBuffer.filled(count: Int(length), { source.readIfCached(at: offset, into: $0) }) else { return nil }
        if length <= Self.holeDetectionMinBytes { return [.data(offset: offset, bytes: buffer)] }
        return Self.splitZeroRuns(buffer, at: offset)
    }

    /// `buffer` (the volume from `offset`) as data pieces and hole pieces, a hole being a run of
    /// at least `holeDetectionMinBytes` of zeros in whole 4 KiB steps from the buffer's start.
    static func splitZeroRuns(_ buffer: ByteBuffer, at offset: UInt64) -> [ReadExtent] {
        let step = 4096, minRun = Int(holeDetectionMinBytes), n = buffer.readableBytes
        var zeroRuns: [Range<Int>] = []
        buffer.withUnsafeReadableBytes { raw in
            var at = 0
            while at < n {
                var end = at
                while end < n, isAllZero(UnsafeRawBufferPointer(rebasing: raw[end..<min(end + step, n)])) { end = min(end + step, n) }
                if end - at >= minRun { zeroRuns.append(at..<end) }
                at = end == at ? at + step : end
            }
        }
        guard !zeroRuns.isEmpty else { return [.data(offset: offset, bytes: buffer)] }
        var pieces: [ReadExtent] = []
        var at = 0
        for run in zeroRuns {
            if run.lowerBound > at, let slice = buffer.getSlice(at: at, length: run.lowerBound - at) {
                pieces.append(.data(offset: offset + UInt64(at), bytes: slice))
            }
            pieces.append(.hole(offset: offset + UInt64(run.lowerBound), length: UInt32(run.count)))
            at = run.upperBound
        }
        if at < n, let slice = buffer.getSlice(at: at, length: n - at) {
            pieces.append(.data(offset: offset + UInt64(at), bytes: slice))
        }
        return pieces
    }

    /// `range` of the source, read into a new buffer (`pread`).
    static func read(_ source: BlockFile, _ range: Range<UInt64>) throws -> ByteBuffer {
        let n = range.count
        var buffer = ByteBufferAllocator().buffer(capacity: n)
        try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: n) { raw in
            try source.read(at: range.lowerBound, into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<n]))
            return n
        }
        return buffer
    }

    /// `range` cut into data and hole pieces by the source's extents (`SEEK_DATA`/`SEEK_HOLE`),
    /// in order, at most `limit` pieces (then the pieces stop short of the range's end).
    static func allocation(_ source: BlockFile, _ range: Range<UInt64>, limit: Int = .max) throws -> [(Range<UInt64>, isData: Bool)] {
        var pieces: [(Range<UInt64>, isData: Bool)] = []
        var at = range.lowerBound
        for data in try source.dataExtents(size: range.upperBound, from: range.lowerBound) {
            if data.lowerBound > at { pieces.append((at..<data.lowerBound, false)) }
            pieces.append((data, true))
            at = data.upperBound
            if pieces.count >= limit { return Array(pieces.prefix(limit)) }
        }
        if at < range.upperBound { pieces.append((at..<range.upperBound, false)) }
        return Array(pieces.prefix(limit))
    }

    func cache(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<Void> {
        source.willNeed(at: offset, length: UInt64(length))
        return loop.makeSucceededVoidFuture()
    }

    func blockStatus(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<[AllocationExtent]> {
        let (source, writer) = (self.source, self.writer)
        return pool.runIfActive(eventLoop: loop) {
            let end = offset + UInt64(length)
            // Queued writes make the source's holes stale: report the range as data (always true).
            if writer.overlaps(offset..<end) { return [AllocationExtent(length: length, flags: [])] }
            return try Self.allocation(source, offset..<end, limit: Self.maxExtents).map { range, isData in
                AllocationExtent(length: UInt32(range.count), flags: isData ? [] : [.hole, .zero])
            }
        }.flatMapErrorThrowing { _ in throw NBDErrno.io }
    }
}
