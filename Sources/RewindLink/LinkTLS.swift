import Crypto
import NIOConcurrencyHelpers
import NIOCore
import NIOSSL
import RewindCore

/// A peer to stream to: `ID@HOST:PORT` (CLI.md). Only a unit proving the key whose SHA-256
/// is ID is streamed to.
public struct LinkPeer: Sendable, Equatable, CustomStringConvertible {
    public var id: String
    public var host: String
    public var port: Int

    public init(parsing text: String) throws {
        guard let at = text.firstIndex(of: "@") else {
            throw IdentityError("invalid peer \"\(text)\": give ID@HOST:PORT (ID from `rewind id` on that unit)")
        }
        let id = String(text[..<at]).lowercased(), address = String(text[text.index(after: at)...])
        guard UnitIdentity.isValidID(id) else {
            throw IdentityError("invalid peer \"\(text)\": its ID must be the 64 hex digits `rewind id` prints on that unit")
        }
        guard let colon = address.lastIndex(of: ":"), let port = Int(address[address.index(after: colon)...]),
              (1...65535).contains(port), colon != address.startIndex else {
            throw IdentityError("invalid peer \"\(text)\": give ID@HOST:PORT with a port from 1 to 65535")
        }
        var host = String(address[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        self.init(id: id, host: host, port: port)
    }

    public init(id: String, host: String, port: Int) {
        self.id = id
        self.host = host
        self.port = port
    }

    public var address: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }
    /// The ID shortened for log lines.
    public var shortID: String { String(id.prefix(16)) }
    public var description: String { "\(shortID)…@\(address)" }
}

/// Mutual TLS 1.3 for the link, from the first byte: each side presents its unit's
/// self-signed certificate and accepts the other only if the SHA-256 of the public key it
/// presented is an ID it was given. TLS 1.3's CertificateVerify proves the peer holds that
/// key; no certificate authority is involved (as Syncthing names devices).
public enum LinkTLS {
    public static func serverContext(_ identity: UnitIdentity) throws -> NIOSSLContext {
        var c = TLSConfiguration.makeServerConfiguration(certificateChain: [.certificate(try certificate(identity))],
                                                         privateKey: .privateKey(try key(identity)))
        restrict(&c)
        return try NIOSSLContext(configuration: c)
    }

    public static func clientContext(_ identity: UnitIdentity) throws -> NIOSSLContext {
        var c = TLSConfiguration.makeClientConfiguration()
        c.certificateChain = [.certificate(try certificate(identity))]
        c.privateKey = .privateKey(try key(identity))
        restrict(&c)
        return try NIOSSLContext(configuration: c)
    }

    private static func restrict(_ c: inout TLSConfiguration) {
        c.minimumTLSVersion = .tlsv13
        c.maximumTLSVersion = .tlsv13
        // Verification on (a server then requires a client certificate), done by `verifier`.
        c.certificateVerification = .noHostnameVerification
        c.trustRoots = .certificates([])
    }

    private static func certificate(_ identity: UnitIdentity) throws -> NIOSSLCertificate {
        try NIOSSLCertificate(bytes: Array(identity.certificatePEM.utf8), format: .pem)
    }

    private static func key(_ identity: UnitIdentity) throws -> NIOSSLPrivateKey {
        try NIOSSLPrivateKey(bytes: Array(identity.privateKey.pemRepresentation.utf8), format: .pem)
    }

    /// The ID of a presented certificate: hex SHA-256 of its public key's SPKI.
    public static func id(of certificate: NIOSSLCertificate) -> String? {
        guard let spki = try? certificate.extractPublicKey().toSPKIBytes() else { return nil }
        return SHA256.hash(data: spki).map { String(format: "%02x", $0) }.joined()
    }

    /// A verification callback accepting only `allowed` IDs; what the peer presented is left
    /// in `seen` for the log line.
    public static func verifier(allowed: Set<String>, seen: PresentedIdentity) -> NIOSSLCustomVerificationCallback {
        { certificates, promise in
            guard let leaf = certificates.first, let id = id(of: leaf) else {
                seen.set(nil)
                promise.succeed(.failed)
                return
            }
            seen.set(id)
            promise.succeed(allowed.contains(id) ? .certificateVerified : .failed)
        }
    }
}

/// The identity a peer presented in its TLS handshake (set by `LinkTLS.verifier`).
public final class PresentedIdentity: @unchecked Sendable {
    private let lock = NIOLock()
    private var value: String??

    public init() {}

    func set(_ id: String?) { lock.withLock { value = .some(id) } }

    /// nil: no certificate seen yet; .some(nil): one whose key could not be read.
    public var id: String?? { lock.withLock { value } }

    /// For a refusal's log line.
    public var summary: String {
        switch id {
        case .none: "no certificate"
        case .some(.none): "a certificate whose key cannot be read"
        case let .some(.some(id)): "identity \(id)"
        }
    }
}
