import RewindCore

/// What a receiver holds of a volume, as far as admitting a sender goes.
public struct LinkVolume: Sendable, Equatable {
    public var uuid: [UInt8]
    public var size: UInt64
    public var blockSize: UInt32
    public var generation: UInt64
    /// The newest seq the receiver holds durably: the sender resumes after it.
    public var durableSeq: UInt64

    public init(uuid: [UInt8], size: UInt64, blockSize: UInt32, generation: UInt64, durableSeq: UInt64) {
        self.uuid = uuid
        self.size = size
        self.blockSize = blockSize
        self.generation = generation
        self.durableSeq = durableSeq
    }
}

/// A sender of a newer generation (after a promote or a rollback) is accepted when this
/// mirror holds nothing past the seq that generation began at; the receiver then takes on the
/// generation. The receiver's answer to a sender's `hello`, decided before anything is written: `welcome`
/// with its durable seq, or `refuse` with the one line it also logs. `local` nil: no mirror
/// yet: `needSeed`, and the sender seeds one.
public enum LinkAdmission {
    public static func answer(_ hello: LinkHello, local: LinkVolume?) -> LinkFrame {
        guard let local else { return LinkFrame(.needSeed) }
        if let why = refusal(hello, local) { return LinkRefusal(why).frame }
        return LinkSeq(.welcome, seq: local.durableSeq).frame
    }

    static func refusal(_ hello: LinkHello, _ local: LinkVolume) -> String? {
        if hello.volumeUUID != local.uuid {
            return "the sender offers volume \(formatUUID(hello.volumeUUID)), this mirror holds \(formatUUID(local.uuid))"
        }
        if hello.volumeSize != local.size || hello.blockSize != local.blockSize {
            return "the sender's volume is \(hello.volumeSize) bytes in blocks of \(hello.blockSize), this mirror's \(local.size) in blocks of \(local.blockSize)"
        }
        if hello.generation < local.generation {
            return "the sender is at generation \(hello.generation), this mirror at \(local.generation): it is a former origin (a failover happened since); make it a receiver of the new origin"
        }
        if hello.generation == local.generation && hello.lastSeq < local.durableSeq {
            return "the sender's journal ends at seq:\(hello.lastSeq), before this mirror's seq:\(local.durableSeq): they have diverged"
        }
        if hello.generation > local.generation && local.durableSeq > hello.generationStart {
            return "the sender's generation \(hello.generation) continues from seq:\(hello.generationStart), and this mirror holds records after it (to seq:\(local.durableSeq)) from generation \(local.generation): they have diverged; move this mirror aside and let it be seeded again"
        }
        return nil
    }
}
