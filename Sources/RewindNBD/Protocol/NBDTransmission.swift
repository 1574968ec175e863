import NIOCore

/// The transmission phase of one connection, as a state machine: requests come in (decoded by
/// `NBDServerFramer`), are validated once, and go out as actions while the connection has room
/// — at most `maxInflight` requests and `maxInflightBytes` of payload in flight, and the
/// server-wide budget not exhausted; the rest wait, in order. A completion frees room. After
/// NBD_CMD_DISC nothing more is dispatched, and the connection closes once nothing is in
/// flight. No I/O: `NBDConnectionHandler` performs the actions and pauses the socket's reads
/// while `isSaturated`.
struct NBDTransmission {
    enum Action {
        /// Serve this request (validated); `payloadBytes` of it count against the limits until
        /// `completed(payloadBytes:)`.
        case dispatch(NBDRequestHeader, NBDValidatedCommand, payload: [UInt8]?, payloadBytes: Int)
        /// Answer this request with an error now (it failed validation).
        case refuse(NBDRequestHeader, NBDErrno)
        /// Close the connection (NBD_CMD_DISC, nothing in flight).
        case close
    }

    let maxInflight: Int
    let maxInflightBytes: Int
    private let context: NBDValidationContext
    private var waiting = CircularBuffer<(NBDRequestHeader, [UInt8]?)>()
    private(set) var inflight = 0
    private(set) var inflightBytes = 0
    private(set) var disconnecting = false
    private var closed = false

    init(context: NBDValidationContext, maxInflight: Int, maxInflightBytes: Int) {
        self.context = context
        self.maxInflight = maxInflight
        self.maxInflightBytes = maxInflightBytes
    }

    /// Whether no more requests may be dispatched now (`budgetExhausted`: the server-wide one).
    func isSaturated(budgetExhausted: Bool) -> Bool {
        inflight >= maxInflight || inflightBytes >= maxInflightBytes || budgetExhausted
    }

    /// A request has arrived.
    mutating func received(_ header: NBDRequestHeader, payload: [UInt8]?) {
        guard !closed, !disconnecting else { return }  // nothing after DISC is served
        waiting.append((header, payload))
    }

    /// The next thing to do while there is room; nil when there is none or nothing waits.
    mutating func next(budgetExhausted: Bool) -> Action? {
        while !closed, !disconnecting, !isSaturated(budgetExhausted: budgetExhausted), let (header, payload) = waiting.popFirst() {
            switch validate(header, context) {
            case .failure(let error):
                return .refuse(header, error)
            case .success(.disconnect):
                disconnecting = true
                waiting.removeAll()
                if inflight == 0 { closed = true; return .close }
                return nil
            case .success(let command):
                // Only reads and writes hold their payload in memory; a trim's length costs nothing.
                let kind = NBDCommand(rawValue: header.type)
                let bytes = kind == .read || kind == .write ? Int(min(UInt64(header.length), UInt64(NBD.maxPayloadBytes))) : 0
                inflight += 1
                inflightBytes += bytes
                return .dispatch(header, command, payload: payload, payloadBytes: bytes)
            }
        }
        return nil
    }

    /// A dispatched request was answered.
    mutating func completed(payloadBytes: Int) -> Action? {
        inflight -= 1
        inflightBytes -= payloadBytes
        if disconnecting && inflight == 0 && !closed { closed = true; return .close }
        return nil
    }

    /// The connection is closing: nothing waiting is served.
    mutating func close() {
        closed = true
        waiting.removeAll()
    }
}
