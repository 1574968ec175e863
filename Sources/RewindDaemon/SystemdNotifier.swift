import Foundation
import Glibc
import Logging
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix
import RewindCore
import ServiceLifecycle

/// What `rewind serve` tells a service manager, by sd_notify(3)'s protocol written out (no
/// libsystemd): under systemd with `Type=notify`, `NOTIFY_SOCKET` names an `AF_UNIX` datagram
/// socket, and each notification is one datagram of newline-separated `KEY=VALUE` lines.
///
/// ```
/// when                                          datagram
/// a long start makes progress (≤ 1 per 5 s)      EXTEND_TIMEOUT_USEC=60000000
/// every listener is bound (ServeDaemon)          READY=1 \n STATUS=serving SOURCE on ADDRS \n MAINPID=pid
/// every WATCHDOG_USEC/2 while the probe passes   WATCHDOG=1
/// the volume is fenced                           STATUS=fenced: WHY; ...
/// a liveness probe is overdue / answers again    STATUS=unresponsive: ... / STATUS=serving ...
/// graceful shutdown begins (SIGTERM/SIGINT)      STOPPING=1 \n STATUS=stopping: ...
/// a start is refused (before READY=1)            STATUS=refused: WHY
/// `run` throws after READY=1                     STATUS=failed: WHY
/// ```
///
/// Sending never blocks and never fails the server: a service manager that is gone, restarting
/// or not reading costs a lost notification, nothing more.
final class SystemdNotifier: Sendable {
    let address: NotifySocketAddress
    /// `WATCHDOG_USEC` when the watchdog is this process's to keep (`WATCHDOG_PID` unset or
    /// ours): systemd acts when no `WATCHDOG=1` comes for this long.
    let watchdogMicroseconds: UInt64?
    private let readySent = NIOLockedValueBox(false)

    init(address: NotifySocketAddress, watchdogMicroseconds: UInt64?) {
        self.address = address
        self.watchdogMicroseconds = watchdogMicroseconds
    }

    /// Read `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`, and remove all three from the
    /// environment (sd_notify's and sd_watchdog_enabled's `unset_environment`), so a child
    /// process neither talks to systemd as this service nor inherits a watchdog it cannot keep.
    /// nil when `NOTIFY_SOCKET` is unset (not run by systemd with `Type=notify`) or unusable
    /// (said on stderr, which systemd journals). Call it before the threads start: `unsetenv`
    /// must not race a `getenv` on another thread.
    static func takeFromEnvironment() -> SystemdNotifier? {
        func take(_ name: String) -> String? {
            let value = getenv(name).map { String(cString: $0) }
            unsetenv(name)
            return value
        }
        let socket = take("NOTIFY_SOCKET")
        let usec = take("WATCHDOG_USEC")
        let pid = take("WATCHDOG_PID")
        guard let socket else { return nil }
        do {
            let address = try NotifySocketAddress(parsing: socket)
            return SystemdNotifier(address: address,
                                   watchdogMicroseconds: watchdogInterval(usec: usec, pid: pid, ownPID: getpid()))
        } catch {
            FileHandle.standardError.write(Data("rewind: warning: \(error); not notifying the service manager\n".utf8))
            return nil
        }
    }

    /// sd_watchdog_enabled(3): the interval when `WATCHDOG_USEC` is a positive number and
    /// `WATCHDOG_PID` is unset or this process's; otherwise the watchdog is not ours (nil).
    static func watchdogInterval(usec: String?, pid: String?, ownPID: pid_t) -> UInt64? {
        guard let usec, let interval = UInt64(usec), interval > 0 else { return nil }
        if let pid {
            guard let watched = pid_t(pid), watched == ownPID else { return nil }
        }
        return interval
    }

    /// Whether `READY=1` went out: after it a failure is `failed:`, before it `refused:`.
    var isReady: Bool { readySent.withLockedValue { $0 } }

    /// Send `states` as one datagram (sd_notify). A failure to send is ignored (see the type).
    func notify(_ states: [SystemdState]) {
        if states.contains(.ready) { readySent.withLockedValue { $0 = true } }
        address.send(SystemdState.datagram(states))
    }
}

