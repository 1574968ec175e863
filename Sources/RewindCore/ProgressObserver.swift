/// Receives progress of long work (copy, restore, verify, compaction). The CLI prints it
/// on stderr once the work has run for more than a second; the library never prints.
public protocol ProgressObserver: AnyObject {
    func begin(phase: String, total: UInt64)
    func update(done: UInt64)
    func end()
}
