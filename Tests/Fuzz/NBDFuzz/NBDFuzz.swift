import Logging
import NIOCore
import NIOEmbedded
import RewindNBD

/// libFuzzer entry: the input is everything a client sends; it drives the whole connection
/// state machine (handshake option decoders, request decoder, validation, reply encoders)
/// against an in-memory export. Build and run with scripts/fuzz.sh.
final class FuzzTarget: BlockTarget, @unchecked Sendable {
    var bytes = [UInt8](repeating: 0, count: 65536)
    var size: UInt64 { UInt64(bytes.count) }
    let readOnly = false
    let canFastZero = true
    func read(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<[ReadExtent]> {
        var b = ByteBuffer(); b.writeBytes(bytes[Int(offset)..<Int(offset) + Int(length)])
        return loop.makeSucceededFuture(length == 0 ? [] : [.data(offset: offset, bytes: b), ])
    }
    func write(offset: UInt64, data: [UInt8], fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        precondition(offset + UInt64(data.count) <= size, "validation let an out-of-range write through")
        bytes.replaceSubrange(Int(offset)..<Int(offset) + data.count, with: data)
        return loop.makeSucceededVoidFuture()
    }
    func writeZeroes(offset: UInt64, length: UInt32, noHole: Bool, fastZero: Bool, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        precondition(offset + UInt64(length) <= size)
        return loop.makeSucceededVoidFuture()
    }
    func trim(offset: UInt64, length: UInt32, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        precondition(offset + UInt64(length) <= size)
        return loop.makeSucceededVoidFuture()
    }
    func flush(on loop: EventLoop) -> EventLoopFuture<Void> { loop.makeSucceededVoidFuture() }
    func cache(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<Void> { loop.makeSucceededVoidFuture() }
    func blockStatus(offset: UInt64, length: UInt32, on loop: EventLoop) -> EventLoopFuture<[AllocationExtent]> {
        loop.makeSucceededFuture([AllocationExtent(length: length, flags: [])])
    }
}

/// libFuzzer entry. The first byte picks what the rest drives: everything a client sends to
/// rewind's server (`fuzzServer`), or everything a server sends to rewind's client — its
/// handshake (`NBDClientHandshake`) or its transmission replies (`NBDReplyDecoder`).
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ count: Int) -> CInt {
    guard count > 0 else { return 0 }
    let rest = UnsafePointer(data + 1)
    switch data[0] % 4 {
    case 1: return fuzzClientHandshake(rest, count - 1)
    case 2: return fuzzReplies(rest, count - 1)
    default: return fuzzServer(rest, count - 1)
    }
}

/// The server's handshake bytes in two pieces: every reply is decoded and checked, and the
/// machine either asks to send, becomes ready, or throws.
func fuzzClientHandshake(_ data: UnsafePointer<UInt8>, _ count: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: count))
    let cut = count > 0 ? Int(bytes[0]) % (count + 1) : 0
    var machine = NBDClientHandshake(exportName: "vol")
    var input = ByteBuffer()
    for part in [bytes[..<cut], bytes[cut...]] {
        input.writeBytes(part)
        do { _ = try machine.receive(&input) } catch { return 0 }
    }
    return 0
}

/// Transmission replies through the decoder in a pipeline (SwiftNIO's accumulation), in two
/// pieces; even cookies are READs of up to 70,000 bytes in flight (simple replies with data).
func fuzzReplies(_ data: UnsafePointer<UInt8>, _ count: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: count))
    let cut = count > 0 ? Int(bytes[0]) % (count + 1) : 0
    let channel = EmbeddedChannel(handler: ByteToMessageHandler(NBDReplyDecoder(readLength: { $0 % 2 == 0 ? Int($0 % 70_000) : nil })))
    for part in [bytes[..<cut], bytes[cut...]] {
        var b = ByteBuffer(); b.writeBytes(part)
        do { try channel.writeInbound(b) } catch { break }
        while let _ = try? channel.readInbound(as: NBDReply.self) {}
    }
    _ = try? channel.finish()
    return 0
}

func fuzzServer(_ data: UnsafePointer<UInt8>, _ count: Int) -> CInt {
    let handler = NBDConnectionHandler(export: NBDExport(name: "vol", description: "fuzz", target: FuzzTarget()),
                                       observer: nil, logger: Logger(label: "fuzz", factory: { _ in SwiftLogNoOpLogHandler() }))
    let channel = EmbeddedChannel(handler: handler)
    _ = try? channel.connect(to: SocketAddress(ipAddress: "127.0.0.1", port: 1)).wait()
    // Deliver in two pieces so split messages are exercised too.
    let bytes = Array(UnsafeBufferPointer(start: data, count: count))
    let cut = count > 0 ? Int(bytes[0]) % (count + 1) : 0
    for part in [bytes[..<cut], bytes[cut...]] {
        var b = ByteBuffer(); b.writeBytes(part)
        do { try channel.writeInbound(b) } catch { break }
    }
    while let _ = try? channel.readOutbound(as: ByteBuffer.self) {}
    _ = try? channel.finish()
    // Run what closing scheduled (pipeline teardown) and drop the handshake-deadline task.
    channel.embeddedEventLoop.run()
    channel.embeddedEventLoop.advanceTime(by: .seconds(60))
    return 0
}

#if REWIND_FUZZ
/// SwiftPM links an executable target's entry point under this name; hand control to
/// libFuzzer's driver (the corresponding C function is `LLVMFuzzerRunDriver`).
@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(_ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
                         _ callback: @convention(c) (UnsafePointer<UInt8>, Int) -> CInt) -> CInt

@_cdecl("rewind_fuzz_nbd_main")
public func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var c = argc
    var v = argv
    return LLVMFuzzerRunDriver(&c, &v) { data, count in fuzz(data, count) }
}
#else
import Foundation

/// Without the fuzzer (a plain `swift build`): replay the inputs named on the command line,
/// e.g. a crash file libFuzzer saved.
@_cdecl("rewind_fuzz_nbd_main")
public func replayMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    for i in 1..<Int(argc) {
        guard let p = argv?[i], let data = FileManager.default.contents(atPath: String(cString: p)) else { continue }
        let bytes = [UInt8](data)
        _ = bytes.withUnsafeBufferPointer { fuzz($0.baseAddress ?? UnsafePointer(bitPattern: 1)!, $0.count) }
    }
    print("replayed \(max(0, Int(argc) - 1)) inputs")
    return 0
}
#endif