/// One assignment of a notification (sd_notify(3) lists them all).
enum SystemdState: Sendable, Equatable {
    /// `READY=1`: start-up is finished; a `Type=notify` unit becomes active only now.
    case ready
    /// `STOPPING=1`: shutting down; systemd stops expecting watchdog pings.
    case stopping
    /// `WATCHDOG=1`: alive; systemd acts (`WatchdogSignal=`) if none comes for `WatchdogSec=`.
    case watchdog
    /// `STATUS=text`: shown by `systemctl status`.
    case status(String)
    /// `MAINPID=n`: the service's main process.
    case mainPID(pid_t)
    /// `EXTEND_TIMEOUT_USEC=n`: the current start (or stop) timeout ends no sooner than n µs
    /// from now.
    case extendTimeout(microseconds: UInt64)

    /// Longest `STATUS=` value, in UTF-8 bytes: systemd reads a notification into a buffer of
    /// `PIPE_BUF` (4096) bytes and drops a longer one whole, READY=1 with it.
    static let statusBytesMax = 2048

    var line: String {
        switch self {
        case .ready: "READY=1"
        case .stopping: "STOPPING=1"
        case .watchdog: "WATCHDOG=1"
        case .status(let text): "STATUS=" + Self.oneLine(text, bytesMax: Self.statusBytesMax)
        case .mainPID(let pid): "MAINPID=\(pid)"
        case .extendTimeout(let microseconds): "EXTEND_TIMEOUT_USEC=\(microseconds)"
        }
    }

    /// The datagram: one assignment per line.
    static func datagram(_ states: [SystemdState]) -> [UInt8] {
        Array(states.map(\.line).joined(separator: "\n").utf8)
    }

    /// `text` as one value: a newline would end the assignment and start another (a path in
    /// an error message could otherwise say `READY=1`), and NUL ends the datagram for some
    /// readers; both become spaces. Cut at a character boundary within `bytesMax` UTF-8 bytes.
    static func oneLine(_ text: String, bytesMax: Int) -> String {
        var out = ""
        var bytes = 0
        for c in text {
            let piece = c.isNewline || c == "\0" ? " " : String(c)
            bytes += piece.utf8.count
            if bytes > bytesMax { break }
            out += piece
        }
        return out
    }
}

/// Where `NOTIFY_SOCKET` points: a file system path (`/run/systemd/notify`), or with a
/// leading `@` a name in Linux's abstract socket namespace, which `sun_path` spells with a
/// leading NUL byte instead of the `@` (as sd_notify does).
struct NotifySocketAddress: Sendable, Equatable {
    /// The bytes of `sun_path` naming the socket: the path (its terminating NUL is not here;
    /// the zeroed `sockaddr_un` supplies it), or NUL followed by the abstract name.
    let sunPath: [UInt8]
    var isAbstract: Bool { sunPath.first == 0 }

    /// `sun_path` is 108 bytes on Linux. A path needs one of them for its terminating NUL; an
    /// abstract address uses them all (its length is given, not terminated).
    static let sunPathBytes = MemoryLayout.size(ofValue: sockaddr_un().sun_path)

    init(parsing value: String) throws {
        var bytes = Array(value.utf8)
        if bytes.first == UInt8(ascii: "@") {
            guard bytes.count > 1 else { throw NotifySocketError.unsupported(value) }
            bytes[0] = 0
            guard bytes.count <= Self.sunPathBytes else { throw NotifySocketError.tooLong(value, bytes: bytes.count) }
        } else {
            // systemd also knows `vsock:CID:PORT` (a VM's manager on the host); not supported here.
            guard bytes.first == UInt8(ascii: "/") else { throw NotifySocketError.unsupported(value) }
            guard bytes.count < Self.sunPathBytes else { throw NotifySocketError.tooLong(value, bytes: bytes.count) }
        }
        sunPath = bytes
    }

    /// Send one datagram on a fresh socket, as sd_notify does, so a service manager that
    /// restarted (and bound its socket again) is still reached. `MSG_DONTWAIT`: a full queue
    /// at a stuck manager drops the notification instead of holding up the server;
    /// `MSG_NOSIGNAL`: no SIGPIPE. Whether the kernel took the whole datagram.
    @discardableResult
    func send(_ datagram: [UInt8]) -> Bool {
        guard !datagram.isEmpty else { return true }
        let fd = Glibc.socket(AF_UNIX, Int32(SOCK_DGRAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        guard fd >= 0 else { return false }
        defer { Glibc.close(fd) }
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let name = sunPath.prefix(Self.sunPathBytes)  // checked when parsed
        withUnsafeMutableBytes(of: &addr.sun_path) { $0.copyBytes(from: name) }
        let pathOffset = MemoryLayout<sockaddr_un>.offset(of: \sockaddr_un.sun_path) ?? MemoryLayout<sa_family_t>.size
        // A path's length counts its terminating NUL; every byte of an abstract name is the name.
        let length = socklen_t(pathOffset + name.count + (isAbstract ? 0 : 1))
        let flags = Int32(MSG_NOSIGNAL) | Int32(MSG_DONTWAIT)
        var sent: Int
        repeat {
            sent = datagram.withUnsafeBytes { buffer in
                withUnsafePointer(to: &addr) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                        Glibc.sendto(fd, buffer.baseAddress, buffer.count, flags, $0, length)
                    }
                }
            }
        } while sent < 0 && errno == EINTR
        return sent == datagram.count
    }
}

