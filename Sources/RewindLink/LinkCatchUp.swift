import NIOCore
import RewindCore

/// `catchUpBegin`: a consistent catch-up (`CatchUp`) from the receiver's durable seq `from` to
/// the sender's point `seq` (its horizon, pinned meanwhile), with the runs it sets.
public struct LinkCatchUpBegin: Sendable, Equatable {
    public var from: UInt64
    public var seq: UInt64
    public var timestamp: UInt64
    public var runs: [CatchUpRun]

    /// Runs one frame carries, at most (16 bytes each).
    public static let maxRuns = (LinkFrame.maxBodyBytes - 28) / 16

    public init(from: UInt64, seq: UInt64, timestamp: UInt64, runs: [CatchUpRun]) {
        self.from = from
        self.seq = seq
        self.timestamp = timestamp
        self.runs = runs
    }

    public var frame: LinkFrame {
        var b = ByteBuffer()
        b.reserveCapacity(28 + runs.count * 16)
        b.writeInteger(from)
        b.writeInteger(seq)
        b.writeInteger(timestamp)
        b.writeInteger(UInt32(runs.count))
        for r in runs {
            b.writeInteger(r.blocks.lowerBound)
            b.writeInteger(UInt64(r.blocks.count) | (r.zero ? 1 << 63 : 0))
        }
        return LinkFrame(.catchUpBegin, body: b)
    }

    public init(_ frame: LinkFrame) throws {
        guard frame.kind == .catchUpBegin else { throw LinkMessageError.unexpected(frame.kind, expected: .catchUpBegin) }
        var b = frame.body
        guard let from: UInt64 = b.readInteger(), let seq: UInt64 = b.readInteger(), let time: UInt64 = b.readInteger(),
              let count: UInt32 = b.readInteger(), b.readableBytes == Int(count) * 16 else {
            throw LinkMessageError.malformed(.catchUpBegin, bytes: frame.body.readableBytes)
        }
        var runs: [CatchUpRun] = []
        runs.reserveCapacity(Int(count))
        for _ in 0..<count {
            guard let first: UInt64 = b.readInteger(), let raw: UInt64 = b.readInteger() else { break }
            let n = raw & ~(1 << 63)
            guard n > 0, first <= UInt64.max - n else { throw LinkMessageError.malformed(.catchUpBegin, bytes: frame.body.readableBytes) }
            runs.append(CatchUpRun(first..<first + n, zero: raw & (1 << 63) != 0))
        }
        self.init(from: from, seq: seq, timestamp: time, runs: runs)
    }
}

/// `catchUpData` (whole blocks, in run order) and `catchUpEnd` (the record's checksum).
public enum LinkCatchUpData {
    public static func frame(_ bytes: UnsafeRawBufferPointer) -> LinkFrame {
        var b = ByteBuffer()
        b.writeBytes(bytes)
        return LinkFrame(.catchUpData, body: b)
    }

    public static func endFrame(checksum: UInt64) -> LinkFrame {
        var b = ByteBuffer()
        b.writeInteger(checksum)
        return LinkFrame(.catchUpEnd, body: b)
    }

    public static func decodeEnd(_ frame: LinkFrame) throws -> UInt64 {
        guard frame.kind == .catchUpEnd else { throw LinkMessageError.unexpected(frame.kind, expected: .catchUpEnd) }
        var b = frame.body
        guard b.readableBytes == 8, let sum: UInt64 = b.readInteger() else {
            throw LinkMessageError.malformed(.catchUpEnd, bytes: frame.body.readableBytes)
        }
        return sum
    }
}
