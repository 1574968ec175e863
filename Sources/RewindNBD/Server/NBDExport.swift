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

    public func answers(to requested: String) -> Bool { requested.isEmpty || requested == name }

    /// The transmission flags this export advertises. CAN_MULTI_CONN holds because a FLUSH
    /// on any connection fsyncs the one source and journal after every write completed before it.
    func transmissionFlags(structuredReplies: Bool) -> NBDTransmissionFlags {
        var flags: NBDTransmissionFlags = [.hasFlags, .sendFlush, .sendFUA, .canMultiConn, .sendCache]
        if target.readOnly {
            flags.insert(.readOnly)
        } else {
            flags.formUnion([.sendTrim, .sendWriteZeroes])
            if target.canFastZero { flags.insert(.sendFastZero) }
            if let offered = target.offeredFlags {
                flags.subtract(NBDTransmissionFlags([.sendTrim, .sendWriteZeroes, .sendFastZero]).subtracting(offered))
            }
        }
        if structuredReplies { flags.insert(.sendDF) }
        return flags
    }
}

/// What a catalog answers for a requested export name.
public enum NBDExportLookup: Sendable {
    case found(NBDExport)
    /// No such export: the message goes to the client with NBD_REP_ERR_UNKNOWN.
    case unknown(String)
}

/// The exports a server offers. `lookup` may open resources for the connection that asked
/// (a point export pins its point); the connection calls the target's `detach()` once it no
/// longer needs it — at once for an NBD_OPT_INFO, at disconnect for the export it chose.
public protocol NBDExportCatalog: Sendable {
    func lookup(_ name: String) -> NBDExportLookup
    /// Names and descriptions for NBD_OPT_LIST, the default export first.
    func list() -> [(name: String, description: String)]
}

/// One export under its name and "".
public struct SingleExportCatalog: NBDExportCatalog {
    public let export: NBDExport
    public init(_ export: NBDExport) { self.export = export }
    public func lookup(_ name: String) -> NBDExportLookup {
        export.answers(to: name) ? .found(export) : .unknown("no export named \"\(name)\"")
    }
    public func list() -> [(name: String, description: String)] { [(export.name, export.description)] }
}