/// Why `NOTIFY_SOCKET` cannot be used.
enum NotifySocketError: Error, CustomStringConvertible, Equatable {
    /// Neither an absolute path nor `@name`.
    case unsupported(String)
    /// Longer than `sun_path` holds.
    case tooLong(String, bytes: Int)

    var description: String {
        switch self {
        case let .unsupported(value):
            "NOTIFY_SOCKET=\(value) is neither an absolute path nor an abstract socket (@name)"
        case let .tooLong(value, bytes):
            "NOTIFY_SOCKET=\(value) is \(bytes) bytes, more than a Unix socket address holds"
        }
    }
}

/// Keeps systemd told while serving: `WATCHDOG=1` every `WATCHDOG_USEC`/2 while the server
/// proves alive (`LivenessProbe`), a `STATUS=` line when the volume is fenced or the probe is
/// overdue, and `STOPPING=1` as soon as graceful shutdown begins.
///
/// It is the last service in the group, so the group tells it of a shutdown first (services
/// are shut down in reverse order): `STOPPING=1` goes out before the drain, and systemd, which
/// stops watching once a unit is stopping, does not count the drain against the watchdog.
///
/// A fenced volume gets no more pings: its writes fail until someone frees space or replaces
/// the disk and restarts it. systemd's watchdog then stops the server (the unit's
/// `WatchdogSignal=SIGTERM`: a clean drain), which exits 3 and is not restarted
/// (`RestartPreventExitStatus=3`) — `contrib/systemd/rewind-serve@.service`.
struct SystemdNotifyService: Service {
    let notifier: SystemdNotifier
    let probe: LivenessProbe
    /// The `STATUS=` of a healthy server (what `READY=1` said), restored after an overdue probe answers.
    let servingStatus: String
    let logger: Logger

    /// How often the probe runs when there is no watchdog, or a slower one: a fence reaches
    /// `systemctl status` within this.
    static let checkIntervalNanoseconds: UInt64 = 1_000_000_000
    /// The shortest tick, whatever `WATCHDOG_USEC` says: a tiny value must not spin a thread.
    static let tickNanosecondsMin: UInt64 = 10_000_000

    func run() async throws {
        // systemd's advice (sd_watchdog_enabled(3)): ping at half the timeout.
        let pingNanoseconds = notifier.watchdogMicroseconds.map { $0.multipliedReportingOverflow(by: 500).overflow ? UInt64.max : $0 * 500 }
        let tick = max(Self.tickNanosecondsMin, min(pingNanoseconds ?? Self.checkIntervalNanoseconds, Self.checkIntervalNanoseconds))
        if let pingNanoseconds {
            logger.debug("systemd watchdog: a ping every \(pingNanoseconds / 1_000_000) ms while the liveness probe passes")
        }
        var round = probe.start()
        var nextPingAt: UInt64 = 0  // the first probe that answers pings at once
        var fenceReported = false
        var overdueReported = false
        while !Task.isShuttingDownGracefully && !Task.isCancelled {
            try? await cancelWhenGracefulShutdown { try await Task.sleep(nanoseconds: tick) }
            if Task.isShuttingDownGracefully || Task.isCancelled { break }
            let now = monotonicNanoseconds()
            guard let outcome = round.outcome else {
                // Not back yet: an event loop, the thread pool or the writer's lock is held up.
                // No ping, and no second probe queued behind the first.
                let waited = now &- round.startedAt
                if !overdueReported && waited >= (pingNanoseconds ?? Self.checkIntervalNanoseconds) {
                    overdueReported = true
                    let text = "unresponsive: the liveness probe has not answered for \(waited / 1_000_000) ms"
                    logger.warning("\(text); not pinging systemd's watchdog")
                    notifier.notify([.status(text)])
                }
                continue
            }
            switch outcome {
            case .alive:
                if overdueReported {
                    overdueReported = false
                    logger.notice("the liveness probe answers again")
                    notifier.notify([.status(servingStatus)])
                }
                // Due when less than half a tick is left: sleeps end a little late, never early.
                if let pingNanoseconds, now &+ tick / 2 >= nextPingAt {
                    notifier.notify([.watchdog])
                    let (next, overflow) = now.addingReportingOverflow(pingNanoseconds)
                    nextPingAt = overflow ? UInt64.max : next
                }
            case .fenced(let why):
                // The writer logged the fence (critical); systemctl status shows it from here on.
                if !fenceReported {
                    fenceReported = true
                    notifier.notify([.status("fenced: \(why); writes fail with EIO until the cause is fixed and the server restarted")])
                }
            case .failed:
                break  // the thread pool stopped: shutting down
            }
            round = probe.start()
        }
        notifier.notify([.stopping, .status("stopping: draining connections, syncing source and journal")])
    }
}

