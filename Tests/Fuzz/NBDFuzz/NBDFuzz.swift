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

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>, _ count: Int) -> CInt {
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
