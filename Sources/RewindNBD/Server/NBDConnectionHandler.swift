import Logging
import NIOCore

/// One NBD connection: the fixed-newstyle handshake, then the transmission phase.
///
/// Bytes accumulate in `input` and are parsed by `process()` according to `phase`, except a
/// validated WRITE's payload that has not all arrived with its header: that is copied from
/// each socket read straight into the array the volume takes (`receivePayload`). Every
/// request is validated once here (`validate`), so the target only sees well-formed ones.
/// Requests are dispatched as they arrive and answered as they complete (out of order, by
/// cookie); at most `maxInflight` at once, after which reads from the socket pause.
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

    private enum Phase {
        case clientFlags
        case options
        /// Discarding the rest of an oversized option, then answering it ERR_TOO_BIG.
        case discardOption(option: UInt32, remaining: UInt64)
        case transmission
        /// Discarding a refused WRITE's payload, then answering it.
        case discardPayload(cookie: UInt64, remaining: UInt64, error: NBDErrno)
        /// Receiving a validated WRITE's payload straight into `payload` (see `receivePayload`).
        case receivePayload(header: NBDRequestHeader, command: NBDValidatedCommand)
        case closing
    }

    private let catalog: any NBDExportCatalog
    /// The export chosen by NBD_OPT_GO / NBD_OPT_EXPORT_NAME (set on entering transmission).
    private var selected: NBDExport?
    /// Exports looked up during the handshake, by requested name, so INFO then GO of one name
    /// opens it once; all but the chosen one are detached when transmission starts.
    private var lookedUp: [String: NBDExport] = [:]
    private let observer: (any NBDObserver)?
    private let logger: Logger
    private var phase = Phase.clientFlags
    private var input = ByteBuffer()
    /// The payload of the WRITE being received (`Phase.receivePayload`), and how much of it
    /// has arrived. Kept out of `phase` so it is filled in place, never copied.
    private var payload: [UInt8] = []
    private var payloadFilled = 0
    private var noZeroes = false
    private var structuredReplies = false
    private var metaContextSelected = false
    private var optionsSeen = 0
    private var inflight = 0
    private var inflightBytes = 0
    private var saturated: Bool {
        inflight >= Self.maxInflight || inflightBytes >= Self.maxInflightBytes || budget.exhausted
    }
    private var readHeld = false
    private var waitingForBudget = false
    private let budget: InflightBudget
    private var disconnecting = false
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
        self.catalog = catalog
        self.budget = budget
        self.observer = observer
        self.logger = logger
    }

    // MARK: channel events

    public func channelActive(context: ChannelHandlerContext) {
        observer?.connectionOpened()
        var greeting = context.channel.allocator.buffer(capacity: 18)
        greeting.writeInteger(NBD.nbdMagic)
        greeting.writeInteger(NBD.ihaveopt)
        greeting.writeInteger(NBD.flagFixedNewstyle | NBD.flagNoZeroes)
        context.writeAndFlush(wrapOutboundOut(greeting), promise: nil)
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
        phase = .closing
        for e in lookedUp.values { e.target.detach() }
        lookedUp.removeAll()
        selected?.target.detach()
        context.fireChannelInactive()
    }

    public func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        var bytes = unwrapInboundIn(data)
        batchingReplies = true
        defer {
            batchingReplies = false
            if flushOwed { flushOwed = false; context.flush() }
        }
        if case let .receivePayload(header, command) = phase {
            guard receivePayload(from: &bytes) else { return }
            phase = .transmission
            let data = payload
            payload = []
            dispatch(context, header, command, payload: data)
        }
        input.writeBuffer(&bytes)
        do {
            try process(context: context)
        } catch {
            logger.info("closing connection: \(error)")
            phase = .closing
            context.close(promise: nil)
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
        if case .closing = phase { return }
        resumeReading(context)
    }

    /// Reads were held: resume them if nothing holds them now, or wait for the shared budget.
    private func resumeReading(_ context: ChannelHandlerContext) {
        guard readHeld else { return }
        if !saturated { readHeld = false; context.read() } else if budget.exhausted { waitForBudget(context) }
    }

    // MARK: parsing

    private func process(context: ChannelHandlerContext) throws {
        parsing: while true {
            switch phase {
            case .closing:
                input.clear()
                return
            case .clientFlags:
                guard let flags: UInt32 = input.readInteger() else { break parsing }
                guard flags & ~(NBD.clientFixedNewstyle | NBD.clientNoZeroes) == 0 else {
                    throw NBDProtocolError.unknownClientFlags(flags)
                }
                noZeroes = flags & NBD.clientNoZeroes != 0
                phase = .options
            case .options:
                guard let header = try peekOptionHeader() else { break parsing }
                optionsSeen += 1
                guard optionsSeen <= NBD.maxOptions else { throw NBDProtocolError.tooManyOptions }
                if header.length > UInt32(NBD.maxOptionBytes) {
                    input.moveReaderIndex(forwardBy: NBDOptionHeader.size)
                    phase = .discardOption(option: header.option, remaining: UInt64(header.length))
                    continue
                }
                guard input.readableBytes >= NBDOptionHeader.size + Int(header.length) else { break parsing }
                input.moveReaderIndex(forwardBy: NBDOptionHeader.size)
                guard let data = input.readSlice(length: Int(header.length)) else { break parsing }
                try handleOption(header.option, data: data, context: context)
            case let .discardOption(option, remaining):
                let n = min(UInt64(input.readableBytes), remaining)
                input.moveReaderIndex(forwardBy: Int(n))
                if n < remaining { phase = .discardOption(option: option, remaining: remaining - n); break parsing }
                phase = .options
                replyOption(context, option, .errTooBig, message: "option data longer than \(NBD.maxOptionBytes) bytes")
            case .transmission:
                if disconnecting || saturated { break parsing }
                guard input.readableBytes >= NBDRequestHeader.size else { break parsing }
                var peek = input
                guard let header = try NBDRequestHeader.read(from: &peek) else { break parsing }
                guard let export = selected else { throw NBDProtocolError.abort }
                let validated = validate(header, NBDValidationContext(
                    size: export.target.size, readOnly: export.target.readOnly,
                    structuredReplies: structuredReplies, metaContextNegotiated: metaContextSelected))
                if header.hasPayload {
                    if case .failure(let error) = validated {
                        // A refused WRITE's payload is read and discarded, never buffered whole.
                        input = peek
                        phase = .discardPayload(cookie: header.cookie, remaining: UInt64(header.length), error: error)
                        continue
                    }
                    if peek.readableBytes < Int(header.length), case .success(let command) = validated {
                        // A large WRITE arrives over many socket reads: its payload goes
                        // straight into the array the volume takes, one copy, not three
                        // (into `input`, the compaction of `input`, out of `input`).
                        input = peek
                        payload = [UInt8](unsafeUninitializedCapacity: Int(header.length)) { _, n in n = Int(header.length) }
                        payloadFilled = 0
                        phase = .receivePayload(header: header, command: command)
                        _ = receivePayload(from: &input)
                        input.clear()
                        break parsing
                    }
                }
                input = peek
                switch validated {
                case .failure(let error):
                    if let kind = NBDCommand(rawValue: header.type) { observer?.requestStarted(kind) }
                    sendError(context, header, error, message: "invalid request")
                case .success(let command):
                    dispatch(context, header, command)
                }
            case .receivePayload:
                break parsing  // channelRead fills the payload
            case let .discardPayload(cookie, remaining, error):
                let n = min(UInt64(input.readableBytes), remaining)
                input.moveReaderIndex(forwardBy: Int(n))
                if n < remaining { phase = .discardPayload(cookie: cookie, remaining: remaining - n, error: error); break parsing }
                phase = .transmission
                var reply = context.channel.allocator.buffer(capacity: 16)
                reply.writeSimpleReply(cookie: cookie, error: error.rawValue)
                context.writeAndFlush(wrapOutboundOut(reply), promise: nil)
                observer?.requestStarted(.write)
                observer?.requestFinished(.write, bytes: 0, nanoseconds: 0, error: error)
            }
        }
        if input.readerIndex > 1 << 20 { input.discardReadBytes() }
    }

    private func peekOptionHeader() throws -> NBDOptionHeader? {
        var peek = input
        return try NBDOptionHeader.read(from: &peek)
    }

    // MARK: handshake

    private func replyOption(_ context: ChannelHandlerContext, _ option: UInt32, _ type: NBDOptionReply,
                             data: ByteBuffer? = nil, message: String? = nil) {
        var out = context.channel.allocator.buffer(capacity: 32)
        if let message { out.writeOptionError(option: option, type: type, message: message) } else {
            out.writeOptionReply(option: option, type: type, data: data)
        }
        context.writeAndFlush(wrapOutboundOut(out), promise: nil)
    }

    private func handleOption(_ raw: UInt32, data: ByteBuffer, context: ChannelHandlerContext) throws {
        guard let option = NBDOption(rawValue: raw) else {
            replyOption(context, raw, .errUnsupported, message: "option \(raw) is not supported")
            return
        }
        switch option {
        case .exportName:
            var d = data
            guard let name = d.readValidUTF8(length: d.readableBytes), let export = lookup(name).export else {
                throw NBDProtocolError.abort  // NBD_OPT_EXPORT_NAME has no error reply: close
            }
            var out = context.channel.allocator.buffer(capacity: 134)
            out.writeInteger(export.target.size)
            out.writeInteger(export.transmissionFlags(structuredReplies: structuredReplies).rawValue)
            if !noZeroes { out.writeRepeatingByte(0, count: 124) }
            context.writeAndFlush(wrapOutboundOut(out), promise: nil)
            enterTransmission(name)
        case .abort:
            replyOption(context, raw, .ack)
            context.close(promise: nil)
            phase = .closing
        case .list:
            guard data.readableBytes == 0 else {
                replyOption(context, raw, .errInvalid, message: "NBD_OPT_LIST takes no data"); return
            }
            for (name, description) in catalog.list() {
                var entry = ByteBuffer()
                entry.writeInteger(UInt32(name.utf8.count))
                entry.writeString(name)
                entry.writeString(description)
                replyOption(context, raw, .server, data: entry)
            }
            replyOption(context, raw, .ack)
        case .startTLS:
            if data.readableBytes != 0 {
                replyOption(context, raw, .errInvalid, message: "NBD_OPT_STARTTLS takes no data")
            } else {
                replyOption(context, raw, .errUnsupported, message: "TLS is not offered on this port")
            }
        case .structuredReply:
            if data.readableBytes != 0 {
                replyOption(context, raw, .errInvalid, message: "NBD_OPT_STRUCTURED_REPLY takes no data")
            } else if structuredReplies {
                replyOption(context, raw, .errInvalid, message: "structured replies already negotiated")
            } else {
                structuredReplies = true
                replyOption(context, raw, .ack)
            }
        case .info, .go:
            guard let request = NBDInfoRequest.parse(data) else {
                replyOption(context, raw, .errInvalid, message: "malformed NBD_OPT_INFO/GO request"); return
            }
            let found = lookup(request.name)
            guard let export = found.export else {
                replyOption(context, raw, .errUnknown, message: found.message); return
            }
            var info = ByteBuffer()
            info.writeInteger(NBDInfo.export.rawValue)
            info.writeInteger(export.target.size)
            info.writeInteger(export.transmissionFlags(structuredReplies: structuredReplies).rawValue)
            replyOption(context, raw, .info, data: info)
            var sizes = ByteBuffer()
            sizes.writeInteger(NBDInfo.blockSize.rawValue)
            let b = export.target.blockSizes ?? NBDBlockSizes(minimum: 1, preferred: NBD.preferredBlockSize, maximum: UInt32(NBD.maxPayloadBytes))
            sizes.writeInteger(b.minimum)
            sizes.writeInteger(b.preferred)
            sizes.writeInteger(b.maximum)
            replyOption(context, raw, .info, data: sizes)
            if request.infos.contains(NBDInfo.name.rawValue) {
                var b = ByteBuffer(); b.writeInteger(NBDInfo.name.rawValue); b.writeString(export.name)
                replyOption(context, raw, .info, data: b)
            }
            if request.infos.contains(NBDInfo.description.rawValue) {
                var b = ByteBuffer(); b.writeInteger(NBDInfo.description.rawValue); b.writeString(export.description)
                replyOption(context, raw, .info, data: b)
            }
            replyOption(context, raw, .ack)
            if option == .go { enterTransmission(request.name) }
        case .listMetaContext, .setMetaContext:
            guard let request = NBDMetaContextRequest.parse(data) else {
                replyOption(context, raw, .errInvalid, message: "malformed meta context request"); return
            }
            if option == .setMetaContext && !structuredReplies {
                replyOption(context, raw, .errInvalid, message: "negotiate structured replies first"); return
            }
            let found = lookup(request.exportName)
            guard found.export != nil else {
                replyOption(context, raw, .errUnknown, message: found.message); return
            }
            let matches: Bool
            if option == .listMetaContext {
                matches = request.queries.isEmpty || request.queries.contains { $0 == baseAllocationContext || $0 == "base:" }
            } else {
                matches = request.queries.contains(baseAllocationContext)
                metaContextSelected = matches
            }
            if matches {
                var b = ByteBuffer()
                b.writeInteger(option == .setMetaContext ? baseAllocationContextID : 0)
                b.writeString(baseAllocationContext)
                replyOption(context, raw, .metaContext, data: b)
            }
            replyOption(context, raw, .ack)
        }
    }

    /// The export `name` names, looked up once per connection.
    private func lookup(_ name: String) -> (export: NBDExport?, message: String) {
        if let e = lookedUp[name] { return (e, "") }
        switch catalog.lookup(name) {
        case let .found(e):
            lookedUp[name] = e
            return (e, "")
        case let .unknown(message):
            return (nil, message)
        }
    }

    /// Start transmission on the export looked up as `name`; the others are let go.
    private func enterTransmission(_ name: String) {
        selected = lookedUp.removeValue(forKey: name)
        for e in lookedUp.values { e.target.detach() }
        lookedUp.removeAll()
        deadline?.cancel()
        deadline = nil
        phase = .transmission
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

    /// Move what `bytes` holds of the payload being received into `payload`; true once it is
    /// all there.
    private func receivePayload(from bytes: inout ByteBuffer) -> Bool {
        let n = min(bytes.readableBytes, payload.count - payloadFilled)
        if n > 0 {
            bytes.readWithUnsafeReadableBytes { src in
                payload.withUnsafeMutableBytes { dst in
                    UnsafeMutableRawBufferPointer(rebasing: dst[payloadFilled..<payloadFilled + n])
                        .copyMemory(from: UnsafeRawBufferPointer(rebasing: src[0..<n]))
                }
                return n
            }
            payloadFilled += n
        }
        return payloadFilled == payload.count
    }

    /// `payload`: a WRITE's data when it was received by `receivePayload`; otherwise it is
    /// read from `input`.
    private func dispatch(_ context: ChannelHandlerContext, _ h: NBDRequestHeader, _ command: NBDValidatedCommand,
                          payload received: [UInt8]? = nil) {
        guard let target = selected?.target else { return }
        let loop = context.eventLoop
        let started = NIODeadline.now()
        guard let kind = NBDCommand(rawValue: h.type) else { return }  // validate() refused unknown types already
        observer?.requestStarted(kind)
        let bytes = UInt64(h.length)
        switch command {
        case .disconnect:
            disconnecting = true
            if inflight == 0 { context.close(promise: nil) }
            return
        case let .read(offset, length, df):
            track(context, h, kind, started, bytes, target.read(offset: offset, length: length, on: loop)) { [structuredReplies] extents in
                let allocator = context.channel.allocator
                if structuredReplies {
                    return Self.structuredRead(allocator, cookie: h.cookie, offset: offset, length: length, extents: extents, df: df)
                }
                var head = allocator.buffer(capacity: 16)
                head.writeSimpleReply(cookie: h.cookie)
                return [head] + Self.flat(allocator, extents)
            }
        case let .write(offset, fua):
            // process() waited for the whole payload; a short buffer here is a bug, answered EIO.
            guard let data = received ?? input.readBytes(length: Int(h.length)) else { sendError(context, h, .io, message: "payload missing"); return }
            track(context, h, kind, started, bytes, target.write(offset: offset, data: data, fua: fua, on: loop)) { _ in
                var out = context.channel.allocator.buffer(capacity: 16); out.writeSimpleReply(cookie: h.cookie); return [out]
            }
        case let .writeZeroes(offset, length, fua, noHole, fastZero):
            if fastZero && !target.canFastZero { sendError(context, h, .notsup, message: "zeroing is not fast here"); return }
            track(context, h, kind, started, bytes, target.writeZeroes(offset: offset, length: length, noHole: noHole,
                                                                      fastZero: fastZero, fua: fua, on: loop)) { _ in
                var out = context.channel.allocator.buffer(capacity: 16); out.writeSimpleReply(cookie: h.cookie); return [out]
            }
        case let .trim(offset, length, fua):
            track(context, h, kind, started, bytes, target.trim(offset: offset, length: length, fua: fua, on: loop)) { _ in
                var out = context.channel.allocator.buffer(capacity: 16); out.writeSimpleReply(cookie: h.cookie); return [out]
            }
        case .flush:
            track(context, h, kind, started, 0, target.flush(on: loop)) { _ in
                var out = context.channel.allocator.buffer(capacity: 16); out.writeSimpleReply(cookie: h.cookie); return [out]
            }
        case let .cache(offset, length):
            track(context, h, kind, started, bytes, target.cache(offset: offset, length: length, on: loop)) { _ in
                var out = context.channel.allocator.buffer(capacity: 16); out.writeSimpleReply(cookie: h.cookie); return [out]
            }
        case let .blockStatus(offset, length, reqOne):
            track(context, h, kind, started, 0, target.blockStatus(offset: offset, length: length, on: loop)) { extents in
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
    private func track<T: Sendable>(_ context: ChannelHandlerContext, _ h: NBDRequestHeader, _ kind: NBDCommand, _ started: NIODeadline,
                          _ bytes: UInt64, _ future: EventLoopFuture<T>, reply: @escaping (T) -> [ByteBuffer]) {
        inflight += 1
        // Only reads and writes hold their payload in memory; a trim's length costs nothing.
        let payload = kind == .read || kind == .write ? Int(min(bytes, UInt64(NBD.maxPayloadBytes))) : 0
        inflightBytes += payload
        budget.take(payload)
        // The completion runs on this channel's loop (hop), where the handler and its context
        // live: isolated there, it may touch both without crossing threads (checked in debug
        // builds; every request's completion passes here).
        future.hop(to: context.eventLoop).assumeIsolatedUnsafeUnchecked().whenComplete { [self] result in
            inflight -= 1
            inflightBytes -= payload
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
            if disconnecting && inflight == 0 { context.close(promise: nil); return }
            resumeReading(context)
            if case .transmission = phase, input.readableBytes > 0 {
                do { try process(context: context) } catch {
                    logger.info("closing connection: \(error)")
                    phase = .closing
                    context.close(promise: nil)
                }
            }
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