/// The watchdog's evidence that the server works, not just that a timer fires. A round
/// answers once
/// - every event loop has run a no-op task: connections are being read and answered;
/// - a thread of the pool where reads that miss the page cache run has read the writer's
///   fence reason, under the lock every write request takes: that lock is not held up, and
///   the volume is not fenced.
///
/// A round is started without waiting for it and looked at on the next tick, so a wedged part
/// stops the pings instead of blocking the service that sends them. Not covered: the writer
/// thread blocked inside a journal append or `fdatasync` (it holds no lock then); the FLUSH
/// requests waiting behind it show it to clients, and the writer keeps no progress counter
/// this could read.
struct LivenessProbe: Sendable {
    let group: any EventLoopGroup
    let pool: NIOThreadPool
    let writer: ServePipeline

    func start() -> ProbeRound {
        let round = ProbeRound(startedAt: monotonicNanoseconds())
        let loops = Array(group.makeIterator())
        guard let home = loops.first else {
            round.finish(.failed)
            return round
        }
        let writer = self.writer
        let loopsAnswered = EventLoopFuture.andAllSucceed(loops.map { $0.submit {} }, on: home)
        let fence = pool.runIfActive(eventLoop: home) { writer.fenceReason }
        loopsAnswered.and(fence).whenComplete { result in
            switch result {
            case .success((_, .none)): round.finish(.alive)
            case .success((_, .some(let why))): round.finish(.fenced(why))
            case .failure: round.finish(.failed)
            }
        }
        return round
    }
}

/// One probe: nil until every part has answered.
final class ProbeRound: Sendable {
    enum Outcome: Sendable, Equatable {
        case alive
        /// The volume is fenced: the writer's reason.
        case fenced(String)
        /// The thread pool refused the task (it is shutting down).
        case failed
    }

    /// When the round started (monotonic ns).
    let startedAt: UInt64
    private let result = NIOLockedValueBox<Outcome?>(nil)

    init(startedAt: UInt64) { self.startedAt = startedAt }

    var outcome: Outcome? { result.withLockedValue { $0 } }

    func finish(_ outcome: Outcome) { result.withLockedValue { $0 = outcome } }
}

/// Progress of a start, passed on, that also moves systemd's start timeout forward
/// (`EXTEND_TIMEOUT_USEC`) while the work advances: creating a mirror copies the whole source,
/// and replaying an unclean stop rewrites blocks, either longer than `TimeoutStartSec=` on a
/// large volume. A start that stops making progress still times out.
final class SystemdStartProgress: ProgressObserver {
    private let inner: ProgressObserver?
    private let notifier: SystemdNotifier
    private var lastExtendedAt: UInt64?

    /// Each notice moves the timeout to at least this far from now: twelve notices' worth.
    static let extendMicroseconds: UInt64 = 60_000_000
    /// At most one notice per this interval.
    static let extendIntervalNanoseconds: UInt64 = 5_000_000_000

    init(notifier: SystemdNotifier, passingTo inner: ProgressObserver?) {
        self.notifier = notifier
        self.inner = inner
    }

    func begin(phase: String, total: UInt64) {
        inner?.begin(phase: phase, total: total)
        extend()
    }

    func update(done: UInt64) {
        inner?.update(done: done)
        extend()
    }

    func end() { inner?.end() }

    private func extend() {
        let now = monotonicNanoseconds()
        if let last = lastExtendedAt, now &- last < Self.extendIntervalNanoseconds { return }
        guard !notifier.isReady else { return }  // only the start's timeout
        lastExtendedAt = now
        notifier.notify([.extendTimeout(microseconds: Self.extendMicroseconds)])
    }
}
