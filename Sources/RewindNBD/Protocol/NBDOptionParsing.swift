import NIOCore

/// Option header (16 bytes): u64 IHAVEOPT, u32 option, u32 length; then `length` bytes.
struct NBDOptionHeader {
    static let size = 16
    var option: UInt32
    var length: UInt32

    static func read(from buffer: inout ByteBuffer) throws -> NBDOptionHeader? {
        guard buffer.readableBytes >= size, let magic: UInt64 = buffer.readInteger() else { return nil }
        guard magic == NBD.ihaveopt else { throw NBDProtocolError.badOptionMagic(magic) }
        guard let option: UInt32 = buffer.readInteger(), let length: UInt32 = buffer.readInteger() else { return nil }
        return NBDOptionHeader(option: option, length: length)
    }
}

/// NBD_OPT_INFO / NBD_OPT_GO data: u32 namelen, name, u16 count, count × u16 info type.
struct NBDInfoRequest: Equatable {
    var name: String
    var infos: [UInt16]

    /// nil when the data is malformed (→ NBD_REP_ERR_INVALID), e.g. a name length that
    /// overruns the option (CVE-2022-26495/26496) or invalid UTF-8.
    static func parse(_ data: ByteBuffer) -> NBDInfoRequest? {
        var b = data
        guard let nameLength: UInt32 = b.readInteger(), UInt64(nameLength) + 6 <= UInt64(data.readableBytes),
              nameLength <= UInt32(NBD.maxStringBytes),
              let name = b.readValidUTF8(length: Int(nameLength)),
              let count: UInt16 = b.readInteger(), b.readableBytes == Int(count) * 2 else { return nil }
        var infos: [UInt16] = []
        for _ in 0..<count {
            guard let info: UInt16 = b.readInteger() else { return nil }
            infos.append(info)
        }
        return NBDInfoRequest(name: name, infos: infos)
    }
}

/// NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT data:
/// u32 namelen, name, u32 count, count × (u32 length, query).
struct NBDMetaContextRequest: Equatable {
    var exportName: String
    var queries: [String]

    static func parse(_ data: ByteBuffer) -> NBDMetaContextRequest? {
        var b = data
        guard let nameLength: UInt32 = b.readInteger(), nameLength <= UInt32(NBD.maxStringBytes),
              Int(nameLength) <= b.readableBytes, let name = b.readValidUTF8(length: Int(nameLength)),
              let count: UInt32 = b.readInteger() else { return nil }
        // Each query takes at least 4 bytes: a count that cannot fit is malformed, not a loop bound.
        guard UInt64(count) * 4 <= UInt64(b.readableBytes) else { return nil }
        var queries: [String] = []
        for _ in 0..<count {
            guard let length: UInt32 = b.readInteger(), length <= UInt32(NBD.maxStringBytes),
                  Int(length) <= b.readableBytes, let q = b.readValidUTF8(length: Int(length)) else { return nil }
            queries.append(q)
        }
        guard b.readableBytes == 0 else { return nil }
        return NBDMetaContextRequest(exportName: name, queries: queries)
    }
}

extension ByteBuffer {
    /// Read `length` bytes as UTF-8, nil if they are not valid UTF-8.
    mutating func readValidUTF8(length: Int) -> String? {
        guard let bytes = readBytes(length: length) else { return nil }
        return String(validating: bytes, as: UTF8.self)
    }

    // MARK: option replies: u64 magic, u32 option, u32 type, u32 length, data

    mutating func writeOptionReply(option: UInt32, type: NBDOptionReply, data: ByteBuffer? = nil) {
        writeInteger(NBD.optionReplyMagic)
        writeInteger(option)
        writeInteger(type.rawValue)
        writeInteger(UInt32(data?.readableBytes ?? 0))
        if var data { writeBuffer(&data) }
    }

    /// The message is cut to `optionErrorMessageBytesMax` bytes (on a character boundary):
    /// it may quote what the client sent, and clients refuse long ones (libnbd: over 4 KiB).
    mutating func writeOptionError(option: UInt32, type: NBDOptionReply, message: String) {
        var data = ByteBuffer()
        var text = message
        if text.utf8.count > NBD.optionErrorMessageBytesMax {
            text = String(decoding: message.utf8.prefix(NBD.optionErrorMessageBytesMax - 3), as: UTF8.self)
            if text.last == "\u{FFFD}" { text.removeLast() }  // a character cut in two
            text += "…"
        }
        data.writeString(text)
        writeOptionReply(option: option, type: type, data: data)
    }

    // MARK: transmission replies

    /// Simple reply (16 bytes): u32 magic, u32 error, u64 cookie.
    mutating func writeSimpleReply(cookie: UInt64, error: UInt32 = 0) {
        writeInteger(NBD.simpleReplyMagic)
        writeInteger(error)
        writeInteger(cookie)
    }

    /// Structured chunk header (20 bytes): u32 magic, u16 flags (bit0 DONE), u16 type, u64 cookie, u32 length.
    mutating func writeChunkHeader(cookie: UInt64, type: NBDChunkType, done: Bool, length: Int) {
        writeInteger(NBD.structuredReplyMagic)
        writeInteger(UInt16(done ? 1 : 0))
        writeInteger(type.rawValue)
        writeInteger(cookie)
        writeInteger(UInt32(length))
    }

    /// NBD_REPLY_TYPE_ERROR: u32 errno, u16 message length, message.
    mutating func writeErrorChunk(cookie: UInt64, error: NBDErrno, message: String) {
        let msg = Array(message.utf8.prefix(1024))
        writeChunkHeader(cookie: cookie, type: .error, done: true, length: 6 + msg.count)
        writeInteger(error.rawValue)
        writeInteger(UInt16(msg.count))
        writeBytes(msg)
    }
}
