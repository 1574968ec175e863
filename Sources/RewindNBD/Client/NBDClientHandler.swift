import NIOCore

/// The client's requests in flight, by cookie: shared by `NBDClientHandler` and the reply
/// decoder (which asks how long a simple READ reply's data is). Both live on the channel's
/// event loop.
final class NBDCookieTable {
    struct Pending {
        var command: NBDCommand
        var offset: UInt64
        var length: UInt32
        var promise: EventLoopPromise<NBDClientResult>?
        var data: ByteBuffer?
        /// The parts of a READ its chunks have answered, ascending, not overlapping.
        var covered: [Range<UInt64>] = []
        var extents: [AllocationExtent] = []
        var error: NBDClientError?
        /// When it was written (the loop's clock).
        var sent: NIODeadline
    }

    var pending: [UInt64: Pending] = [:]
    var nextCookie: UInt64 = 1
    /// Simple replies only (no structured replies): a READ's data follows its reply.
    var simpleReads = false

    func readLength(_ cookie: UInt64) -> Int? {
        guard simpleReads, let p = pending[cookie], p.command == .read else { return nil }
        return Int(p.length)
    }
}

/// Drives `NBDClientHandshake` on a new connection; once the export is chosen it puts the
/// transmission handlers in its place (`NBDReplyDecoder`, `NBDClientHandler`), passes them
/// any bytes that came after the handshake, and removes itself.
final class NBDClientHandshakeHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var machine: NBDClientHandshake
    private let ready: EventLoopPromise<NBDExportInfo>
    private var input = ByteBuffer()
    /// Makes the TLS handler put under the connection once NBD_OPT_STARTTLS is accepted.
    private let makeTLS: NBDClient.TLSHandlerFactory?

    init(exportName: String, ready: EventLoopPromise<NBDExportInfo>, makeTLS: NBDClient.TLSHandlerFactory? = nil) {
        machine = NBDClientHandshake(exportName: exportName, tls: makeTLS != nil)
        self.ready = ready
        self.makeTLS = makeTLS
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        input.writeBuffer(&bytes)
        do {
            let actions = try machine.receive(&input)
            input.discardReadBytes()
            for action in actions {
                switch action {
                case let .send(out):
                    context.writeAndFlush(wrapOutboundOut(out), promise: nil)
                case .startTLS:
                    guard let makeTLS else { throw NBDHandshakeError("TLS started without a TLS configuration") }
                    try context.pipeline.syncOperations.addHandler(try makeTLS(), position: .first)
                case let .ready(info):
                    let table = NBDCookieTable()
                    table.simpleReads = !info.structuredReplies
                    let pipeline = context.pipeline.syncOperations
                    try pipeline.addHandlers([ByteToMessageHandler(NBDReplyDecoder(readLength: table.readLength)),
                                              NBDClientHandler(table: table, info: info)], position: .after(self))
                    ready.succeed(info)
                    if input.readableBytes > 0 { context.fireChannelRead(wrapInboundOut(input)) }
                    input = ByteBuffer()
                    pipeline.removeHandler(context: context, promise: nil)
                    return
                }
            }
        } catch {
            ready.fail(error)
            context.close(promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        ready.fail(NBDClientError.closed("the server closed the connection during the handshake"))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        ready.fail(NBDClientError.closed("\(error)"))
        context.close(promise: nil)
    }
}

/// Transmission: gives each request a cookie and writes it; matches replies to requests and
/// completes them (a READ's structured chunks assembled into one buffer, holes as zeros).
final class NBDClientHandler: ChannelDuplexHandler {
    typealias InboundIn = NBDReply
    typealias OutboundIn = NBDClientRequest
    typealias OutboundOut = ByteBuffer

    private let table: NBDCookieTable
    private let info: NBDExportInfo

    /// A request unanswered this long ends the connection (every request in flight fails): a
    /// server that stops answering is not waited for forever.
    let requestTimeout: TimeAmount
    private var watchdog: RepeatedTask?

    init(table: NBDCookieTable, info: NBDExportInfo, requestTimeout: TimeAmount = .seconds(60)) {
        self.table = table
        self.info = info
        self.requestTimeout = requestTimeout
    }

    func handlerAdded(context: ChannelHandlerContext) {
        let bound = NIOLoopBound((handler: self, context: context), eventLoop: context.eventLoop)
        let every = TimeAmount.nanoseconds(max(requestTimeout.nanoseconds / 4, 1_000_000))
        watchdog = context.eventLoop.scheduleRepeatedTask(initialDelay: every, delay: every) { _ in
            bound.value.handler.checkDeadlines(bound.value.context)
        }
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        watchdog?.cancel()
        watchdog = nil
    }

    private func checkDeadlines(_ context: ChannelHandlerContext) {
        let now = context.eventLoop.now
        guard let late = table.pending.values.first(where: { now - $0.sent > requestTimeout }) else { return }
        failAll(.closed("no reply to \(late.command.name) at \(late.offset)+\(late.length) within \(requestTimeout.nanoseconds / 1_000_000_000) s"))
        watchdog?.cancel()
        watchdog = nil
        context.close(promise: nil)
    }

    /// NBD_CMD_DISC asked for: sent once no request is in flight (the server answers those
    /// first only if the client waits), and nothing is sent after it.
    private var disconnecting: (context: ChannelHandlerContext, promise: EventLoopPromise<Void>?)?
    private var disconnected = false

    private func sendDisconnect(_ d: (context: ChannelHandlerContext, promise: EventLoopPromise<Void>?)) {
        disconnecting = nil
        disconnected = true
        var head = d.context.channel.allocator.buffer(capacity: NBDRequestHeader.size)
        head.writeNBDRequest(NBDRequestHeader(flags: 0, type: NBDCommand.disconnect.rawValue, cookie: table.nextCookie, offset: 0, length: 0))
        d.context.writeAndFlush(wrapOutboundOut(head), promise: d.promise)
    }

    func write(context: ChannelHandlerContext, data: NIOAny, promise: EventLoopPromise<Void>?) {
        let r = unwrapOutboundIn(data)
        guard !disconnected && disconnecting == nil else {
            let error = NBDClientError.closed("the connection is being disconnected")
            r.promise?.fail(error)
            promise?.fail(error)
            return
        }
        if r.command == .disconnect {
            disconnecting = (context, promise)
            if table.pending.isEmpty, let d = disconnecting { sendDisconnect(d) }
            return
        }
        let cookie = table.nextCookie
        table.nextCookie &+= 1
        table.pending[cookie] = .init(command: r.command, offset: r.offset, length: r.length, promise: r.promise, sent: context.eventLoop.now)
        var head = context.channel.allocator.buffer(capacity: NBDRequestHeader.size)
        head.writeNBDRequest(NBDRequestHeader(flags: r.flags.rawValue, type: r.command.rawValue, cookie: cookie,
                                              offset: r.offset, length: r.length))
        if let payload = r.payload {
            context.write(wrapOutboundOut(head), promise: nil)
            context.write(wrapOutboundOut(payload), promise: promise)
        } else {
            context.write(wrapOutboundOut(head), promise: promise)
        }
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        do {
            try handle(unwrapInboundIn(data))
        } catch let e as NBDClientError {
            failAll(e)
            context.close(promise: nil)
        } catch {
            failAll(.protocolViolation("\(error)"))
            context.close(promise: nil)
        }
    }

    private func handle(_ reply: NBDReply) throws {
        do {
            try complete(reply)
        } catch {
            // The request the faulty reply was for fails with the rest (`failAll`), even when
            // its entry was already taken out.
            if let p = taken {
                table.pending[reply.cookie] = nil
                p.promise?.fail(error as? NBDClientError ?? .protocolViolation("\(error)"))
            }
            taken = nil
            throw error
        }
        taken = nil
        if let disconnect = disconnecting, table.pending.isEmpty { sendDisconnect(disconnect) }
    }

    /// The entry `complete` took out of the table, until it is answered.
    private var taken: NBDCookieTable.Pending?

    private func complete(_ reply: NBDReply) throws {
        let cookie = reply.cookie
        guard var p = table.pending[cookie] else { throw NBDClientError.protocolViolation("a reply for cookie \(cookie), which no request in flight has") }
        switch reply {
        case let .simple(_, error, data):
            table.pending[cookie] = nil
            taken = p
            if error != 0 {
                p.promise?.fail(NBDClientError.server(errno: error, message: ""))
                return
            }
            if p.command == .read {
                guard let data, data.readableBytes == Int(p.length) else {
                    throw NBDClientError.protocolViolation("a simple reply without data to a READ of \(p.length) bytes (structured replies were negotiated)")
                }
                p.promise?.succeed(NBDClientResult(data: data))
            } else if p.command == .blockStatus {
                throw NBDClientError.protocolViolation("a simple reply to BLOCK_STATUS")
            } else {
                p.promise?.succeed(NBDClientResult())
            }
        case let .chunk(chunk):
            guard info.structuredReplies else { throw NBDClientError.protocolViolation("a structured reply, not negotiated") }
            try take(chunk, into: &p)
            if chunk.done {
                table.pending[cookie] = nil
                taken = p
                let covered = p.covered.reduce(UInt64(0)) { $0 + UInt64($1.count) }
                if let error = p.error {
                    p.promise?.fail(error)
                } else if p.command == .read && covered != UInt64(p.length) {
                    throw NBDClientError.protocolViolation("a READ of \(p.length) bytes answered with \(covered)")
                } else if p.command == .blockStatus && p.extents.isEmpty {
                    throw NBDClientError.protocolViolation("a BLOCK_STATUS answered with no extent")
                } else {
                    p.promise?.succeed(NBDClientResult(data: p.command == .read ? (p.data ?? ByteBuffer()) : nil, extents: p.extents))
                }
            } else {
                table.pending[cookie] = p
            }
        }
    }

    /// One chunk of `p`'s reply, checked against the request.
    private func take(_ chunk: NBDReplyChunk, into p: inout NBDCookieTable.Pending) throws {
        taken = p  // a throw below fails this request
        var b = chunk.payload
        let type = NBDChunkType(rawValue: chunk.type)
        if chunk.isError {
            guard let errno: UInt32 = b.readInteger(), let length: UInt16 = b.readInteger(), let message = b.readString(length: Int(length)) else {
                throw NBDClientError.protocolViolation("a malformed error chunk")
            }
            if p.error == nil { p.error = .server(errno: errno, message: message) }
            return
        }
        switch type {
        case .none?:
            guard chunk.done, b.readableBytes == 0 else { throw NBDClientError.protocolViolation("a NONE chunk that is not the last, or not empty") }
        case .offsetData?, .offsetHole?:
            guard p.command == .read else { throw NBDClientError.protocolViolation("read data in a reply to \(p.command.name)") }
            guard let at: UInt64 = b.readInteger() else { throw NBDClientError.protocolViolation("a malformed read chunk") }
            let n: UInt64
            if type == .offsetHole {
                guard let length: UInt32 = b.readInteger(), b.readableBytes == 0, length > 0 else {
                    throw NBDClientError.protocolViolation("a malformed hole chunk")
                }
                n = UInt64(length)
            } else {
                n = UInt64(b.readableBytes)
                guard n > 0 else { throw NBDClientError.protocolViolation("an empty data chunk") }
            }
            guard at >= p.offset, n <= UInt64(p.length), at - p.offset <= UInt64(p.length) - n else {
                throw NBDClientError.protocolViolation("read data at \(at)+\(n), outside the READ of \(p.offset)+\(p.length)")
            }
            if p.data == nil {
                var all = ByteBuffer()
                all.writeRepeatingByte(0, count: Int(p.length))
                p.data = all
            }
            // Chunks must not overlap (NBD spec): a repeated half must not pass for the whole.
            let range = at - p.offset..<at - p.offset + n
            let i = p.covered.firstIndex { $0.lowerBound >= range.upperBound } ?? p.covered.count
            guard i == 0 || p.covered[i - 1].upperBound <= range.lowerBound else {
                throw NBDClientError.protocolViolation("read chunks overlapping at \(at)")
            }
            p.covered.insert(range, at: i)
            if type == .offsetData { p.data?.setBuffer(b, at: Int(at - p.offset)) }
        case .blockStatus?:
            // One status chunk per negotiated context (one here), its extents nonzero.
            guard p.command == .blockStatus, p.extents.isEmpty, let id: UInt32 = b.readInteger(), id == info.baseAllocationID,
                  b.readableBytes > 0, b.readableBytes % 8 == 0 else {
                throw NBDClientError.protocolViolation("a malformed or unexpected block status chunk")
            }
            while let length: UInt32 = b.readInteger(), let flags: UInt32 = b.readInteger() {
                guard length > 0 else { throw NBDClientError.protocolViolation("a block status extent of length 0") }
                p.extents.append(AllocationExtent(length: length, flags: NBDExtentFlags(rawValue: flags)))
            }
        default:
            throw NBDClientError.protocolViolation("a chunk of unknown type \(chunk.type)")
        }
    }

    private func failAll(_ error: NBDClientError) {
        let all = table.pending
        table.pending.removeAll()
        for p in all.values { p.promise?.fail(error) }
        if let d = disconnecting { disconnecting = nil; d.promise?.fail(error) }
    }

    func channelInactive(context: ChannelHandlerContext) {
        watchdog?.cancel()
        watchdog = nil
        failAll(.closed("the server closed the connection"))
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        failAll(error as? NBDClientError ?? .protocolViolation("\(error)"))
        context.close(promise: nil)
    }
}
