import NIOCore

/// What a server offered for the export a client chose (NBD_OPT_GO's replies).
public struct NBDExportInfo: Sendable, Equatable {
    public var size: UInt64
    public var flags: NBDTransmissionFlags
    /// NBD_OPT_STRUCTURED_REPLY was accepted.
    public var structuredReplies: Bool
    /// The id the server gave `base:allocation` (nil: not offered, no BLOCK_STATUS).
    public var baseAllocationID: UInt32?
    /// NBD_INFO_BLOCK_SIZE: minimum, preferred, maximum (nil: not sent; 1, 4096, 32 MiB assumed).
    public var blockSizes: NBDBlockSizes?
}

/// A client's side of the fixed-newstyle handshake, as a state machine: it is given the
/// server's bytes as they arrive and returns what to send, until the export is chosen. It asks
/// for structured replies and `base:allocation` (both optional: an older server refuses them
/// and is used without), then NBD_OPT_GO with the block-size information. Everything the
/// server sends is bounded and checked; a fault is a thrown `NBDHandshakeError`.
public struct NBDClientHandshake {
    public enum Action: Equatable {
        case send(ByteBuffer)
        /// NBD_OPT_STARTTLS was accepted: put TLS under the connection before sending more.
        case startTLS
        case ready(NBDExportInfo)
    }

    private enum State {
        case greeting
        case startTLS
        case structuredReply
        case metaContext
        case go
        case ready
    }

    let exportName: String
    /// Ask for TLS first (NBD_OPT_STARTTLS), before any other option.
    let tls: Bool
    private var state = State.greeting
    private var info = NBDExportInfo(size: 0, flags: [], structuredReplies: false, baseAllocationID: nil, blockSizes: nil)
    private var exportSeen = false
    private var replies = 0
    /// Option replies in one handshake, at most (infos and meta contexts included).
    static let maxReplies = 64

    /// Option replies longer than this are refused (a name or a description at most, here).
    static let maxReplyBytes = 64 * 1024

    public init(exportName: String, tls: Bool = false) {
        self.exportName = exportName
        self.tls = tls
    }

    /// Consume what `buffer` holds of the server's handshake; returns what to do, in order.
    /// Bytes after the last message of the handshake stay in `buffer`.
    public mutating func receive(_ buffer: inout ByteBuffer) throws -> [Action] {
        var actions: [Action] = []
        while true {
            switch state {
            case .ready:
                return actions
            case .greeting:
                let at = buffer.readerIndex
                guard let magic: UInt64 = buffer.getInteger(at: at), let opt: UInt64 = buffer.getInteger(at: at + 8),
                      let flags: UInt16 = buffer.getInteger(at: at + 16) else { return actions }
                buffer.moveReaderIndex(forwardBy: 18)
                guard magic == NBD.nbdMagic else { throw NBDHandshakeError("not an NBD server (it sent 0x\(String(magic, radix: 16)))") }
                guard opt == NBD.ihaveopt else { throw NBDHandshakeError("an oldstyle NBD server: it does not negotiate options (newstyle is needed)") }
                guard flags & NBD.flagFixedNewstyle != 0 else { throw NBDHandshakeError("the server does not speak fixed-newstyle NBD") }
                var out = ByteBuffer()
                out.writeInteger(NBD.clientFixedNewstyle | (flags & NBD.flagNoZeroes != 0 ? NBD.clientNoZeroes : 0))
                if tls {
                    Self.writeOption(&out, .startTLS, data: ByteBuffer())
                    actions.append(.send(out))
                    state = .startTLS
                    continue
                }
                Self.writeOption(&out, .structuredReply, data: ByteBuffer())
                actions.append(.send(out))
                state = .structuredReply
            case .startTLS:
                guard let reply = try Self.readOptionReply(&buffer) else { return actions }
                replies += 1
                guard reply.option == NBDOption.startTLS.rawValue else {
                    throw NBDHandshakeError("a reply to option \(reply.option) while waiting for NBD_OPT_STARTTLS")
                }
                guard !reply.isError else { throw NBDHandshakeError("the server refused TLS: \(reply.errorText)") }
                guard reply.type == NBDOptionReply.ack.rawValue else { throw NBDHandshakeError("an unexpected reply \(reply.type) to NBD_OPT_STARTTLS") }
                // What follows goes through TLS; the server sends nothing before the client's hello.
                guard buffer.readableBytes == 0 else { throw NBDHandshakeError("data after NBD_OPT_STARTTLS's acknowledgement, before TLS") }
                var out = ByteBuffer()
                Self.writeOption(&out, .structuredReply, data: ByteBuffer())
                actions.append(.startTLS)
                actions.append(.send(out))
                state = .structuredReply
                return actions
            case .structuredReply, .metaContext, .go:
                guard let reply = try Self.readOptionReply(&buffer) else { return actions }
                try handle(reply, &actions)
            }
        }
    }

