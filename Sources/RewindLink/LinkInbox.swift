import Foundation
import NIOCore

/// Frames from one connection, handed from its event loop to the thread that drives the link
/// (blocking waits with deadlines), and why the connection ended.
final class LinkInbox: @unchecked Sendable {
    private let cond = NSCondition()
    private var frames: [LinkFrame] = []
    private var closedWhy: String?
    private var nudged = false

    func push(_ frame: LinkFrame) {
        cond.lock(); defer { cond.unlock() }
        frames.append(frame)
        cond.signal()
    }

    func close(_ why: String) {
        cond.lock(); defer { cond.unlock() }
        if closedWhy == nil { closedWhy = why }
        cond.signal()
    }

    /// End the current wait early: there is something to send.
    func nudge() {
        cond.lock(); defer { cond.unlock() }
        nudged = true
        cond.signal()
    }

    /// The next frame, waiting up to `seconds` (or until nudged); nil when none came. Throws
    /// once the connection has ended and every frame before that was taken.
    func next(waiting seconds: Double) throws -> LinkFrame? {
        cond.lock(); defer { cond.unlock() }
        let deadline = Date(timeIntervalSinceNow: seconds)
        while frames.isEmpty && closedWhy == nil && !nudged {
            if !cond.wait(until: deadline) { break }
        }
        nudged = false
        if !frames.isEmpty { return frames.removeFirst() }
        if let why = closedWhy { throw LinkError(why) }
        return nil
    }
}

/// Passes a connection's frames and its end to a `LinkInbox`.
final class LinkInboxHandler: ChannelInboundHandler {
    typealias InboundIn = LinkFrame
    let inbox: LinkInbox
    let seen: PresentedIdentity
    let expected: String

    init(inbox: LinkInbox, seen: PresentedIdentity, expected: String) {
        self.inbox = inbox
        self.seen = seen
        self.expected = expected
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        inbox.push(unwrapInboundIn(data))
    }

    func errorCaught(context: ChannelHandlerContext, error: Error) {
        inbox.close(LinkError.describe(error, seen: seen, expected: expected))
        context.close(promise: nil)
    }

    func channelInactive(context: ChannelHandlerContext) {
        inbox.close("the connection closed")
        context.fireChannelInactive()
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let e = event as? IdleStateHandler.IdleStateEvent, e == .read {
            inbox.close("nothing heard for \(LinkTiming.silenceSeconds) s")
            context.close(promise: nil)
        }
        context.fireUserInboundEventTriggered(event)
    }
}

/// Why a link stopped: the one line that is logged.
public struct LinkError: Error, CustomStringConvertible, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }

    /// A connection error as a log line; a failed TLS handshake says what went wrong in the
    /// operator's terms: which identity was presented, and whether it was this end or the peer
    /// that refused. `expected`: the ID this end pinned (a sender), nil on a receiver.
    static func describe(_ error: Error, seen: PresentedIdentity, expected: String?) -> String {
        let text = "\(error)"
        if text == "uncleanShutdown" { return "the connection was cut (no TLS close: the peer was killed, or the network dropped it)" }
        guard text.contains("sslError") || text.contains("handshakeFailed") else {
            if let e = error as? LinkFrameError { return "a bad frame: \(e)" }
            return text
        }
        // BoringSSL's reason: "error:1000007d:SSL routines:OPENSSL_internal:REASON at ...".
        let reason = text.range(of: "OPENSSL_internal:").map { r in
            String(text[r.upperBound...].prefix { $0.isLetter || $0.isNumber || $0 == "_" })
        } ?? text
        if reason == "BAD_DECRYPT" || reason == "DECRYPTION_FAILED_OR_BAD_RECORD_MAC" {
            if case .none = seen.id {  // before any certificate: the handshake's own records
                return "TLS handshake failed its integrity check (\(reason)): a replayed or damaged handshake"
            }
            return "a TLS record failed its integrity check (\(reason)): bytes were damaged on the way"
        }
        switch seen.id {
        case let .some(.some(id)):
            if let expected, id != expected { return "TLS handshake refused: the peer presented identity \(id), not \(expected)" }
            if expected == nil && reason == "CERTIFICATE_VERIFY_FAILED" { return "TLS handshake refused: its identity \(id) is not one this unit was given (--peer-id)" }
            if reason.contains("CERTIFICATE_UNKNOWN") || reason.contains("BAD_CERTIFICATE") {
                return "TLS handshake refused by the peer: it does not know this unit's identity (give it this unit's `rewind id`)"
            }
            return "TLS handshake failed (\(reason))"
        case .some(.none):
            return "TLS handshake refused: the certificate presented has no readable public key"
        case .none:
            if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE" { return "TLS handshake refused: no certificate was presented" }
            if reason.contains("CERTIFICATE_UNKNOWN") || reason.contains("BAD_CERTIFICATE") {
                return "TLS handshake refused by the peer: it does not know this unit's identity, or this unit does not know its (check `rewind id` on both)"
            }
            return "not a TLS 1.3 handshake (\(reason))"
        }
    }
}

/// The link's clocks.
public enum LinkTiming {
    /// A keep-alive is sent after this long without sending.
    public static let keepaliveSeconds = 5
    /// A connection silent this long is closed (and reconnected by its sender).
    public static let silenceSeconds = 30
    /// Reconnect backoff: from the first to the longest wait.
    public static let firstBackoff = 0.25
    public static let longestBackoff = 15.0
}
