import Logging
import Metrics
import NIOConcurrencyHelpers
import NIOCore
import RewindNBD

/// A tap's connection to its upstream server, kept up: when it drops, requests fail at once
/// (hosts see EIO, never a hang) while it reconnects with backoff — 100 ms, doubling to 5 s —
/// and says so in the log and the metrics. A new connection is used only once `prepare` (the
/// tap's journalling of writes left in doubt) has succeeded on it, and only if the export is
/// the same size with the same flags: another volume behind the same address is refused.
final class UpstreamLink: Sendable {
    enum State {
        case up(NBDClient)
        case down(since: NIODeadline, attempts: Int)
        case stopped
    }

    let uri: NBDURI
    /// What the first connection negotiated: what the tap offers its hosts.
    let info: NBDExportInfo
    private let tls: NBDClient.TLSHandlerFactory?
    private let group: EventLoopGroup
    private let logger: Logger
    private let state: NIOLockedValueBox<State>
    /// Runs on each new connection before it is used; a failure drops it and retries.
    private let prepare: NIOLockedValueBox<(@Sendable (NBDClient) -> EventLoopFuture<Void>)?> = .init(nil)
    private let upGauge = Gauge(label: "rewind_tap_upstream_up")
    private let reconnects = Counter(label: "rewind_tap_reconnects_total")
    private let drops = Counter(label: "rewind_tap_upstream_drops_total")

    static let firstBackoff = TimeAmount.milliseconds(100)
    static let maxBackoff = TimeAmount.seconds(5)

    /// Connect once (a failure is the caller's: tap does not start without its upstream).
    static func connect(_ uri: NBDURI, group: EventLoopGroup, logger: Logger) throws -> UpstreamLink {
        let tls = try NBDClientTLS.factory(for: uri)
        let client = try NBDClient.connect(uri, group: group, tls: tls).wait()
        let link = UpstreamLink(uri: uri, client: client, tls: tls, group: group, logger: logger)
        link.watch(client)
        return link
    }

    private init(uri: NBDURI, client: NBDClient, tls: NBDClient.TLSHandlerFactory?, group: EventLoopGroup, logger: Logger) {
        self.uri = uri
        self.tls = tls
        self.info = client.info
        self.group = group
        self.logger = logger
        state = NIOLockedValueBox(.up(client))
        upGauge.record(1)
    }

    /// `body` runs on every reconnection before the connection is used.
    func onReconnect(_ body: @escaping @Sendable (NBDClient) -> EventLoopFuture<Void>) {
        prepare.withLockedValue { $0 = body }
    }

    /// The connection to send on; nil while the upstream is away.
    var client: NBDClient? {
        state.withLockedValue { if case let .up(c) = $0 { return c } else { return nil } }
    }

    private func watch(_ client: NBDClient) {
        client.closeFuture.whenComplete { [self] _ in
            let wasUp = state.withLockedValue { s -> Bool in
                guard case let .up(c) = s, c === client else { return false }
                s = .down(since: .now(), attempts: 0)
                return true
            }
            guard wasUp else { return }
            upGauge.record(0)
            drops.increment()
            logger.error("upstream \(uri) dropped: requests fail with EIO until it is back; reconnecting")
            schedule(after: Self.firstBackoff)
        }
    }

    private func schedule(after delay: TimeAmount) {
        group.next().scheduleTask(in: delay) { [self] in attempt(backoff: delay) }
    }

    private func attempt(backoff: TimeAmount) {
        guard case let .down(since, attempts) = state.withLockedValue({ $0 }) else { return }
        let next = TimeAmount.nanoseconds(min(backoff.nanoseconds * 2, Self.maxBackoff.nanoseconds))
        NBDClient.connect(uri, group: group, timeout: .seconds(5), tls: tls).flatMap { [self] client -> EventLoopFuture<NBDClient> in
            guard client.info.size == info.size, client.info.flags == info.flags else {
                _ = client.close()
                return client.eventLoop.makeFailedFuture(NBDClientError.unsupported(
                    "it now offers \(client.info.size) bytes with flags 0x\(String(client.info.flags.rawValue, radix: 16)), not \(info.size) bytes with 0x\(String(info.flags.rawValue, radix: 16)): not the volume this tap journals"))
            }
            guard let prepare = prepare.withLockedValue({ $0 }) else { return client.eventLoop.makeSucceededFuture(client) }
            return prepare(client).map { client }.flatMapErrorThrowing { error in
                _ = client.close()
                throw error
            }
        }.whenComplete { [self] result in
            switch result {
            case let .success(client):
                let kept = state.withLockedValue { s -> Bool in
                    guard case .down = s else { return false }
                    s = .up(client)
                    return true
                }
                guard kept else { _ = client.close(); return }
                watch(client)
                upGauge.record(1)
                reconnects.increment()
                let away = Double((NIODeadline.now() - since).nanoseconds) / 1e9
                logger.notice("upstream \(uri) is back after \(String(format: "%.1f", away)) s (\(attempts + 1) attempts): serving again")
            case let .failure(error):
                let still = state.withLockedValue { s -> Bool in
                    guard case .down = s else { return false }
                    s = .down(since: since, attempts: attempts + 1)
                    return true
                }
                guard still else { return }
                // Every attempt at first, then one line per 5 s of backoff.
                if attempts < 3 || backoff >= Self.maxBackoff {
                    logger.warning("upstream \(uri) still away (attempt \(attempts + 1)): \(error); next try in \(next.nanoseconds / 1_000_000) ms")
                }
                schedule(after: next)
            }
        }
    }

    /// Stop reconnecting and close the connection.
    func stop() -> EventLoopFuture<Void> {
        let old = state.withLockedValue { s -> State in let o = s; s = .stopped; return o }
        if case let .up(client) = old { return client.close() }
        return group.next().makeSucceededVoidFuture()
    }
}