    private struct OptionReply {
        var option: UInt32
        var type: UInt32
        var data: ByteBuffer
        var isError: Bool { type & 0x8000_0000 != 0 }
        var errorText: String {
            let names: [UInt32: String] = [0x8000_0001: "NBD_REP_ERR_UNSUP", 0x8000_0002: "NBD_REP_ERR_POLICY", 0x8000_0003: "NBD_REP_ERR_INVALID",
                                           0x8000_0004: "NBD_REP_ERR_PLATFORM", 0x8000_0005: "NBD_REP_ERR_TLS_REQD", 0x8000_0006: "NBD_REP_ERR_UNKNOWN",
                                           0x8000_0007: "NBD_REP_ERR_SHUTDOWN", 0x8000_0008: "NBD_REP_ERR_BLOCK_SIZE_REQD", 0x8000_0009: "NBD_REP_ERR_TOO_BIG"]
            let name = names[type] ?? "error 0x\(String(type, radix: 16))"
            var d = data
            let message = d.readString(length: d.readableBytes) ?? ""
            return message.isEmpty ? name : "\(name): \(message)"
        }
    }

    private static func readOptionReply(_ buffer: inout ByteBuffer) throws -> OptionReply? {
        let at = buffer.readerIndex
        guard buffer.readableBytes >= 20, let magic: UInt64 = buffer.getInteger(at: at), let option: UInt32 = buffer.getInteger(at: at + 8),
              let type: UInt32 = buffer.getInteger(at: at + 12), let length: UInt32 = buffer.getInteger(at: at + 16) else { return nil }
        guard magic == NBD.optionReplyMagic else { throw NBDHandshakeError("an option reply with bad magic 0x\(String(magic, radix: 16))") }
        guard Int(length) <= maxReplyBytes else { throw NBDHandshakeError("an option reply of \(length) bytes") }
        guard let data = buffer.getSlice(at: at + 20, length: Int(length)) else { return nil }
        buffer.moveReaderIndex(forwardBy: 20 + Int(length))
        return OptionReply(option: option, type: type, data: data)
    }

