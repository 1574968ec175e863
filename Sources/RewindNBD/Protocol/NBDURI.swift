/// An NBD server's address in the NBD URI standard's form (as qemu, nbdkit and libnbd read
/// it): `nbd://HOST[:PORT][/EXPORT]`, `nbd+unix:///[EXPORT]?socket=PATH`, and their TLS forms
/// `nbds://…`, `nbds+unix://…`. Percent-escapes in the export name are decoded.
public struct NBDURI: Sendable, Equatable, CustomStringConvertible {
    public enum Transport: Sendable, Equatable {
        case tcp(host: String, port: Int)
        case unix(path: String)
    }

    public var transport: Transport
    public var exportName: String
    public var tls: Bool
    /// TLS (`nbds`): `tls-certificates=DIR`, a directory holding `ca-cert.pem` (the CA to trust;
    /// else the system's) and, for a client certificate, `client-cert.pem` and `client-key.pem`,
    /// as libnbd and qemu read it; `tls-verify-peer=false` to skip the server's certificate
    /// check; `tls-hostname=NAME`, the name to check it against (else the URI's host).
    public var tlsCertificates: String?
    public var tlsVerifyPeer = true
    public var tlsHostname: String?
    /// As given.
    public let text: String

    public var description: String { text }

    public init(_ text: String) throws {
        self.text = text
        let parts = text.split(separator: "://", maxSplits: 1, omittingEmptySubsequences: false)
        guard parts.count == 2 else { throw NBDURIError(text, "not an NBD URI (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)") }
        let scheme = parts[0].lowercased()
        var rest = parts[1]
        var query = Substring("")
        if let q = rest.firstIndex(of: "?") {
            query = rest[rest.index(after: q)...]
            rest = rest[..<q]
        }
        let authority: Substring, path: Substring
        if let slash = rest.firstIndex(of: "/") {
            authority = rest[..<slash]
            path = rest[rest.index(after: slash)...]
        } else {
            authority = rest
            path = ""
        }
        guard let name = Self.percentDecoded(path) else { throw NBDURIError(text, "its export name has a bad %-escape") }
        exportName = name
        var parameters: [String: String] = [:]
        for pair in query.split(separator: "&") where !pair.isEmpty {
            let eq = pair.firstIndex(of: "=") ?? pair.endIndex
            let rawValue = eq < pair.endIndex ? pair[pair.index(after: eq)...] : ""
            guard let key = Self.percentDecoded(pair[..<eq]), let value = Self.percentDecoded(rawValue) else {
                throw NBDURIError(text, "its query has a bad %-escape")
            }
            parameters[key] = value
        }
        tlsCertificates = parameters["tls-certificates"]
        tlsHostname = parameters["tls-hostname"]
        if let verify = parameters["tls-verify-peer"] {
            guard verify == "true" || verify == "false" else { throw NBDURIError(text, "tls-verify-peer is true or false") }
            tlsVerifyPeer = verify == "true"
        }
        switch scheme {
        case "nbd", "nbds":
            tls = scheme == "nbds"
            guard !authority.isEmpty else { throw NBDURIError(text, "it names no host") }
            var host = String(authority), port = NBD.defaultPort
            if authority.hasPrefix("[") {
                // [IPv6]:port
                guard let close = authority.firstIndex(of: "]") else { throw NBDURIError(text, "its IPv6 address has no closing ]") }
                host = String(authority[authority.index(after: authority.startIndex)..<close])
                let after = authority[authority.index(after: close)...]
                if !after.isEmpty {
                    guard after.hasPrefix(":"), let p = Int(after.dropFirst()), (1...65535).contains(p) else {
                        throw NBDURIError(text, "its port is not a number from 1 to 65535")
                    }
                    port = p
                }
            } else if let colon = authority.lastIndex(of: ":") {
                guard let p = Int(authority[authority.index(after: colon)...]), (1...65535).contains(p) else {
                    throw NBDURIError(text, "its port is not a number from 1 to 65535")
                }
                host = String(authority[..<colon])
                port = p
            }
            guard !host.isEmpty else { throw NBDURIError(text, "it names no host") }
            guard parameters["socket"] == nil else { throw NBDURIError(text, "socket= belongs to nbd+unix:// URIs") }
            transport = .tcp(host: host, port: port)
        case "nbd+unix", "nbds+unix":
            tls = scheme == "nbds+unix"
            guard authority.isEmpty else { throw NBDURIError(text, "an nbd+unix URI names no host (nbd+unix:///EXPORT?socket=PATH)") }
            guard let socket = parameters["socket"], !socket.isEmpty else { throw NBDURIError(text, "it names no socket (…?socket=PATH)") }
            transport = .unix(path: socket)
        default:
            throw NBDURIError(text, "the scheme \(scheme) is not one of nbd, nbds, nbd+unix, nbds+unix")
        }
    }

    private static func percentDecoded(_ s: Substring) -> String? {
        guard s.contains("%") else { return String(s) }
        var bytes: [UInt8] = []
        var i = s.utf8.startIndex
        let u = s.utf8
        while i < u.endIndex {
            let c = u[i]
            if c == UInt8(ascii: "%") {
                let h = u.index(after: i)
                guard h < u.endIndex, u.index(after: h) < u.endIndex,
                      let hi = hexValue(u[h]), let lo = hexValue(u[u.index(after: h)]) else { return nil }
                bytes.append(hi << 4 | lo)
                i = u.index(h, offsetBy: 2)
            } else {
                bytes.append(c)
                i = u.index(after: i)
            }
        }
        return String(validating: bytes, as: UTF8.self)
    }

    private static func hexValue(_ c: UInt8) -> UInt8? {
        switch c {
        case UInt8(ascii: "0")...UInt8(ascii: "9"): c - UInt8(ascii: "0")
        case UInt8(ascii: "a")...UInt8(ascii: "f"): c - UInt8(ascii: "a") + 10
        case UInt8(ascii: "A")...UInt8(ascii: "F"): c - UInt8(ascii: "A") + 10
        default: nil
        }
    }
}

public struct NBDURIError: Error, CustomStringConvertible, Equatable {
    public let description: String
    init(_ uri: String, _ why: String) { description = "\(uri): \(why)" }
}
