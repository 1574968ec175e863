import NIOCore

/// The server's side of the fixed-newstyle handshake, as a state machine: it is given the
/// client's flags and then each option (its data whole, from `NBDServerFramer`) and returns
/// what to send, until an export is chosen. No I/O: `NBDConnectionHandler` performs the
/// actions. Exports are looked up in the catalog once per name; all but the chosen one are
/// detached when transmission starts (`detachAll` at a close before that).
public struct NBDServerHandshake {
    public enum Action {
        case send(ByteBuffer)
        /// The handshake is over: serve this export.
        case enterTransmission(NBDExport)
        /// NBD_OPT_ABORT: close once the acknowledgement is sent.
        case close
    }

    private let catalog: any NBDExportCatalog
    /// NBD_FLAG_C_NO_ZEROES: the 124 zero bytes after NBD_OPT_EXPORT_NAME's reply are left out.
    public private(set) var noZeroes = false
    public private(set) var structuredReplies = false
    public private(set) var metaContextSelected = false
    private var optionsSeen = 0
    /// Exports looked up during the handshake, by requested name, so INFO then GO of one name
    /// opens it once.
    private var lookedUp: [String: NBDExport] = [:]

    public init(catalog: any NBDExportCatalog) { self.catalog = catalog }

    /// The greeting the server sends first.
    public static var greeting: ByteBuffer {
        var b = ByteBuffer()
        b.writeInteger(NBD.nbdMagic)
        b.writeInteger(NBD.ihaveopt)
        b.writeInteger(NBD.flagFixedNewstyle | NBD.flagNoZeroes)
        return b
    }

    /// The client's flags, the first thing it sends.
    public mutating func clientFlags(_ flags: UInt32) throws {
        guard flags & ~(NBD.clientFixedNewstyle | NBD.clientNoZeroes) == 0 else {
            throw NBDProtocolError.unknownClientFlags(flags)
        }
        noZeroes = flags & NBD.clientNoZeroes != 0
    }

    /// An option whose data was longer than `NBD.maxOptionBytes` (and was discarded).
    public mutating func oversizedOption(_ raw: UInt32) throws -> [Action] {
        optionsSeen += 1
        guard optionsSeen <= NBD.maxOptions else { throw NBDProtocolError.tooManyOptions }
        var out = ByteBuffer()
        out.writeOptionError(option: raw, type: .errTooBig, message: "option data longer than \(NBD.maxOptionBytes) bytes")
        return [.send(out)]
    }