    private mutating func handle(_ r: OptionReply, _ actions: inout [Action]) throws {
        replies += 1
        guard replies <= Self.maxReplies else { throw NBDHandshakeError("more than \(Self.maxReplies) option replies") }
        let expected: NBDOption = switch state {
        case .structuredReply: .structuredReply
        case .metaContext: .setMetaContext
        default: .go
        }
        guard r.option == expected.rawValue else {
            throw NBDHandshakeError("a reply to option \(r.option) while waiting for \(expected)")
        }
        var d = r.data
        switch state {
        case .structuredReply:
            guard r.type == NBDOptionReply.ack.rawValue || r.isError else { throw NBDHandshakeError("an unexpected reply \(r.type) to NBD_OPT_STRUCTURED_REPLY") }
            info.structuredReplies = !r.isError
            var out = ByteBuffer()
            if info.structuredReplies {
                var data = ByteBuffer()
                data.writeInteger(UInt32(exportName.utf8.count))
                data.writeString(exportName)
                data.writeInteger(UInt32(1))
                data.writeInteger(UInt32(baseAllocationContext.utf8.count))
                data.writeString(baseAllocationContext)
                Self.writeOption(&out, .setMetaContext, data: data)
                state = .metaContext
            } else {
                writeGo(&out)
                state = .go
            }
            actions.append(.send(out))
        case .metaContext:
            if r.type == NBDOptionReply.metaContext.rawValue {
                guard let id: UInt32 = d.readInteger(), let name = d.readString(length: d.readableBytes) else {
                    throw NBDHandshakeError("a malformed NBD_REP_META_CONTEXT")
                }
                if name == baseAllocationContext { info.baseAllocationID = id }
                return
            }
            guard r.type == NBDOptionReply.ack.rawValue || r.isError else { throw NBDHandshakeError("an unexpected reply \(r.type) to NBD_OPT_SET_META_CONTEXT") }
            if r.isError { info.baseAllocationID = nil }
            var out = ByteBuffer()
            writeGo(&out)
            actions.append(.send(out))
            state = .go
        case .go:
            if r.isError {
                throw NBDHandshakeError("the server refused export \"\(exportName)\": \(r.errorText)")
            }
            if r.type == NBDOptionReply.info.rawValue {
                guard let kind: UInt16 = d.readInteger() else { throw NBDHandshakeError("an empty NBD_REP_INFO") }
                switch NBDInfo(rawValue: kind) {
                case .export?:
                    guard let size: UInt64 = d.readInteger(), let flags: UInt16 = d.readInteger(), d.readableBytes == 0 else {
                        throw NBDHandshakeError("a malformed NBD_INFO_EXPORT")
                    }
                    guard size <= UInt64(Int64.max) else { throw NBDHandshakeError("an export of \(size) bytes") }
                    info.size = size
                    info.flags = NBDTransmissionFlags(rawValue: flags)
                    exportSeen = true
                case .blockSize?:
                    guard let minimum: UInt32 = d.readInteger(), let preferred: UInt32 = d.readInteger(), let maximum: UInt32 = d.readInteger(),
                          d.readableBytes == 0 else { throw NBDHandshakeError("a malformed NBD_INFO_BLOCK_SIZE") }
                    guard minimum >= 1, minimum <= 65536, minimum.nonzeroBitCount == 1, preferred >= minimum, maximum >= minimum else {
                        throw NBDHandshakeError("block sizes \(minimum)/\(preferred)/\(maximum) that break the protocol's rules")
                    }
                    info.blockSizes = NBDBlockSizes(minimum: minimum, preferred: preferred, maximum: maximum)
                default:
                    break  // name, description, and types this client does not know
                }
                return
            }
            guard r.type == NBDOptionReply.ack.rawValue else { throw NBDHandshakeError("an unexpected reply \(r.type) to NBD_OPT_GO") }
            guard exportSeen else { throw NBDHandshakeError("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT") }
            state = .ready
            actions.append(.ready(info))
        case .greeting, .startTLS, .ready:
            break
        }
    }

    private func writeGo(_ out: inout ByteBuffer) {
        var data = ByteBuffer()
        data.writeInteger(UInt32(exportName.utf8.count))
        data.writeString(exportName)
        data.writeInteger(UInt16(1))
        data.writeInteger(NBDInfo.blockSize.rawValue)
        Self.writeOption(&out, .go, data: data)
    }

    static func writeOption(_ out: inout ByteBuffer, _ option: NBDOption, data: ByteBuffer) {
        var data = data
        out.writeInteger(NBD.ihaveopt)
        out.writeInteger(option.rawValue)
        out.writeInteger(UInt32(data.readableBytes))
        out.writeBuffer(&data)
    }
}

public struct NBDHandshakeError: Error, CustomStringConvertible, Equatable {
    public let description: String
    init(_ description: String) { self.description = description }
}
