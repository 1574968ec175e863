import Glibc

/// The serve pipeline's one mutex, with a condition for each thread that waits under it, so
/// a hand-off wakes the thread it is for and no other. With one shared condition every
/// broadcast woke the writer, the applier and both syncers, and each woken thread took the
/// mutex only to find nothing to do: at queue depth 1 that was three context switches per
/// group commit on a two-CPU machine whose other CPU serves the requests.
/// Timed waits use CLOCK_MONOTONIC deadlines (`monotonicNanoseconds()`).
final class PipelineLock: @unchecked Sendable {
    enum Waiter: Int, CaseIterable {
        case writer, applier, logSyncer, sourceSyncer
        /// `ServePipeline.stop()`, waiting for the threads to finish.
        case stopper
    }

    private let mutex: UnsafeMutablePointer<pthread_mutex_t>
    private let conditions: UnsafeMutablePointer<pthread_cond_t>

    init() {
        mutex = .allocate(capacity: 1)
        pthread_mutex_init(mutex, nil)
        conditions = .allocate(capacity: Waiter.allCases.count)
        var attributes = pthread_condattr_t()
        pthread_condattr_init(&attributes)
        pthread_condattr_setclock(&attributes, CLOCK_MONOTONIC)
        for i in 0..<Waiter.allCases.count { pthread_cond_init(conditions + i, &attributes) }
        pthread_condattr_destroy(&attributes)
    }

    deinit {
        for i in 0..<Waiter.allCases.count { pthread_cond_destroy(conditions + i) }
        conditions.deallocate()
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    @inline(__always) func lock() { pthread_mutex_lock(mutex) }
    @inline(__always) func unlock() { pthread_mutex_unlock(mutex) }

    /// Under the lock: wait until woken (or spuriously).
    func wait(_ waiter: Waiter) {
        pthread_cond_wait(conditions + waiter.rawValue, mutex)
    }

    /// Under the lock: wait until woken or `deadline` (monotonic ns) passes; false once it has.
    @discardableResult
    func wait(_ waiter: Waiter, until deadline: UInt64) -> Bool {
        var ts = timespec(tv_sec: Int(deadline / 1_000_000_000), tv_nsec: Int(deadline % 1_000_000_000))
        return pthread_cond_timedwait(conditions + waiter.rawValue, mutex, &ts) != ETIMEDOUT
    }

    /// Wake `waiter` (one thread waits on each condition). Costs no system call when it is
    /// not waiting.
    @inline(__always) func wake(_ waiter: Waiter) {
        pthread_cond_signal(conditions + waiter.rawValue)
    }

    /// Wake every thread: a fence, a stop.
    func wakeAll() {
        for i in 0..<Waiter.allCases.count { pthread_cond_broadcast(conditions + i) }
    }
}
