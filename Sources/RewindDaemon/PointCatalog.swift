import Logging
import NIOPosix
import RewindCore
import RewindNBD

/// The exports of `serve` and `export`: the primary export (the live volume, or the exported
/// point) under its name and "", and any point in time as `NAME@POINT` (CLI.md), read-only.
/// Each `NAME@POINT` connection pins its point for as long as it stays connected.
/// NBD_OPT_LIST lists the primary export and a `NAME@bookmark:B` for every bookmark.
final class PointCatalog: NBDExportCatalog, @unchecked Sendable {
    let primary: NBDExport
    let mirror: Mirror
    private let pool: NIOThreadPool
    private let logger: Logger
    /// Brings the index up to the server's durable point before a point is resolved.
    private let catchUp: @Sendable () -> Void

    init(primary: NBDExport, mirror: Mirror, pool: NIOThreadPool, logger: Logger, catchUp: @escaping @Sendable () -> Void) {
        self.primary = primary
        self.mirror = mirror
        self.pool = pool
        self.logger = logger
        self.catchUp = catchUp
    }

    func lookup(_ name: String) -> NBDExportLookup {
        if primary.answers(to: name) { return .found(primary) }
        let pointText: Substring
        if name.hasPrefix(primary.name + "@") {
            pointText = name.dropFirst(primary.name.count + 1)
        } else if name.hasPrefix("@") {
            pointText = name.dropFirst()
        } else {
            return .unknown("no export named \"\(Self.shown(name))\" (this server offers \"\(primary.name)\" and \"\(primary.name)@POINT\")")
        }
        do {
            let point = try Point(parsing: String(pointText))
            if needsCatchUp(point) { catchUp() }
            let reader = try PointReader(mirror: mirror, point: point, holder: "nbd export \(name)")
            logger.info("export \"\(name)\": seq:\(reader.seq), read-only")
            let description = "\(primary.name) as of seq:\(reader.seq) (read-only)"
            return .found(NBDExport(name: name, description: description,
                                    target: PointVolume(reader: reader, overlay: nil, pool: pool, logger: logger)))
        } catch {
            return .unknown("\(Self.shown(name)): \(error)")
        }
    }

    /// A requested name as a message quotes it: its first 100 characters, so the reason after
    /// it survives the reply's 1 KiB cut (`NBD.optionErrorMessageBytesMax`).
    static func shown(_ name: String) -> Substring {
        name.count > 100 ? name.prefix(100) + "…" : Substring(name)
    }

    /// Whether `point` may name records the index does not hold yet: the handshake then waits
    /// for the server's durable point (on the event loop: asked only when it matters). A
    /// bookmark was named from the index, and a seq it holds resolves the same either way.
    private func needsCatchUp(_ point: Point) -> Bool {
        switch point {
        case .bookmark, .oldest: return false
        case let .seq(n): return n > ((try? mirror.meta().lastSeq) ?? 0)
        case .latest, .time, .consistent: return true
        }
    }

    func list() -> [(name: String, description: String)] {
        var out = [(primary.name, primary.description)]
        if let marks = try? mirror.bookmarks() {
            for b in marks {
                out.append(("\(primary.name)@bookmark:\(b.name)", "\(primary.name) as of seq:\(b.seq), \(formatRFC3339(b.time)) (read-only)"))
            }
        }
        return out
    }
}
