import Crypto
import Foundation
import Glibc
import X509

/// A unit's own key pair and certificate, kept in its home directory (CLI.md `--home`), made
/// on first use. Its ID — what peers pin — is the lowercase hex SHA-256 of the public key's
/// SubjectPublicKeyInfo (DER), as Syncthing names devices: certificates are self-signed, and
/// trust is the ID the operator gave each unit, not a CA.
///
/// ```
/// HOME/            mode 0700
///   key.pem        the P-256 private key (PKCS#8 PEM), mode 0600
///   cert.pem       a self-signed X.509 certificate of it, CN = the ID, valid 100 years
/// ```
public struct UnitIdentity {
    public let id: String
    public let privateKey: P256.Signing.PrivateKey
    public let certificatePEM: String

    /// The ID of a public key: hex SHA-256 of its SubjectPublicKeyInfo.
    public static func id(of publicKey: P256.Signing.PublicKey) -> String {
        SHA256.hash(data: publicKey.derRepresentation).map { String(format: "%02x", $0) }.joined()
    }

    /// Whether `text` looks like an ID (64 lowercase hex digits).
    public static func isValidID(_ text: String) -> Bool {
        text.utf8.count == 64 && text.utf8.allSatisfy { (48...57).contains($0) || (97...102).contains($0) }
    }

    /// `--home`, else `$REWIND_HOME`, else `~/.local/state/rewind`.
    public static func homeDirectory(_ given: String?) -> String {
        if let given, !given.isEmpty { return given }
        let env = ProcessInfo.processInfo.environment
        if let home = env["REWIND_HOME"], !home.isEmpty { return home }
        return (env["HOME"] ?? NSHomeDirectory()) + "/.local/state/rewind"
    }

    /// The identity in `home`; an error when it has none (a command that changes nothing
    /// must not create one: the peer would not know it anyway).
    public static func load(home: String) throws -> UnitIdentity {
        guard access(home + "/key.pem", F_OK) == 0 else {
            throw IdentityError("\(home) holds no unit identity (key.pem); give the --home of the unit the peer streams from (`rewind id --home DIR` shows its ID)")
        }
        return try loadOrCreate(home: home)
    }

    /// The identity in `home`, created there (directory, key, certificate) if it has none.
    public static func loadOrCreate(home: String) throws -> UnitIdentity {
        let keyPath = home + "/key.pem", certPath = home + "/cert.pem"
        if access(keyPath, F_OK) == 0 {
            let pem: String
            do { pem = try String(contentsOfFile: keyPath, encoding: .utf8) } catch {
                throw IdentityError("cannot read \(keyPath): \(error.localizedDescription)")
            }
            let key: P256.Signing.PrivateKey
            do { key = try P256.Signing.PrivateKey(pemRepresentation: pem) } catch {
                throw IdentityError("\(keyPath) is not a P-256 private key in PEM (\(error))")
            }
            let cert = (try? String(contentsOfFile: certPath, encoding: .utf8)) ?? ""
            let identity = UnitIdentity(id: id(of: key.publicKey), privateKey: key,
                                        certificatePEM: cert.isEmpty ? try selfSigned(key) : cert)
            if cert.isEmpty { try write(identity.certificatePEM, to: certPath, mode: 0o644) }
            return identity
        }
        try makeDirectories(home)
        let key = P256.Signing.PrivateKey()
        let identity = UnitIdentity(id: id(of: key.publicKey), privateKey: key, certificatePEM: try selfSigned(key))
        try write(key.pemRepresentation, to: keyPath, mode: 0o600)
        try write(identity.certificatePEM, to: certPath, mode: 0o644)
        return identity
    }

    static func selfSigned(_ key: P256.Signing.PrivateKey) throws -> String {
        let signer = Certificate.PrivateKey(key)
        let name = try DistinguishedName { CommonName(id(of: key.publicKey)) }
        let now = Date()
        let certificate = try Certificate(
            version: .v3, serialNumber: Certificate.SerialNumber(), publicKey: signer.publicKey,
            notValidBefore: now - 3600, notValidAfter: now + 100 * 365 * 86400,
            issuer: name, subject: name, signatureAlgorithm: .ecdsaWithSHA256,
            extensions: Certificate.Extensions(), issuerPrivateKey: signer)
        return try certificate.serializeAsPEM().pemString
    }

    /// Create `path` and its missing parents; the last one mode 0700 (it holds a private key).
    static func makeDirectories(_ path: String) throws {
        var built = path.hasPrefix("/") ? "" : "."
        for part in path.split(separator: "/") {
            built += "/" + part
            if mkdir(built, 0o755) != 0 && errno != EEXIST {
                throw IdentityError("cannot create \(built): \(String(cString: strerror(errno)))")
            }
        }
        chmod(path, 0o700)
    }

    /// Write `text` at `path` through a temporary file, synced, then renamed: never half a key.
    static func write(_ text: String, to path: String, mode: mode_t) throws {
        let temporary = path + ".new"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode)
        guard fd >= 0 else { throw IdentityError("cannot create \(temporary): \(String(cString: strerror(errno)))") }
        let bytes = Array(text.utf8)
        let written = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        let synced = fsync(fd) == 0
        close(fd)
        guard written == bytes.count, synced, rename(temporary, path) == 0 else {
            unlink(temporary)
            throw IdentityError("cannot write \(path): \(String(cString: strerror(errno)))")
        }
    }
}

/// A problem with a unit's home or identity: one line for the operator.
public struct IdentityError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}
