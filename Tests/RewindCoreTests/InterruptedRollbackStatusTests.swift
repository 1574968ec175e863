import Foundation
import Testing
@testable import RewindCore

/// A rollback interrupted after it deleted the records past its target, where the target is
/// the oldest point: `status` (its log check) must look only up to the target — it threw
/// "record seq:K+1 is corrupt: missing from the journal" (found by the power-cut simulation)
/// — and the rollback, run again, finishes.
@Suite struct InterruptedRollbackStatusTests {
    @Test func statusOfARollbackCutAtTheOldestPoint() throws {
        let dir = TempDir("rb-status")
        defer { dir.remove() }
        let m = try Mirror.create(at: dir.file("m"), size: 64 * 4096, blockSize: 4096)
        for i in 0..<20 { try m.append([.write(UInt64(i % 8) * 4096, [UInt8](repeating: UInt8(i + 1), count: 4096))]) }
        _ = try m.compact(to: .seq(10))
        let before = try m.recordRollbackTarget(.seq(10), source: nil)
        try m.sync()
        _ = try m.cutJournal(after: 10, last: before.lastSeq)
        let s = try m.status()
        #expect(s.rollbackPending == 10)
        #expect(s.logDamage.isEmpty, "\(s.logDamage)")
        _ = try m.rollback(to: .seq(10), source: nil)
        #expect(try m.meta().lastSeq == 10)
        _ = try m.verify()
    }
}
