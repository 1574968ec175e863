/// Parsers for the CLI's common forms (CLI.md): SIZE and DURATION.
public enum Parse {
    /// SIZE: bytes, or with a binary suffix `K M G T` (`512M` = 512 MiB); `KiB`, `MiB`… too.
    public static func size(_ text: String) throws -> UInt64 {
        var digits = Substring(text)
        var multiplier: UInt64 = 1
        for suffix in ["iB", "B"] where digits.hasSuffix(suffix) && digits.count > suffix.count {
            digits = digits.dropLast(suffix.count); break
        }
        if let last = digits.last, let shift = ["K": 10, "M": 20, "G": 30, "T": 40, "P": 50][String(last).uppercased()] {
            multiplier = 1 << UInt64(shift)
            digits = digits.dropLast()
        }
        guard let n = UInt64(digits), n.multipliedReportingOverflow(by: multiplier).overflow == false else {
            throw RewindError.invalidArgument("invalid size \"\(text)\": use bytes or a number with K, M, G or T (e.g. 512M)")
        }
        return n * multiplier
    }

    /// DURATION: `90s`, `15m`, `12h`, `7d` (also `500ms`, `2w`), in nanoseconds.
    public static func duration(_ text: String) throws -> UInt64 {
        let units: [(String, UInt64)] = [("ms", 1_000_000), ("s", 1_000_000_000), ("m", 60_000_000_000),
                                         ("h", 3_600_000_000_000), ("d", 86_400_000_000_000), ("w", 604_800_000_000_000)]
        for (suffix, ns) in units where text.hasSuffix(suffix) {
            if let n = UInt64(text.dropLast(suffix.count)), n > 0, !n.multipliedReportingOverflow(by: ns).overflow {
                return n * ns
            }
            break
        }
        throw RewindError.invalidArgument("invalid duration \"\(text)\": use a number with s, m, h or d (e.g. 15m, 7d)")
    }
}
