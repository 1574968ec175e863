import NIOCore

extension ByteBuffer {
    /// A new buffer of `count` bytes filled by `fill`, or nil when `fill` says it could not
    /// (a read from the page cache that would have waited).
    static func filled(count: Int, _ fill: (UnsafeMutableRawBufferPointer) -> Bool) -> ByteBuffer? {
        var buffer = ByteBufferAllocator().buffer(capacity: count)
        var done = false
        buffer.writeWithUnsafeMutableBytes(minimumWritableBytes: count) { raw in
            done = fill(UnsafeMutableRawBufferPointer(rebasing: raw[0..<count]))
            return done ? count : 0
        }
        return done ? buffer : nil
    }
}
