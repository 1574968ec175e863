import NIOCore
import NIOPosix
import RewindCore
import RewindNBD

/// An NBD export as a volume's bytes (the upstream a tap protects, a source served by
/// qemu-nbd, nbdkit or nbd-server): `rewind init MIRROR --from NBD-URI` copies it into a base,
/// skipping what BLOCK_STATUS says reads as zeros, and `rewind verify MIRROR --against
/// NBD-URI` compares a point with it. Read in order, with a few requests in flight ahead so
/// the round trips overlap.
public final class NBDVolumeSource: VolumeSource {
    public let name: String
    private let client: NBDClient
    /// Set when this source made the connection (and closes it when done).
    private let group: MultiThreadedEventLoopGroup?
    private var ahead: [(offset: UInt64, length: Int, data: EventLoopFuture<ByteBuffer>)] = []
    private var next: UInt64 = 0
    static let window = 8

    /// Connect to `uri` and negotiate its export; a bad URI or a refusal is the user's error.
    public init(uri text: String) throws {
        let uri: NBDURI
        do { uri = try NBDURI(text) } catch let e as NBDURIError { throw RewindError.invalidArgument(e.description) }
        let tls = try NBDClientTLS.factory(for: uri)
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
        do {
            client = try NBDClient.connect(uri, group: group, tls: tls).wait()
        } catch {
            try? group.syncShutdownGracefully()
            throw RewindError.invalidArgument("\(text): \(error)")
        }
        self.group = group
        name = text
    }

    /// Read through a connection someone else keeps (a tap's upstream link: a server that
    /// takes one connection at a time, as qemu-nbd by default, has no room for a second).
    /// Not to be used from that connection's event loop (reads wait).
    public init(client: NBDClient) {
        self.client = client
        group = nil
        name = client.uri.description
    }

    deinit {
        guard let group else { return }
        try? client.close().wait()
        try? group.syncShutdownGracefully()
    }

    public func size() throws -> UInt64 { client.info.size }

    /// The ranges BLOCK_STATUS (`base:allocation`) does not call zeros, merged; without it,
    /// everything (then all of it is read, and zero blocks are still not stored).
    public func dataExtents(size: UInt64, from: UInt64) throws -> [Range<UInt64>] {
        let end = min(size, client.info.size)
        guard client.info.baseAllocationID != nil else { return from < end ? [from..<end] : [] }
        var out: [Range<UInt64>] = []
        var at = from
        while at < end {
            let asked = UInt32(min(end - at, 1 << 30))
            let extents: [AllocationExtent]
            do { extents = try client.blockStatus(offset: at, length: asked).wait() } catch {
                throw RewindError.invalidArgument("\(name): block status at \(at): \(error)")
            }
            let before = at
            for e in extents where at < end {
                let next = UInt64(e.length) >= end - at ? end : at + UInt64(e.length)
                if !e.flags.contains(.zero) {
                    if let last = out.last, last.upperBound == at { out[out.count - 1] = last.lowerBound..<next } else { out.append(at..<next) }
                }
                at = next
            }
            guard at > before else { throw RewindError.invalidArgument("\(name): block status at \(at) described nothing") }
        }
        return out
    }

    public func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws {
        let size = client.info.size
        // The server's maximum request, at most; requests run ahead of `offset` in pieces of
        // this length (a jump elsewhere starts afresh).
        let piece = max(1, min(buffer.count, NBD.maxPayloadBytes, Int(client.info.blockSizes?.maximum ?? UInt32(NBD.maxPayloadBytes))))
        var filled = 0
        var at = offset
        while filled < buffer.count {
            if ahead.first?.offset != at { ahead.removeAll(); next = at }
            while ahead.count < Self.window && next < size {
                let n = Int(min(UInt64(piece), size - next))
                ahead.append((next, n, client.read(offset: next, length: UInt32(n))))
                next += UInt64(n)
            }
            guard !ahead.isEmpty else { throw RewindError.invalidArgument("\(name): a read at \(at), past its \(size) bytes") }
            let first = ahead.removeFirst()
            let bytes: ByteBuffer
            do { bytes = try first.data.wait() } catch { throw RewindError.invalidArgument("\(name): reading \(first.length) bytes at \(first.offset): \(error)") }
            let n = min(bytes.readableBytes, buffer.count - filled)
            bytes.withUnsafeReadableBytes { src in
                UnsafeMutableRawBufferPointer(rebasing: buffer[filled..<filled + n]).copyMemory(from: UnsafeRawBufferPointer(rebasing: src[0..<n]))
            }
            if n < bytes.readableBytes { ahead.removeAll() }  // asked for less than a piece: ask afresh next time
            filled += n
            at += UInt64(n)
        }
    }
}
