import Foundation
import Logging
import NIOCore
import NIOPosix
import RewindCore
import RewindNBD

/// The `BlockTarget` of `rewind serve`: reads come from the source file (on a thread pool,
/// never on an event loop); writes go through the `VolumeWriter` into the journal and the source.
final class ServeVolume: BlockTarget, @unchecked Sendable {
    let size: UInt64
    let readOnly = false
    let canFastZero: Bool
    private let source: BlockFile
    private let writer: VolumeWriter
    private let pool: NIOThreadPool
    /// Extents reported per BLOCK_STATUS reply, bounding its size.
    static let maxExtents = 1024

    init(source: BlockFile, writer: VolumeWriter, pool: NIOThreadPool, canFastZero: Bool) throws {
        self.source = source
        self.writer = writer
        self.pool = pool
        self.size = try source.size()
        self.canFastZero = canFastZero
    }

    private func submit(_ kind: VolumeWriter.Kind, offset: UInt64, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        let promise = loop.makePromise(of: Void.self)
        writer.submit(.init(kind: kind, offset: offset, fua: fua, promise: promise))
        return promise.futureResult
    }

    func write(offset: UInt64, data: [UInt8], fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        guard !data.isEmpty else { return loop.makeSucceededVoidFuture() }
        return submit(.write(data), offset: offset, fua: fua, on: loop)
    }

    func writeZeroes(offset: UInt64, length: UInt32, noHole: Bool, fastZero: Bool, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        guard length > 0 else { return loop.makeSucceededVoidFuture() }
        return submit(.zero(length: UInt64(length), noHole: noHole), offset: offset, fua: fua, on: loop)
    }

    func trim(offset: UInt64, length: UInt32, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        guard length > 0 else { return loop.makeSucceededVoidFuture() }
        return submit(.trim(length: UInt64(length)), offset: offset, fua: fua, on: loop)
    }

    func flush(on loop: EventLoop) -> EventLoopFuture<Void> {
        submit(.flush, offset: 0, fua: false, on: loop)
    }

    func read(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<[ReadExtent]> {
        guard length > 0 else { return loop.makeSucceededFuture([]) }
        let source = self.source
        return pool.runIfActive(eventLoop: loop) {
            let end = offset + UInt64(length)
            var extents: [ReadExtent] = []
            var at = offset
            for data in try source.dataExtents(size: end, from: offset) {
                if data.lowerBound > at { extents.append(.hole(offset: at, length: UInt32(data.lowerBound - at))) }
                let n = Int(data.upperBound - data.lowerBound)
                var buffer = ByteBufferAllocator().buffer(capacity: n)
                try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: n) { raw in
                    try source.read(at: data.lowerBound, into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<n]))
                    return n
                }
                extents.append(.data(offset: data.lowerBound, bytes: buffer))
                at = data.upperBound
            }
            if at < end { extents.append(.hole(offset: at, length: UInt32(end - at))) }
            return extents
        }.flatMapErrorThrowing { _ in throw NBDErrno.io }
    }

    func cache(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<Void> {
        source.willNeed(at: offset, length: UInt64(length))
        return loop.makeSucceededVoidFuture()
    }

    func blockStatus(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<[AllocationExtent]> {
        let source = self.source
        return pool.runIfActive(eventLoop: loop) {
            let end = offset + UInt64(length)
            var extents: [AllocationExtent] = []
            var at = offset
            for data in try source.dataExtents(size: end, from: offset) {
                if data.lowerBound > at { extents.append(.init(length: UInt32(data.lowerBound - at), flags: [.hole, .zero])) }
                extents.append(.init(length: UInt32(data.upperBound - data.lowerBound), flags: []))
                at = data.upperBound
                if extents.count >= Self.maxExtents { return extents }
            }
            if at < end { extents.append(.init(length: UInt32(end - at), flags: [.hole, .zero])) }
            return extents
        }.flatMapErrorThrowing { _ in throw NBDErrno.io }
    }
}
