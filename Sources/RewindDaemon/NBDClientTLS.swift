import Foundation
import NIOCore
import NIOSSL
import RewindCore
import RewindNBD

/// TLS for `nbds://` and `nbds+unix://` upstreams (NBD_OPT_STARTTLS, then TLS 1.2 or 1.3), as
/// qemu-nbd and nbdkit offer it with X.509 certificates. The URI's `tls-certificates=DIR` holds
/// `ca-cert.pem` (the CA to trust; without it, the system's) and optionally `client-cert.pem`
/// with `client-key.pem` — the layout libnbd, qemu and nbdkit use. The server's certificate
/// is checked against `tls-hostname`, else the URI's host (not for an IP address or a Unix
/// socket: then the chain alone); `tls-verify-peer=false` skips the check.
enum NBDClientTLS {
    static func factory(for uri: NBDURI) throws -> NBDClient.TLSHandlerFactory? {
        guard uri.tls else { return nil }
        var config = TLSConfiguration.makeClientConfiguration()
        config.minimumTLSVersion = .tlsv12
        do {
            if let dir = uri.tlsCertificates {
                let ca = dir + "/ca-cert.pem"
                guard access(dir, R_OK) == 0 else { throw RewindError.invalidArgument("\(uri): tls-certificates \(dir) cannot be read") }
                if access(ca, R_OK) == 0 { config.trustRoots = .file(ca) }
                let cert = dir + "/client-cert.pem", key = dir + "/client-key.pem"
                if access(cert, R_OK) == 0 && access(key, R_OK) == 0 {
                    config.certificateChain = try NIOSSLCertificate.fromPEMFile(cert).map { .certificate($0) }
                    config.privateKey = .privateKey(try NIOSSLPrivateKey(file: key, format: .pem))
                }
            }
            var hostname = uri.tlsHostname
            if hostname == nil, case let .tcp(host, _) = uri.transport, !isIPAddress(host) { hostname = host }
            config.certificateVerification = !uri.tlsVerifyPeer ? .none : hostname == nil ? .noHostnameVerification : .fullVerification
            let context = try NIOSSLContext(configuration: config)
            return { [hostname] in try NIOSSLClientHandler(context: context, serverHostname: hostname) }
        } catch let e as RewindError {
            throw e
        } catch {
            throw RewindError.invalidArgument("\(uri): TLS set-up: \(error)")
        }
    }

    static func isIPAddress(_ host: String) -> Bool {
        var v4 = in_addr(), v6 = in6_addr()
        return inet_pton(AF_INET, host, &v4) == 1 || inet_pton(AF_INET6, host, &v6) == 1
    }
}
