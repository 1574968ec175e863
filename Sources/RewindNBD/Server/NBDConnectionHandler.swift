import Logging
import NIOCore

/// One NBD connection: a thin handler that performs what the protocol core decides.
///
/// Bytes go to `NBDServerFramer`, which returns typed messages (a WRITE's payload copied once,
/// straight into the array the volume takes). During the handshake each message goes to the
/// `NBDServerHandshake` state machine and its actions (replies, the chosen export, a close)
/// are performed here. In transmission each request goes to the `NBDTransmission` state
/// machine, which validates it once (the target only sees well-formed requests) and hands it
/// back to dispatch while fewer than `maxInflight` requests and `maxInflightBytes` payload
/// bytes are in flight; past that, reads from the socket pause. Requests are answered as they
/// complete (out of order, by cookie); a completion dispatches what waits, and never parses.
public final class NBDConnectionHandler: ChannelDuplexHandler {
    public typealias InboundIn = ByteBuffer
    public typealias OutboundIn = ByteBuffer
    public typealias OutboundOut = ByteBuffer

    /// Requests in flight per connection before we stop reading the socket (backpressure).
    static let maxInflight = 256
    /// Payload bytes in flight per connection (writes being journalled, reads being read)
    /// before we stop reading the socket: bounds memory whatever the clients send.
    public static let maxInflightBytes = 64 << 20
    /// The handshake must finish within this (qemu uses 10 s: CVE-2024-7409).
    static let handshakeDeadline = TimeAmount.seconds(10)

    private var framer = NBDServerFramer()
    private var handshake: NBDServerHandshake
    /// The export chosen by NBD_OPT_GO / NBD_OPT_EXPORT_NAME (set on entering transmission).
    private var selected: NBDExport?
    private var closing = false
    private let observer: (any NBDObserver)?
    private let logger: Logger
    private var input = ByteBuffer()
    /// The transmission phase's state machine (set once an export is chosen).
    private var transmission: NBDTransmission?
    private var structuredReplies: Bool { handshake.structuredReplies }
    private var saturated: Bool { transmission?.isSaturated(budgetExhausted: budget.exhausted) ?? false }
    private var readHeld = false
    private var waitingForBudget = false
    private let budget: InflightBudget
    /// Inside `channelRead`: replies completed there (writes answered at once) are flushed
    /// together when it ends, one `writev` for many — each flush wakes the client, and on a
    /// small machine the woken client preempted this loop after every reply.
    private var batchingReplies = false
    private var flushOwed = false
    private var deadline: Scheduled<Void>?

    /// `budget`: payload in flight shared with the server's other connections.
    public convenience init(export: NBDExport, observer: (any NBDObserver)?, logger: Logger,
                            budget: InflightBudget = InflightBudget(limit: maxInflightBytes)) {
        self.init(catalog: SingleExportCatalog(export), observer: observer, logger: logger, budget: budget)
    }

    public init(catalog: any NBDExportCatalog, observer: (any NBDObserver)?, logger: Logger,
                budget: InflightBudget = InflightBudget(limit: maxInflightBytes)) {
        handshake = NBDServerHandshake(catalog: catalog)
        self.budget = budget
        self.observer = observer
        self.logger = logger
    }

    // MARK: channel events

    public func channelActive(context: ChannelHandlerContext) {
        observer?.connectionOpened()
        context.writeAndFlush(wrapOutboundOut(NBDServerHandshake.greeting), promise: nil)
        let channel = context.channel
        let logger = self.logger
        // Holds the channel until it fires or is cancelled (handshake done, or channelInactive).
        // No weak reference: one would move the channel's reference counts to a side table,
        // slowing every retain and release of it (measured: ~10 % of a small read's CPU).
        deadline = context.eventLoop.scheduleTask(in: Self.handshakeDeadline) {
            logger.info("closing connection: \(NBDProtocolError.handshakeTimeout)")
            channel.close(promise: nil)
        }
        context.fireChannelActive()
    }

