import Foundation
import Glibc

/// Why a server fenced its volume, kept beside the journal (`MIRROR/fenced`) so that `rewind
/// status` — another process — can say which file failed and with which errno while the
/// server still runs or after it stopped, until the next start has brought the source up to
/// the journal again. One line of text: the time (RFC 3339) and the reason.
///
/// Written with plain calls, not through the storage seam (`Storage`): it is a report, not
/// part of the journal, and the disk that failed may refuse it too — then the log line and
/// the metric are what is left.
extension Mirror {
    var fencePath: String { path + "/fenced" }

    /// Record `why` (best effort: a failure to write it is ignored).
    func recordFence(_ why: String) {
        let line = Array("\(formatRFC3339(wallClockNanoseconds())) \(why.replacingNewlines())\n".utf8)
        let fd = Glibc.open(fencePath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return }
        let written = line.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        let synced = fsync(fd) == 0
        Glibc.close(fd)
        guard written == line.count && synced else {
            unlink(fencePath)  // an empty or partial record would say nothing (a full disk)
            return
        }
        syncDirectory(containing: fencePath)
    }

    /// What the last fence recorded ("TIME REASON"), if a server fenced this mirror and no
    /// start has recovered from it since.
    public func fenceRecord() -> String? {
        guard let text = try? String(contentsOfFile: fencePath, encoding: .utf8) else { return nil }
        let line = text.trimmingCharacters(in: .whitespacesAndNewlines)
        return line.isEmpty ? nil : line
    }

    /// Forget the fence: a start has brought the source up to the journal.
    public func clearFenceRecord() {
        if unlink(fencePath) == 0 { syncDirectory(containing: fencePath) }
    }
}

private extension String {
    func replacingNewlines() -> String { split(whereSeparator: \.isNewline).joined(separator: " ") }
}
