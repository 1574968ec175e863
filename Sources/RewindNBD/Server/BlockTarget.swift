import NIOCore

/// One contiguous piece of a read: data, or a hole that reads as zeros.
public enum ReadExtent: Sendable {
    case data(offset: UInt64, bytes: ByteBuffer)
    case hole(offset: UInt64, length: UInt32)
}

/// One `base:allocation` extent.
public struct AllocationExtent: Sendable, Equatable {
    public var length: UInt32
    public var flags: NBDExtentFlags
    public init(length: UInt32, flags: NBDExtentFlags) { self.length = length; self.flags = flags }
    public static func == (a: Self, b: Self) -> Bool { a.length == b.length && a.flags.rawValue == b.flags.rawValue }
}

/// What an NBD export serves. The NBD layer knows nothing else of the engine: requests reach
/// the target already validated (in range, flags allowed), and its answers are futures so no
/// blocking call ever runs on an event loop. A failed future carries an `NBDErrno`.
public protocol BlockTarget: AnyObject, Sendable {
    var size: UInt64 { get }
    var readOnly: Bool { get }
    /// Whether FAST_ZERO can be honoured (zeroing without writing data).
    var canFastZero: Bool { get }
    /// Of TRIM, WRITE_ZEROES and FAST_ZERO, the ones this target offers (nil: all it can). A
    /// tap offers what its upstream does.
    var offeredFlags: NBDTransmissionFlags? { get }
    /// The block size constraints announced with NBD_INFO_BLOCK_SIZE (nil: 1, 4 KiB, 32 MiB).
    var blockSizes: NBDBlockSizes? { get }

    func read(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<[ReadExtent]>
    func write(offset: UInt64, data: [UInt8], fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void>
    func writeZeroes(offset: UInt64, length: UInt32, noHole: Bool, fastZero: Bool, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void>
    func trim(offset: UInt64, length: UInt32, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void>
    func flush(on loop: EventLoop) -> EventLoopFuture<Void>
    func cache(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<Void>
    func blockStatus(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<[AllocationExtent]>
    /// The connection that looked this target up is done with it (see `NBDExportCatalog`).
    func detach()
}

extension BlockTarget {
    public func detach() {}
    public var offeredFlags: NBDTransmissionFlags? { nil }
    public var blockSizes: NBDBlockSizes? { nil }
}

/// NBD_INFO_BLOCK_SIZE's three sizes.
public struct NBDBlockSizes: Sendable, Equatable {
    public var minimum: UInt32
    public var preferred: UInt32
    public var maximum: UInt32
    public init(minimum: UInt32, preferred: UInt32, maximum: UInt32) {
        (self.minimum, self.preferred, self.maximum) = (minimum, preferred, maximum)
    }
}

/// Per-request observations for metrics, reported by the connection handler.
public protocol NBDObserver: Sendable {
    func requestStarted(_ command: NBDCommand)
    func requestFinished(_ command: NBDCommand, bytes: UInt64, nanoseconds: UInt64, error: NBDErrno?)
    func connectionOpened()
    func connectionClosed()
}
