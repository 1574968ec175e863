/// An export as the handshake offers it: reachable under `name` and under "".
public struct NBDExport: Sendable {
    public var name: String
    public var description: String
    public var target: any BlockTarget

    public init(name: String, description: String, target: any BlockTarget) {
        self.name = name
        self.description = description
        self.target = target
    }

    func answers(to requested: String) -> Bool { requested.isEmpty || requested == name }

    /// The transmission flags this export advertises. CAN_MULTI_CONN holds because a FLUSH
    /// on any connection fsyncs the one source and journal after every write completed before it.
    func transmissionFlags(structuredReplies: Bool) -> NBDTransmissionFlags {
        var flags: NBDTransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .canMultiConn, .sendCache]
        if target.readOnly {
            flags.insert(.readOnly)
        } else {
            flags.formUnion([.sendTrim, .sendWriteZeroes])
            if target.canFastZero { flags.insert(.sendFastZero) }
        }
        if structuredReplies { flags.insert(.sendDF) }
        return flags
    }
}