    /// One option (its data whole): what to send, and whether transmission starts. Throws
    /// when the connection is to close (NBD_OPT_EXPORT_NAME of an unknown export, ABORT).
    public mutating func option(_ raw: UInt32, data: ByteBuffer) throws -> [Action] {
        optionsSeen += 1
        guard optionsSeen <= NBD.maxOptions else { throw NBDProtocolError.tooManyOptions }
        var actions: [Action] = []
        func replyOption(_ raw: UInt32, _ type: NBDOptionReply, data: ByteBuffer? = nil, message: String? = nil) {
            var out = ByteBuffer()
            if let message { out.writeOptionError(option: raw, type: type, message: message) } else {
                out.writeOptionReply(option: raw, type: type, data: data)
            }
            actions.append(.send(out))
        }
        guard let option = NBDOption(rawValue: raw) else {
            replyOption(raw, .errUnsupported, message: "option \(raw) is not supported")
            return actions
        }
        switch option {
        case .exportName:
            var d = data
            guard let name = d.readValidUTF8(length: d.readableBytes), let export = lookup(name).export else {
                throw NBDProtocolError.abort  // NBD_OPT_EXPORT_NAME has no error reply: close
            }
            var out = ByteBuffer()
            out.writeInteger(export.target.size)
            out.writeInteger(export.transmissionFlags(structuredReplies: structuredReplies).rawValue)
            if !noZeroes { out.writeRepeatingByte(0, count: 124) }
            actions.append(.send(out))
            actions.append(.enterTransmission(try enterTransmission(name)))
        case .abort:
            replyOption(raw, .ack)
            actions.append(.close)
        case .list:
            guard data.readableBytes == 0 else {
                replyOption(raw, .errInvalid, message: "NBD_OPT_LIST takes no data"); return actions
            }
            for (name, description) in catalog.list() {
                var entry = ByteBuffer()
                entry.writeInteger(UInt32(name.utf8.count))
                entry.writeString(name)
                entry.writeString(description)
                replyOption(raw, .server, data: entry)
            }
            replyOption(raw, .ack)
        case .startTLS:
            if data.readableBytes != 0 {
                replyOption(raw, .errInvalid, message: "NBD_OPT_STARTTLS takes no data")
            } else {
                replyOption(raw, .errUnsupported, message: "TLS is not offered on this port")
            }
        case .structuredReply:
            if data.readableBytes != 0 {
                replyOption(raw, .errInvalid, message: "NBD_OPT_STRUCTURED_REPLY takes no data")
            } else if structuredReplies {
                replyOption(raw, .errInvalid, message: "structured replies already negotiated")
            } else {
                structuredReplies = true
                replyOption(raw, .ack)
            }
        case .info, .go:
            guard let request = NBDInfoRequest.parse(data) else {
                replyOption(raw, .errInvalid, message: "malformed NBD_OPT_INFO/GO request"); return actions
            }
            let found = lookup(request.name)
            guard let export = found.export else {
                replyOption(raw, .errUnknown, message: found.message); return actions
            }
            var info = ByteBuffer()
            info.writeInteger(NBDInfo.export.rawValue)
            info.writeInteger(export.target.size)
            info.writeInteger(export.transmissionFlags(structuredReplies: structuredReplies).rawValue)
            replyOption(raw, .info, data: info)
            var sizes = ByteBuffer()
            sizes.writeInteger(NBDInfo.blockSize.rawValue)
            let b = export.target.blockSizes ?? NBDBlockSizes(minimum: 1, preferred: NBD.preferredBlockSize, maximum: UInt32(NBD.maxPayloadBytes))
            sizes.writeInteger(b.minimum)
            sizes.writeInteger(b.preferred)
            sizes.writeInteger(b.maximum)
            replyOption(raw, .info, data: sizes)
            if request.infos.contains(NBDInfo.name.rawValue) {
                var b = ByteBuffer(); b.writeInteger(NBDInfo.name.rawValue); b.writeString(export.name)
                replyOption(raw, .info, data: b)
            }
            if request.infos.contains(NBDInfo.description.rawValue) {
                var b = ByteBuffer(); b.writeInteger(NBDInfo.description.rawValue); b.writeString(export.description)
                replyOption(raw, .info, data: b)
            }
            replyOption(raw, .ack)
            if option == .go { actions.append(.enterTransmission(try enterTransmission(request.name))) }
        case .listMetaContext, .setMetaContext:
            guard let request = NBDMetaContextRequest.parse(data) else {
                replyOption(raw, .errInvalid, message: "malformed meta context request"); return actions
            }
            if option == .setMetaContext && !structuredReplies {
                replyOption(raw, .errInvalid, message: "negotiate structured replies first"); return actions
            }
            let found = lookup(request.exportName)
            guard found.export != nil else {
                replyOption(raw, .errUnknown, message: found.message); return actions
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
                replyOption(raw, .metaContext, data: b)
            }
            replyOption(raw, .ack)
        }
        return actions
    }

    /// The export `name` names, looked up once per connection.
    private mutating func lookup(_ name: String) -> (export: NBDExport?, message: String) {
        if let e = lookedUp[name] { return (e, "") }
        switch catalog.lookup(name) {
        case let .found(e):
            lookedUp[name] = e
            return (e, "")
        case let .unknown(message):
            return (nil, message)
        }
    }

    /// The export looked up as `name`, chosen; the others are let go.
    /// `name` was looked up by the option that chose it (found, or it would not get here):
    /// nil is a bug, and closes the connection.
    private mutating func enterTransmission(_ name: String) throws -> NBDExport {
        let chosen = lookedUp.removeValue(forKey: name)
        detachAll()
        guard let chosen else { throw NBDProtocolError.abort }
        return chosen
    }

    /// Let every export looked up go (the connection closes during the handshake).
    public mutating func detachAll() {
        for e in lookedUp.values { e.target.detach() }
        lookedUp.removeAll()
    }
}
