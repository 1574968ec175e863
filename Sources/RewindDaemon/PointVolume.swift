import Logging
import NIOCore
import NIOPosix
import RewindCore
import RewindNBD

/// The `BlockTarget` of a point in time (`rewind export`, and `NAME@POINT` through `serve`):
/// reads from a pinned `PointReader` on a thread pool; read-only, or writable into an
/// `Overlay` whose blocks lie over the point. `detach()` releases the pin.
final class PointVolume: BlockTarget, @unchecked Sendable {
    let size: UInt64
    let readOnly: Bool
    /// Zeroing an overlay's whole blocks writes only its map.
    var canFastZero: Bool { overlay != nil }
    let reader: PointReader
    let overlay: Overlay?
    private let pool: NIOThreadPool
    private let logger: Logger
    /// Extents reported per BLOCK_STATUS reply, bounding its size.
    static let maxExtents = 1024
    /// Reads from this size on report their holes and zero blocks as holes.
    static let holeDetectionMinBytes: UInt32 = 64 * 1024

    init(reader: PointReader, overlay: Overlay?, pool: NIOThreadPool, logger: Logger) {
        self.reader = reader
        self.overlay = overlay
        self.pool = pool
        self.logger = logger
        size = reader.mirror.volumeSize
        readOnly = overlay == nil
    }

    func detach() { reader.close() }

    /// Run `body` on the pool; a failure is logged and answered EIO (EPERM, ENOSPC kept).
    private func run<T: Sendable>(_ what: String, on loop: EventLoop, _ body: @escaping @Sendable () throws -> T) -> EventLoopFuture<T> {
        let logger = self.logger, seq = reader.seq
        return pool.runIfActive(eventLoop: loop, body).flatMapErrorThrowing { error in
            if let e = error as? NBDErrno { throw e }
            logger.error("\(what) of seq:\(seq) failed: \(error)")
            if case let RewindError.io(_, _, errno) = error, errno == ENOSPC { throw NBDErrno.nospc }
            throw NBDErrno.io
        }
    }

    /// The point's bytes, or the overlay's over them.
    private func readVolume(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        guard let overlay else { return try reader.read(at: offset, into: buffer) }
        try overlay.read(at: offset, into: buffer) { at, dst in try reader.read(at: at, into: dst) }
    }

