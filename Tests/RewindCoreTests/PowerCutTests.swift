import Foundation
import Testing
@testable import RewindCore

/// Durability across power cuts (PRODUCT.md: a crash at any instant loses no acknowledged-
/// and-flushed write and corrupts no journal). Unlike a SIGKILL, a power cut loses the page
/// cache: `PowerCutSimulation` (RewindWorkload) runs serve's real pipeline on
/// `PowerCutStorage`, cuts the power at random instants — mid-workload, during compactions
/// and rollbacks, some with base.sums to update in place — keeps a random part of what was not synced (per page, torn at 512
/// bytes), restarts as `serve` does, and holds the result to every answered FLUSH and FUA,
/// the journal's latest point and the source, byte for byte, and base.sums, when it names
/// the horizon, to a rebuild from base.img.
///
/// `REWIND_POWER_CUTS` (default 1,000) cuts; `REWIND_POWER_CUT_SEED` reproduces a run (every
/// run prints its seed). The long run: `rewind-torture power-cuts SEED COUNT` (release).
@Suite(.serialized) struct PowerCutTests {
    static var cuts: Int { Int(ProcessInfo.processInfo.environment["REWIND_POWER_CUTS"] ?? "") ?? 1000 }
    static var seed: UInt64 {
        UInt64(ProcessInfo.processInfo.environment["REWIND_POWER_CUT_SEED"] ?? "") ?? UInt64.random(in: 1...999_999)
    }

    @Test func powerCutsLoseNothingFlushed() throws {
        let seed = Self.seed, cuts = Self.cuts
        print("power-cut simulation: seed \(seed), \(cuts) cuts (REWIND_POWER_CUT_SEED=\(seed) REWIND_POWER_CUTS=\(cuts) reproduces)")
        let root = PowerCutSimulation.makeDirectory()
        defer { removeTree(root) }
        do {
            let totals = try PowerCutSimulation(seed: seed, root: root).run(cuts: cuts)
            print("power-cut simulation: seed \(seed): \(totals)")
            #expect(totals.cuts == cuts)
            // The cuts land where they matter: some requests are answered durable before a cut
            // and some answered writes are lost with it.
            #expect(totals.durable > 0 && totals.lost > 0 && totals.torn > 0, "\(totals)")
            // base.sums, updated in place by the compactions, is checked after many reboots.
            #expect(totals.sumsChecked > cuts / 10, "\(totals)")
        } catch let v as PowerCutSimulation.Violation {
            Issue.record("\(v)")
        }
    }
}
