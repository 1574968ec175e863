import NIOCore
import RewindCore
import RewindNBD

extension ServePipeline {
    /// Queue one request and answer it on `loop`: a future that fails with the NBD errno the
    /// host is to get. The writer is woken at its group's deadline by `loop`'s timer
    /// (`ServePipeline.submit`). Used by `serve` (ServeVolume) and `tap` (TapVolume).
    func submit(_ kind: VolumeOp.Kind, offset: UInt64, fua: Bool, on loop: EventLoop) -> EventLoopFuture<Void> {
        let promise = loop.makePromise(of: Void.self)
        let op = VolumeOp(kind, offset: offset, fua: fua) { failure in
            guard let failure else { return promise.succeed(()) }
            switch failure {
            case .io: promise.fail(NBDErrno.io)
            case .noSpace: promise.fail(NBDErrno.nospc)
            case .shutdown: promise.fail(NBDErrno.shutdown)
            }
        }
        submit(op) { nanoseconds, fire in
            loop.scheduleTask(in: .nanoseconds(Int64(nanoseconds))) { fire() }
        }
        return promise.futureResult
    }
}
