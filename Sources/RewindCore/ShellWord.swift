/// `text` as one word a POSIX shell reads back unchanged, for the commands messages tell the
/// user to run (and that they paste): as it is when it holds only characters no shell treats
/// specially, else in single quotes, a quote inside written `'\''`.
public func shellWord(_ text: String) -> String {
    if !text.isEmpty && text.unicodeScalars.allSatisfy({ shellPlainScalars.contains($0) }) { return text }
    var quoted = "'"
    for c in text {
        if c == "'" { quoted += "'\\''" } else { quoted.append(c) }
    }
    return quoted + "'"
}

/// Characters that mean nothing to a POSIX shell (or zsh) anywhere in a word; `~` and `=`
/// do at a word's start, and are quoted like the rest.
private let shellPlainScalars = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-+:@%,".unicodeScalars)

/// `path` without trailing slashes ("m/" → "m", "/" stays "/"), so a suffix added to it names
/// a sibling, not something inside it.
func withoutTrailingSlashes(_ path: String) -> String {
    var p = Substring(path)
    while p.count > 1 && p.hasSuffix("/") { p = p.dropLast() }
    return String(p)
}