    public func channelInactive(context: ChannelHandlerContext) {
        deadline?.cancel()
        observer?.connectionClosed()
        closing = true
        transmission?.close()
        handshake.detachAll()
        selected?.target.detach()
        context.fireChannelInactive()
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        guard !closing else { return }
        batchingReplies = true
        defer {
            batchingReplies = false
            if flushOwed { flushOwed = false; context.flush() }
        }
        // Taken as it is when nothing is left over (a payload's bytes are then copied once,
        // into its array); appended to the few bytes of a partial header otherwise.
        if input.readableBytes == 0 { input = bytes } else { input.writeBuffer(&bytes) }
        do {
            while !closing, let message = try framer.next(&input) {
                try receive(message, context)
            }
        } catch {
            logger.info("closing connection: \(error)")
            close(context)
            return
        }
        if input.readerIndex > 1 << 20 { input.discardReadBytes() }
        dispatchPending(context)
    }

    private func receive(_ message: NBDServerFramer.Message, _ context: ChannelHandlerContext) throws {
        switch message {
        case let .clientFlags(flags):
            try handshake.clientFlags(flags)
        case let .option(option, data):
            perform(try handshake.option(option, data: data), context)
        case let .oversizedOption(option):
            perform(try handshake.oversizedOption(option), context)
        case let .request(header, payload):
            guard transmission != nil else { throw NBDProtocolError.abort }
            transmission?.received(header, payload: payload)
        }
    }

    private func perform(_ actions: [NBDServerHandshake.Action], _ context: ChannelHandlerContext) {
        for action in actions {
            switch action {
            case let .send(bytes):
                context.writeAndFlush(wrapOutboundOut(bytes), promise: nil)
            case let .enterTransmission(export):
                selected = export
                transmission = NBDTransmission(
                    context: NBDValidationContext(size: export.target.size, readOnly: export.target.readOnly,
                                                  structuredReplies: structuredReplies, metaContextNegotiated: handshake.metaContextSelected),
                    maxInflight: Self.maxInflight, maxInflightBytes: Self.maxInflightBytes)
                deadline?.cancel()
                deadline = nil
                framer.phase = .transmission
            case .close:
                close(context)
            }
        }
    }

    private func close(_ context: ChannelHandlerContext) {
        closing = true
        transmission?.close()
        input.clear()
        context.close(promise: nil)
    }

    /// Dispatch what the transmission machine lets go now.
    private func dispatchPending(_ context: ChannelHandlerContext) {
        while !closing, let action = transmission?.next(budgetExhausted: budget.exhausted) {
            perform(action, context)
        }
    }

    private func perform(_ action: NBDTransmission.Action, _ context: ChannelHandlerContext) {
        switch action {
        case let .dispatch(header, command, payload, payloadBytes):
            dispatch(context, header, command, payload: payload, payloadBytes: payloadBytes)
        case let .refuse(header, error):
            if let kind = NBDCommand(rawValue: header.type) { observer?.requestStarted(kind) }
            sendError(context, header, error, message: "invalid request")
        case .close:
            close(context)
        }
    }

    public func errorCaught(context: ChannelHandlerContext, error: Error) {
        logger.debug("connection error: \(error)")
        context.close(promise: nil)
    }

    /// Hold socket reads while too many requests are in flight.
    public func read(context: ChannelHandlerContext) {
        if saturated {
            readHeld = true
            if budget.exhausted { waitForBudget(context) }
            return
        }
        context.read()
    }

    /// Held because of other connections' payload: resume when the shared budget frees up
    /// (this connection's own completions resume it otherwise).
    private func waitForBudget(_ context: ChannelHandlerContext) {
        guard !waitingForBudget else { return }
        waitingForBudget = true
        let loop = context.eventLoop
        let bound = NIOLoopBound((handler: self, context: context), eventLoop: loop)
        budget.whenAvailable {
            loop.execute { bound.value.handler.budgetAvailable(bound.value.context) }
        }
    }

    private func budgetAvailable(_ context: ChannelHandlerContext) {
        waitingForBudget = false
        if closing { return }
        dispatchPending(context)
        resumeReading(context)
    }

    /// Reads were held: resume them if nothing holds them now, or wait for the shared budget.
    private func resumeReading(_ context: ChannelHandlerContext) {
        guard readHeld else { return }
        if !saturated { readHeld = false; context.read() } else if budget.exhausted { waitForBudget(context) }
    }