    func read(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<[ReadExtent]> {
        guard length > 0 else { return loop.makeSucceededFuture([]) }
        // A small read of cached pages is answered on the event loop: the thread pool's round
        // trip (two wake-ups) costs more than the read.
        if overlay == nil && length < Self.holeDetectionMinBytes,
           let buffer = ByteBuffer.filled(count: Int(length), { reader.readIfCached(at: offset, into: $0) }) {
            return loop.makeSucceededFuture([.data(offset: offset, bytes: buffer)])
        }
        return run("read", on: loop) { [self] in
            let range = offset..<offset + UInt64(length)
            guard overlay == nil else {
                // With an overlay: its runs over the point's allocation, then the bytes.
                let pieces = length >= Self.holeDetectionMinBytes ? try allocation(range, limit: 64) : [(range, PointReader.Allocation.data)]
                var out: [ReadExtent] = []
                var at = offset
                for (piece, kind) in pieces {
                    out.append(kind == .data ? .data(offset: piece.lowerBound, bytes: try readBuffer(piece))
                                             : .hole(offset: piece.lowerBound, length: UInt32(piece.count)))
                    at = piece.upperBound
                }
                if at < range.upperBound { out.append(.data(offset: at, bytes: try readBuffer(at..<range.upperBound))) }
                return out
            }
            // One walk: the bytes, and the holes, of which those of 64 KiB or more go out as holes.
            let n = Int(length)
            var buffer = ByteBufferAllocator().buffer(capacity: n)
            var holes: [Range<UInt64>] = []
            try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: n) { raw in
                holes = try reader.readFindingHoles(at: offset, into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<n]))
                return n
            }
            holes.removeAll { $0.count < Int(Self.holeDetectionMinBytes) }
            guard !holes.isEmpty else { return [.data(offset: offset, bytes: buffer)] }
            var out: [ReadExtent] = []
            var at = offset
            for h in holes {
                if h.lowerBound > at, let slice = buffer.getSlice(at: Int(at - offset), length: Int(h.lowerBound - at)) {
                    out.append(.data(offset: at, bytes: slice))
                }
                out.append(.hole(offset: h.lowerBound, length: UInt32(h.count)))
                at = h.upperBound
            }
            if at < range.upperBound, let slice = buffer.getSlice(at: Int(at - offset), length: Int(range.upperBound - at)) {
                out.append(.data(offset: at, bytes: slice))
            }
            return out
        }
    }

    private func readBuffer(_ range: Range<UInt64>) throws -> ByteBuffer {
        let n = range.count
        var buffer = ByteBufferAllocator().buffer(capacity: n)
        try buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: n) { raw in
            try readVolume(at: range.lowerBound, into: UnsafeMutableRawBufferPointer(rebasing: raw[0..<n]))
            return n
        }
        return buffer
    }

    /// Where `range`'s content comes from: the overlay's blocks over the point's allocation.
    private func allocation(_ range: Range<UInt64>, limit: Int) throws -> [(Range<UInt64>, PointReader.Allocation)] {
        guard let overlay else { return try reader.allocation(range, limit: limit) }
        let bs = UInt64(overlay.blockSize)
        var out: [(Range<UInt64>, PointReader.Allocation)] = []
        for (block, count, state) in try overlay.runs(range.lowerBound / bs, (range.upperBound + bs - 1) / bs) {
            let r = max(block * bs, range.lowerBound)..<min((block + count) * bs, range.upperBound)
            switch state {
            case .point: out += try reader.allocation(r, limit: limit - out.count)
            case .data: out.append((r, .data))
            case .zero: out.append((r, .zero))
            }
            if out.count >= limit { break }
        }
        return Array(out.prefix(limit))
    }

    private func overlayOrRefuse() throws -> Overlay {
        guard let overlay else { throw NBDErrno.perm }  // the NBD layer refuses writes to a read-only export first
        return overlay
    }

    func write(offset: UInt64, data: [UInt8], fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        run("overlay write", on: loop) { [self] in
            let overlay = try overlayOrRefuse()
            try data.withUnsafeBytes { raw in
                try overlay.write(at: offset, raw) { at, dst in try reader.read(at: at, into: dst) }
            }
            if fua { try overlay.sync() }
        }
    }

    func writeZeroes(offset: UInt64, length: UInt32, noHole: Bool, fastZero: Bool, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        run("overlay zero", on: loop) { [self] in
            let overlay = try overlayOrRefuse()
            try overlay.zero(at: offset, length: UInt64(length)) { at, dst in try reader.read(at: at, into: dst) }
            if fua { try overlay.sync() }
        }
    }

    func trim(offset: UInt64, length: UInt32, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        writeZeroes(offset: offset, length: length, noHole: false, fastZero: false, fua: fua, on: loop)
    }

    func flush(on loop: EventLoop) -> EventLoopFuture<Void> {
        guard let overlay else { return loop.makeSucceededVoidFuture() }  // nothing written: nothing to make durable
        return run("overlay flush", on: loop) { try overlay.sync() }
    }

    func cache(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<Void> {
        loop.makeSucceededVoidFuture()
    }

    func blockStatus(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<[AllocationExtent]> {
        run("block status", on: loop) { [self] in
            try allocation(offset..<offset + UInt64(length), limit: Self.maxExtents).map { range, kind in
                AllocationExtent(length: UInt32(range.count), flags: kind == .data ? [] : [.hole, .zero])  // zeroed blocks take no space either
            }
        }
    }
}
