import Crypto
import Foundation
import Glibc
import Testing
import X509
@testable import RewindLink

@Suite struct UnitIdentityTests {
    func temporaryHome() -> String {
        var template = Array("/tmp/rewind-test-home-XXXXXX".utf8CString)
        let dir = template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)) }
        return dir + "/nested/home"
    }

    func mode(_ path: String) -> mode_t {
        var st = stat()
        return stat(path, &st) == 0 ? st.st_mode & 0o777 : 0
    }

    /// Made on first use, the same ID ever after; the key private to the unit; the certificate
    /// self-signed for the ID's key, its CN the ID.
    @Test func anIdentityIsMadeOnceAndNamesItsKey() throws {
        let home = temporaryHome()
        defer { _ = try? FileManager.default.removeItem(atPath: String(home.dropLast("/nested/home".count))) }
        let first = try UnitIdentity.loadOrCreate(home: home)
        #expect(UnitIdentity.isValidID(first.id))
        #expect(first.id == UnitIdentity.id(of: first.privateKey.publicKey))
        #expect(mode(home) == 0o700)
        #expect(mode(home + "/key.pem") == 0o600)
        let again = try UnitIdentity.loadOrCreate(home: home)
        #expect(again.id == first.id)
        #expect(again.certificatePEM == first.certificatePEM)
        let certificate = try Certificate(pemEncoded: first.certificatePEM)
        #expect(certificate.subject == certificate.issuer)
        #expect(certificate.subject.description == "CN=\(first.id)")
        #expect(certificate.publicKey == Certificate.PublicKey(first.privateKey.publicKey))
        // A lost certificate is made again for the same key.
        unlink(home + "/cert.pem")
        #expect(try UnitIdentity.loadOrCreate(home: home).id == first.id)
        #expect(access(home + "/cert.pem", F_OK) == 0)
    }

    @Test func aDamagedKeyIsNamed() throws {
        let home = temporaryHome()
        defer { _ = try? FileManager.default.removeItem(atPath: String(home.dropLast("/nested/home".count))) }
        _ = try UnitIdentity.loadOrCreate(home: home)
        try "not a key".write(toFile: home + "/key.pem", atomically: true, encoding: .utf8)
        do {
            _ = try UnitIdentity.loadOrCreate(home: home)
            Issue.record("a damaged key was accepted")
        } catch let e as IdentityError {
            #expect(e.description.hasPrefix("\(home)/key.pem is not a P-256 private key in PEM"))
        }
    }

    @Test func idsAreSixtyFourLowercaseHexDigits() {
        #expect(UnitIdentity.isValidID(String(repeating: "a0", count: 32)))
        #expect(!UnitIdentity.isValidID(String(repeating: "A0", count: 32)))
        #expect(!UnitIdentity.isValidID(String(repeating: "a", count: 63)))
        #expect(!UnitIdentity.isValidID(String(repeating: "g", count: 64)))
    }
}
