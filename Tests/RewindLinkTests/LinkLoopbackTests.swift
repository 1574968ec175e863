import Foundation
import Logging
import NIOCore
import NIOPosix
import RewindCore
import Testing
@testable import RewindLink

/// The link end to end in one process, over TLS on loopback: a sender streams a mirror to a
/// receiver that seeds its replica, resumes after a restart of either end, and refuses units
/// it was not told about before anything is written.
@Suite(.serialized) struct LinkLoopbackTests {
    final class Dir {
        let path: String
        init() {
            var template = Array("/tmp/rewind-link-XXXXXX".utf8CString)
            path = String(cString: template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!)! })
        }
        deinit { try? FileManager.default.removeItem(atPath: path) }
        func file(_ name: String) -> String { path + "/" + name }
    }

    static let logger = Logger(label: "test")

    func waitUntil(_ seconds: Double = 20, _ condition: () throws -> Bool) rethrows -> Bool {
        let deadline = Date(timeIntervalSinceNow: seconds)
        while Date() < deadline {
            if try condition() { return true }
            usleep(20_000)
        }
        return try condition()
    }

    func image(_ m: Mirror, _ path: String) throws -> Data {
        try? FileManager.default.removeItem(atPath: path)
        _ = try m.restore(at: .latest, to: path)
        return FileManager.default.contents(atPath: path) ?? Data()
    }

    @Test func aReceiverIsSeededThenFollowsAndResumes() async throws {
        let dir = Dir()
        let group = MultiThreadedEventLoopGroup.singleton
        let a = try UnitIdentity.loadOrCreate(home: dir.file("ha")), b = try UnitIdentity.loadOrCreate(home: dir.file("hb"))
        let origin = try Mirror.create(at: dir.file("a.rewind"), size: 256 * 4096)
        for i in 0..<20 { try origin.append([.write(UInt64(i) * 4096, [UInt8](repeating: UInt8(i + 1), count: 4096))]) }
        _ = try origin.compact(to: .seq(10))  // the seed carries base data

        var receiver = try LinkReceiver(path: dir.file("b.rewind"), allowed: [a.id], identity: b, group: group,
                                        logger: Self.logger) { _ in }
        let port = try await receiver.start(host: "127.0.0.1", port: 0).port ?? 0
        let peer = LinkPeer(id: b.id, host: "127.0.0.1", port: port)
        let sender = LinkSender(mirror: origin, peer: peer, context: try LinkTLS.clientContext(a), group: group, logger: Self.logger)
        sender.start()
        #expect(try waitUntil { (try receiver.mirror?.meta().lastSeq) == 20 })
        let replica = try #require(receiver.mirror)
        #expect(try replica.meta().horizon == 10)
        #expect(try image(replica, dir.file("b.img")) == image(origin, dir.file("a.img")))
        #expect(sender.status.durableSeq == 20)

        // The receiver restarts: the sender reconnects and resumes after seq:20.
        await receiver.stop()
        for i in 20..<30 { try origin.append([.write(UInt64(i) * 4096, [UInt8](repeating: UInt8(i + 1), count: 4096))]) }
        receiver = try LinkReceiver(path: dir.file("b.rewind"), allowed: [a.id], identity: b, group: group, logger: Self.logger) { _ in }
        _ = try await receiver.start(host: "127.0.0.1", port: port)
        #expect(try waitUntil { (try receiver.mirror?.meta().lastSeq) == 30 })
        #expect(try image(#require(receiver.mirror), dir.file("b.img")) == image(origin, dir.file("a.img")))
        #expect(try waitUntil { try origin.peerRecords().map(\.durableSeq) == [30] })  // rewritten every second
        sender.stop()
        await receiver.stop()
    }

    /// A peer past its bound (`keepBytes`) while stopped: retention folds what it lacked and
    /// the origin keeps the blocks those records changed; when the receiver returns it is
    /// caught up to the horizon as one point, then streams; every point from there reads as
    /// on the origin, and the dirty set is gone.
    @Test func aPeerPastItsBoundIsCaughtUpAsOnePoint() async throws {
        let dir = Dir()
        let group = MultiThreadedEventLoopGroup.singleton
        let a = try UnitIdentity.loadOrCreate(home: dir.file("ha")), b = try UnitIdentity.loadOrCreate(home: dir.file("hb"))
        let origin = try Mirror.create(at: dir.file("a.rewind"), size: 256 * 4096)
        for i in 0..<20 { try origin.append([.write(UInt64(i) * 4096, [UInt8](repeating: UInt8(i + 1), count: 4096))]) }
        var receiver = try LinkReceiver(path: dir.file("b.rewind"), allowed: [a.id], identity: b, group: group,
                                        logger: Self.logger) { _ in }
        let port = try await receiver.start(host: "127.0.0.1", port: 0).port ?? 0
        let peer = LinkPeer(id: b.id, host: "127.0.0.1", port: port)
        let sender = LinkSender(mirror: origin, peer: peer, context: try LinkTLS.clientContext(a), group: group,
                                logger: Self.logger, keepBytes: 8 * 4096)
        sender.start()
        #expect(try waitUntil { (try receiver.mirror?.meta().lastSeq) == 20 })
        #expect(try waitUntil { try origin.peerRecords().map(\.durableSeq) == [20] })
        await receiver.stop()

        // Away: 40 more records (some trims), retention keeps nothing but what the bound holds.
        for i in 20..<60 {
            if i % 7 == 0 {
                try origin.append([.trim(UInt64(i % 32) * 4096, 3 * 4096)])
            } else {
                try origin.append([.write(UInt64(40 + i * 3) * 4096, [UInt8](repeating: UInt8(i), count: 2 * 4096))])
            }
        }
        _ = try origin.compact(keepAgeNanoseconds: nil, keepBytes: 0)
        let horizon = try origin.meta().horizon
        #expect(horizon > 20 && horizon < 60)
        let dirty = try #require(try origin.peerDirty(b.id))
        #expect(dirty.from == 20 && dirty.through == horizon)
        #expect(try origin.status().peers.first?.dirtyBlocks == dirty.blocks.count)

        receiver = try LinkReceiver(path: dir.file("b.rewind"), allowed: [a.id], identity: b, group: group, logger: Self.logger) { _ in }
        _ = try await receiver.start(host: "127.0.0.1", port: port)
        #expect(try waitUntil(40) { (try receiver.mirror?.meta().lastSeq) == 60 })
        let replica = try #require(receiver.mirror)
        for seq in horizon...60 {
            let x = try Snapshot(mirror: origin, point: .seq(seq)), y = try Snapshot(mirror: replica, point: .seq(seq))
            #expect(try x.read(at: 0, count: 256 * 4096) == y.read(at: 0, count: 256 * 4096), "seq:\(seq)")
            x.close(); y.close()
        }
        #expect(throws: RewindError.self) { _ = try replica.resolve(.seq(21)) }
        #expect(try waitUntil { try origin.peerDirty(b.id) == nil })
        #expect(try waitUntil { try origin.peerRecords().map(\.durableSeq) == [60] })
        _ = try replica.verify()
        sender.stop()
        await receiver.stop()
    }

    /// A peer behind the horizon whose dirty set was lost is resynced by checksum tree: only
    /// the blocks whose bytes differ are sent (1 % of the volume changed at random, some of it
    /// rewritten with the bytes it had), as one catch-up; bytes sent ≤ 1.02 × the differing
    /// bytes, beside the checksums of the differing subtrees the peer sends back.
    @Test func aPeerThatLostItsDirtySetIsResyncedByChecksums() async throws {
        let dir = Dir()
        let group = MultiThreadedEventLoopGroup.singleton
        let a = try UnitIdentity.loadOrCreate(home: dir.file("ha")), b = try UnitIdentity.loadOrCreate(home: dir.file("hb"))
        let blocks = 8192
        var rng = SystemRandomNumberGenerator()
        func randomBytes(_ n: Int) -> [UInt8] {
            var out = [UInt8](repeating: 0, count: n)
            out.withUnsafeMutableBytes { raw in
                for i in stride(from: 0, to: n, by: 8) { raw.storeBytes(of: rng.next(), toByteOffset: i, as: UInt64.self) }
            }
            return out
        }
        let origin = try Mirror.create(at: dir.file("a.rewind"), size: UInt64(blocks) * 4096)
        for i in stride(from: 0, to: blocks, by: 256) { try origin.append([.write(UInt64(i) * 4096, randomBytes(256 * 4096))]) }
        var receiver = try LinkReceiver(path: dir.file("b.rewind"), allowed: [a.id], identity: b, group: group,
                                        logger: Self.logger) { _ in }
        let port = try await receiver.start(host: "127.0.0.1", port: 0).port ?? 0
        let peer = LinkPeer(id: b.id, host: "127.0.0.1", port: port)
        let sender = LinkSender(mirror: origin, peer: peer, context: try LinkTLS.clientContext(a), group: group,
                                logger: Self.logger, keepBytes: 0)
        sender.start()
        let d = try origin.meta().lastSeq
        #expect(try waitUntil { (try receiver.mirror?.meta().lastSeq) == d })
        #expect(try waitUntil { try origin.peerRecords().map(\.durableSeq) == [d] })
        await receiver.stop()
        let before = try image(origin, dir.file("before.img"))

        // 1 % of the blocks changed at random, some with the bytes they had; all folded.
        var changed = Set<Int>()
        while changed.count < blocks / 100 { changed.insert(Int.random(in: 0..<blocks, using: &rng)) }
        for block in changed.sorted() {
            let data = block % 9 == 0 ? [UInt8](before[block * 4096..<(block + 1) * 4096]) : randomBytes(4096)
            try origin.append([.write(UInt64(block) * 4096, data)])
        }
        _ = try origin.compact(keepAgeNanoseconds: nil, keepBytes: 0)
        #expect(try origin.meta().horizon == origin.meta().lastSeq)
        #expect(try origin.peerDirty(b.id) != nil)
        unlink(dir.file("a.rewind/peers/\(b.id).dirty"))  // the dirty set is lost
        let after = try image(origin, dir.file("after.img"))
        let differing = (0..<blocks).filter { before[$0 * 4096..<($0 + 1) * 4096] != after[$0 * 4096..<($0 + 1) * 4096] }

        let sentBefore = sender.status.bytesSent
        receiver = try LinkReceiver(path: dir.file("b.rewind"), allowed: [a.id], identity: b, group: group, logger: Self.logger) { _ in }
        _ = try await receiver.start(host: "127.0.0.1", port: port)
        let last = try origin.meta().lastSeq
        #expect(try waitUntil(40) { (try receiver.mirror?.meta().lastSeq) == last })
        let replica = try #require(receiver.mirror)
        #expect(try image(replica, dir.file("b.img")) == after)
        #expect(waitUntil { sender.status.durableSeq == last })
        let sent = sender.status.bytesSent - sentBefore
        let changedBytes = UInt64(differing.count * 4096)
        print("resync of \(differing.count) differing blocks of \(blocks) (\(changedBytes) bytes): \(sent) bytes sent, \(String(format: "%.4f", Double(sent) / Double(changedBytes))) × the differing bytes")
        #expect(Double(sent) <= 1.02 * Double(changedBytes))
        #expect(try replica.resolve(.latest) == last)
        _ = try replica.verify()
        sender.stop()
        await receiver.stop()
    }

    /// Seeding a receiver that holds a stale copy of the volume (yesterday's image): the
    /// trees are compared and only the blocks that differ are sent — data, or ranges of
    /// zeros where the copy had data — and the replica is the origin's horizon exactly.
    @Test func aStaleCopyIsSeededWithOnlyTheDifferences() async throws {
        let dir = Dir()
        let group = MultiThreadedEventLoopGroup.singleton
        let a = try UnitIdentity.loadOrCreate(home: dir.file("ha")), b = try UnitIdentity.loadOrCreate(home: dir.file("hb"))
        let origin = try Mirror.create(at: dir.file("a.rewind"), size: 1024 * 4096)
        for i in 0..<200 { try origin.append([.write(UInt64(i * 5 % 1024) * 4096, [UInt8](repeating: UInt8(i % 250 + 1), count: 2 * 4096))]) }
        _ = try origin.restore(at: .latest, to: dir.file("yesterday.img"))
        // Since yesterday: 20 blocks rewritten, 8 trimmed.
        for i in 0..<20 { try origin.append([.write(UInt64(i * 37 % 1024) * 4096, [UInt8](repeating: 0xEE, count: 4096))]) }
        try origin.append([.trim(100 * 4096, 8 * 4096)])
        _ = try origin.compact(to: .latest)
        let yesterday = try #require(FileManager.default.contents(atPath: dir.file("yesterday.img")))
        let now = try image(origin, dir.file("now.img"))
        let differing = (0..<1024).filter { yesterday[$0 * 4096..<($0 + 1) * 4096] != now[$0 * 4096..<($0 + 1) * 4096] }
        #expect(differing.count > 0 && differing.count <= 28)

        let receiver = try LinkReceiver(path: dir.file("b.rewind"), allowed: [a.id], identity: b, group: group,
                                        logger: Self.logger, staleCopy: dir.file("yesterday.img")) { _ in }
        let port = try await receiver.start(host: "127.0.0.1", port: 0).port ?? 0
        let sender = LinkSender(mirror: origin, peer: LinkPeer(id: b.id, host: "127.0.0.1", port: port),
                                context: try LinkTLS.clientContext(a), group: group, logger: Self.logger)
        sender.start()
        let last = try origin.meta().lastSeq
        #expect(try waitUntil { (try receiver.mirror?.meta().lastSeq) == last })
        let replica = try #require(receiver.mirror)
        #expect(try image(replica, dir.file("b.img")) == now)
        #expect(try replica.meta().horizon == last)
        // Only the differing blocks' data went (and small frames), not the volume's 4 MiB.
        #expect(sender.status.bytesSent <= UInt64(differing.count * 4096) + 16 << 10)
        print("seed from a stale copy: \(differing.count) of 1024 blocks differed; \(sender.status.bytesSent) bytes sent, \(sender.status.checksumBytesReceived) bytes of checksums received")
        _ = try replica.verify()
        sender.stop()
        await receiver.stop()
    }

    /// A cascade A → B → C through a catch-up: B is caught up by A as one point; B forwards
    /// that catch-up to C as a catch-up (C holds the seq it follows), and C reads every point
    /// from there exactly as A does.
    @Test func aCascadeForwardsACatchUp() async throws {
        let dir = Dir()
        let group = MultiThreadedEventLoopGroup.singleton
        let a = try UnitIdentity.loadOrCreate(home: dir.file("ha")), b = try UnitIdentity.loadOrCreate(home: dir.file("hb"))
        let c = try UnitIdentity.loadOrCreate(home: dir.file("hc"))
        let origin = try Mirror.create(at: dir.file("a.rewind"), size: 256 * 4096)
        for i in 0..<10 { try origin.append([.write(UInt64(i) * 4096, [UInt8](repeating: UInt8(i + 1), count: 4096))]) }
        let cReceiver = try LinkReceiver(path: dir.file("c.rewind"), allowed: [b.id], identity: c, group: group, logger: Self.logger) { _ in }
        let cPort = try await cReceiver.start(host: "127.0.0.1", port: 0).port ?? 0
        let forward = LockedBox<LinkSender?>(nil)
        let bContext = try LinkTLS.clientContext(b)
        let cID = c.id
        let makeB = { [dir] () throws -> LinkReceiver in
            try LinkReceiver(path: dir.file("b.rewind"), allowed: [a.id], identity: b, group: group, logger: Self.logger, forwards: true) { m in
                forward.withLock { s in
                    guard s == nil else { return }
                    let sender = LinkSender(mirror: m, peer: LinkPeer(id: cID, host: "127.0.0.1", port: cPort), context: bContext,
                                            group: group, logger: Self.logger)
                    m.indexCommitted = { sender.nudge() }
                    sender.start()
                    s = sender
                }
            }
        }
        var bReceiver = try makeB()
        let bPort = try await bReceiver.start(host: "127.0.0.1", port: 0).port ?? 0
        let sender = LinkSender(mirror: origin, peer: LinkPeer(id: b.id, host: "127.0.0.1", port: bPort),
                                context: try LinkTLS.clientContext(a), group: group, logger: Self.logger, keepBytes: 0)
        sender.start()
        #expect(try waitUntil { (try cReceiver.mirror?.meta().lastSeq) == 10 })
        await bReceiver.stop()
        for i in 10..<40 { try origin.append([.write(UInt64(i * 3 % 256) * 4096, [UInt8](repeating: UInt8(i + 1), count: 4096))]) }
        _ = try origin.compact(keepAgeNanoseconds: nil, keepBytes: 0)
        let horizon = try origin.meta().horizon
        #expect(horizon == 40)
        for i in 40..<45 { try origin.append([.write(UInt64(i) * 4096, [UInt8](repeating: 0x55, count: 4096))]) }
        bReceiver = try makeB()
        _ = try await bReceiver.start(host: "127.0.0.1", port: bPort)
        #expect(try waitUntil(40) { (try cReceiver.mirror?.meta().lastSeq) == 45 })
        let replica = try #require(cReceiver.mirror)
        for seq in horizon...45 {
            let x = try Snapshot(mirror: origin, point: .seq(seq)), y = try Snapshot(mirror: replica, point: .seq(seq))
            #expect(try x.read(at: 0, count: 256 * 4096) == y.read(at: 0, count: 256 * 4096), "seq:\(seq)")
            x.close(); y.close()
        }
        // C's history before the catch-up stays: record k wrote block k - 1 with k.
        for seq in UInt64(0)...10 {
            let snapshot = try Snapshot(mirror: replica, point: .seq(seq))
            let head = try snapshot.read(at: 0, count: 4096 * 10)
            snapshot.close()
            var expected = [UInt8](repeating: 0, count: 4096 * 10)
            for i in 0..<Int(seq) { for j in 0..<4096 { expected[i * 4096 + j] = UInt8(i + 1) } }
            #expect(head == expected, "seq:\(seq)")
        }
        #expect(throws: RewindError.self) { _ = try replica.resolve(.seq(20)) }
        _ = try replica.verify()
        sender.stop()
        forward.withLock { $0?.stop() }
        await bReceiver.stop()
        await cReceiver.stop()
    }

    @Test func aStrangerIsRefusedBeforeAnythingIsWritten() async throws {
        let dir = Dir()
        let group = MultiThreadedEventLoopGroup.singleton
        let a = try UnitIdentity.loadOrCreate(home: dir.file("ha")), b = try UnitIdentity.loadOrCreate(home: dir.file("hb"))
        let stranger = try UnitIdentity.loadOrCreate(home: dir.file("hs"))
        let origin = try Mirror.create(at: dir.file("a.rewind"), size: 64 * 4096)
        try origin.append([.write(0, [UInt8](repeating: 9, count: 4096))])
        let receiver = try LinkReceiver(path: dir.file("b.rewind"), allowed: [a.id], identity: b, group: group, logger: Self.logger) { _ in }
        let port = try await receiver.start(host: "127.0.0.1", port: 0).port ?? 0
        // A stranger's sender: its TLS handshake is refused.
        let bad = LinkSender(mirror: origin, peer: LinkPeer(id: b.id, host: "127.0.0.1", port: port),
                             context: try LinkTLS.clientContext(stranger), group: group, logger: Self.logger)
        bad.start()
        #expect(waitUntil(10) { bad.status.state.hasPrefix("connecting: ") && bad.status.state != "connecting: " })
        #expect(bad.status.state == "connecting: TLS handshake refused by the peer: it does not know this unit's identity (give it this unit's `rewind id`)")
        bad.stop()
        #expect(access(dir.file("b.rewind"), F_OK) != 0)
        // A sender pinning another identity than the receiver's refuses the receiver.
        let wrongPin = LinkSender(mirror: origin, peer: LinkPeer(id: stranger.id, host: "127.0.0.1", port: port),
                                  context: try LinkTLS.clientContext(a), group: group, logger: Self.logger)
        wrongPin.start()
        #expect(waitUntil(10) { wrongPin.status.state == "connecting: TLS handshake refused: the peer presented identity \(b.id), not \(stranger.id)" }, "\(wrongPin.status.state)")
        wrongPin.stop()
        #expect(access(dir.file("b.rewind"), F_OK) != 0)
        await receiver.stop()
    }
}

/// A value shared with a callback on another thread.
final class LockedBox<T>: @unchecked Sendable {
    private let lock = NSLock()
    private var value: T
    init(_ value: T) { self.value = value }
    func withLock<R>(_ body: (inout T) -> R) -> R { lock.lock(); defer { lock.unlock() }; return body(&value) }
}