    // MARK: transmission

    private func sendError(_ context: ChannelHandlerContext, _ h: NBDRequestHeader, _ error: NBDErrno, message: String) {
        var reply = context.channel.allocator.buffer(capacity: 64)
        if structuredReplies && (h.type == NBDCommand.read.rawValue || h.type == NBDCommand.blockStatus.rawValue) {
            reply.writeErrorChunk(cookie: h.cookie, error: error, message: message)
        } else {
            reply.writeSimpleReply(cookie: h.cookie, error: error.rawValue)
        }
        context.writeAndFlush(wrapOutboundOut(reply), promise: nil)
        if let command = NBDCommand(rawValue: h.type) {
            observer?.requestFinished(command, bytes: 0, nanoseconds: 0, error: error)
        }
    }

    /// `payload`: a WRITE's data, whole (`NBDServerFramer`).
    private func dispatch(_ context: ChannelHandlerContext, _ h: NBDRequestHeader, _ command: NBDValidatedCommand,
                          payload received: [UInt8]?, payloadBytes: Int) {
        guard let target = selected?.target else { return }
        let loop = context.eventLoop
        let started = NIODeadline.now()
        guard let kind = NBDCommand(rawValue: h.type) else { return }  // validate() refused unknown types already
        observer?.requestStarted(kind)
        let bytes = UInt64(h.length)
        switch command {
        case .disconnect:
            return  // the transmission machine closes the connection
        case let .read(offset, length, df):
            track(context, h, kind, started, payloadBytes, bytes, target.read(offset: offset, length: length, on: loop)) { [structuredReplies] extents in
                let allocator = context.channel.allocator
                if structuredReplies {
                    return Self.structuredRead(allocator, cookie: h.cookie, offset: offset, length: length, extents: extents, df: df)
                }
                var head = allocator.buffer(capacity: 16)
                head.writeSimpleReply(cookie: h.cookie)
                return [head] + Self.flat(allocator, extents)
            }
        case let .write(offset, fua):
            // The framer gives a WRITE its payload, or nil over the maximum (refused by validate).
            guard let data = received else { sendError(context, h, .io, message: "payload missing"); return }
            track(context, h, kind, started, payloadBytes, bytes, target.write(offset: offset, data: data, fua: fua, on: loop)) { _ in
                var out = context.channel.allocator.buffer(capacity: 16); out.writeSimpleReply(cookie: h.cookie); return [out]
            }
        case let .writeZeroes(offset, length, fua, noHole, fastZero):
            if fastZero && !target.canFastZero { sendError(context, h, .notsup, message: "zeroing is not fast here"); return }
            track(context, h, kind, started, payloadBytes, bytes, target.writeZeroes(offset: offset, length: length, noHole: noHole,
                                                                      fastZero: fastZero, fua: fua, on: loop)) { _ in
                var out = context.channel.allocator.buffer(capacity: 16); out.writeSimpleReply(cookie: h.cookie); return [out]
            }
        case let .trim(offset, length, fua):
            track(context, h, kind, started, payloadBytes, bytes, target.trim(offset: offset, length: length, fua: fua, on: loop)) { _ in
                var out = context.channel.allocator.buffer(capacity: 16); out.writeSimpleReply(cookie: h.cookie); return [out]
            }
        case .flush:
            track(context, h, kind, started, payloadBytes, 0, target.flush(on: loop)) { _ in
                var out = context.channel.allocator.buffer(capacity: 16); out.writeSimpleReply(cookie: h.cookie); return [out]
            }
        case let .cache(offset, length):
            track(context, h, kind, started, payloadBytes, bytes, target.cache(offset: offset, length: length, on: loop)) { _ in
                var out = context.channel.allocator.buffer(capacity: 16); out.writeSimpleReply(cookie: h.cookie); return [out]
            }
        case let .blockStatus(offset, length, reqOne):
            track(context, h, kind, started, payloadBytes, 0, target.blockStatus(offset: offset, length: length, on: loop)) { extents in
                var list = extents.filter { $0.length > 0 }
                if reqOne { list = Array(list.prefix(1)) }
                var out = context.channel.allocator.buffer(capacity: 32 + 8 * list.count)
                out.writeChunkHeader(cookie: h.cookie, type: .blockStatus, done: true, length: 4 + 8 * list.count)
                out.writeInteger(baseAllocationContextID)
                for e in list { out.writeInteger(e.length); out.writeInteger(e.flags.rawValue) }
                return [out]
            }
        }
    }

