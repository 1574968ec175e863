import NIOConcurrencyHelpers

/// Payload bytes in flight across every connection of one server (writes being journalled,
/// reads being read). Each connection also has its own bound; this one makes the total
/// independent of how many clients connect: once `limit` is reached, every connection stops
/// reading its socket until replies bring the total back under.
public final class InflightBudget: Sendable {
    public let limit: Int
    private let state = NIOLockedValueBox(State())
    private struct State {
        var used = 0
        var waiters: [@Sendable () -> Void] = []
    }

    public init(limit: Int) { self.limit = limit }

    public var exhausted: Bool { state.withLockedValue { $0.used >= limit } }
    public var used: Int { state.withLockedValue { $0.used } }

    func take(_ bytes: Int) { state.withLockedValue { $0.used += bytes } }

    /// Return `bytes`; once under the limit, wake every connection that waited.
    func give(_ bytes: Int) {
        let wake: [@Sendable () -> Void] = state.withLockedValue { s in
            s.used -= bytes
            guard s.used < limit, !s.waiters.isEmpty else { return [] }
            defer { s.waiters.removeAll() }
            return s.waiters
        }
        for w in wake { w() }
    }

    /// Call `wake` once the budget is under its limit (at once if it already is).
    func whenAvailable(_ wake: @escaping @Sendable () -> Void) {
        let now: Bool = state.withLockedValue { s in
            if s.used < limit { return true }
            s.waiters.append(wake)
            return false
        }
        if now { wake() }
    }
}