    /// Count a request in flight until its future completes, then write its reply.
    /// `payload`: what the transmission machine counts of it in flight, held in the budget too.
    private func track<T: Sendable>(_ context: ChannelHandlerContext, _ h: NBDRequestHeader, _ kind: NBDCommand, _ started: NIODeadline,
                                    _ payload: Int, _ bytes: UInt64, _ future: EventLoopFuture<T>, reply: @escaping (T) -> [ByteBuffer]) {
        budget.take(payload)
        // The completion runs on this channel's loop (hop), where the handler and its context
        // live: isolated there, it may touch both without crossing threads (checked in debug
        // builds; every request's completion passes here).
        future.hop(to: context.eventLoop).assumeIsolatedUnsafeUnchecked().whenComplete { [self] result in
            budget.give(payload)
            let elapsed = UInt64(max(0, (NIODeadline.now() - started).nanoseconds))
            switch result {
            case .success(let value):
                // The reply's pieces go out as they are (one writev): read data is never copied.
                for piece in reply(value) { context.write(wrapOutboundOut(piece), promise: nil) }
                if batchingReplies { flushOwed = true } else { context.flush() }
                observer?.requestFinished(kind, bytes: bytes, nanoseconds: elapsed, error: nil)
            case .failure(let error):
                let errno = error as? NBDErrno ?? .io
                if errno == .io { logger.warning("\(kind.name) at \(h.offset)+\(h.length) failed: \(error)") }
                sendError(context, h, errno, message: "\(kind.name) failed")
            }
            if let action = transmission?.completed(payloadBytes: payload) { perform(action, context); return }
            dispatchPending(context)
            resumeReading(context)
        }
    }

    /// Simple-reply payload: every extent as bytes, holes as zeros.
    private static func flat(_ allocator: ByteBufferAllocator, _ extents: [ReadExtent]) -> [ByteBuffer] {
        extents.map { e in
            switch e {
            case .data(_, let bytes): return bytes
            case .hole(_, let length):
                var zeros = allocator.buffer(capacity: Int(length))
                zeros.writeRepeatingByte(0, count: Int(length))
                return zeros
            }
        }
    }

    /// Structured READ: one OFFSET_DATA or OFFSET_HOLE chunk per extent, DONE on the last;
    /// under DF a single data chunk; a zero-length read gets one NONE chunk.
    private static func structuredRead(_ allocator: ByteBufferAllocator, cookie: UInt64, offset: UInt64, length: UInt32,
                                       extents: [ReadExtent], df: Bool) -> [ByteBuffer] {
        var head = allocator.buffer(capacity: 32)
        if length == 0 || extents.isEmpty {
            head.writeChunkHeader(cookie: cookie, type: .none, done: true, length: 0)
            return [head]
        }
        if df && extents.count > 1 {
            head.writeChunkHeader(cookie: cookie, type: .offsetData, done: true, length: 8 + Int(length))
            head.writeInteger(offset)
            return [head] + flat(allocator, extents)
        }
        var pieces: [ByteBuffer] = []
        pieces.reserveCapacity(extents.count * 2)
        for (i, e) in extents.enumerated() {
            let last = i == extents.count - 1
            var chunk = allocator.buffer(capacity: 32)
            switch e {
            case .data(let at, let bytes):
                chunk.writeChunkHeader(cookie: cookie, type: .offsetData, done: last, length: 8 + bytes.readableBytes)
                chunk.writeInteger(at)
                pieces.append(chunk)
                pieces.append(bytes)
            case .hole(let at, let n):
                chunk.writeChunkHeader(cookie: cookie, type: .offsetHole, done: last, length: 12)
                chunk.writeInteger(at)
                chunk.writeInteger(n)
                pieces.append(chunk)
            }
        }
        return pieces
    }
}
