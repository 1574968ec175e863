import Glibc

/// Which file a mirror journals: recorded by the first `serve` in the `meta` database under
/// the key "source", and checked by every later one, so a mirror is never served with
/// another file (its journal would then be replayed into, and describe, the wrong volume).
///
/// ```
/// offset size field
///   0     1   format        1
///   1     1   kind          1 regular file, 2 block device
///   2     2   pathBytes     n, the canonical path's length in bytes (1...4096)
///   4     4   zero
///   8     8   device        st_dev: the file system holding the file (for a block device,
///                           the one holding its node; informational)
///  16     8   node          st_ino of a regular file; st_rdev (the device number) of a block device
///  24     8   fileSystemID  statvfs f_fsid of a regular file's file system; 0 unknown (and devices)
///  32     n   path          canonical absolute path (realpath), UTF-8
/// 32+n    8   checksum      XXH3-64 of bytes 0..<32+n
/// ```
/// Integers little-endian.
///
/// Why the file system ID beside `st_dev`: some file systems get their device number when
/// mounted (btrfs subvolumes, device-mapper volumes numbered in activation order), so after a
/// reboot the same file can show another `st_dev`. Its inode and the file system's ID (ext4
/// and btrfs derive it from the file system's UUID) still match, and it is the same file.
/// Two fresh file systems often hold files with equal inode numbers, so the inode alone is
/// not enough.
///
/// Not caught: a source deleted and then re-created at its path may get the freed inode
/// number back (ext4 reuses them at once), and then looks like the same file. A file copied
/// and renamed over the source (`cp A A.new; mv A.new A`) gets another number, since both
/// exist at once. Telling those apart needs the birth time (`statx` `stx_btime`).
public struct SourceIdentity: Equatable, Sendable, CustomStringConvertible {
    static let format: UInt8 = 1
    static let key = Array("source".utf8)
    static let headerBytes = 32
    /// PATH_MAX: realpath never returns more.
    static let pathBytesMax = 4096

    /// Canonical absolute path (`realpath`) when recorded.
    public var path: String
    public var isBlockDevice: Bool
    /// `st_dev` of the file (of the node, for a block device).
    public var device: UInt64
    /// `st_ino` of a regular file, `st_rdev` of a block device.
    public var node: UInt64
    /// `f_fsid` of a regular file's file system (`fstatvfs`), 0 when unknown or a device.
    public var fileSystemID: UInt64

    public init(path: String, isBlockDevice: Bool, device: UInt64, node: UInt64, fileSystemID: UInt64) {
        self.path = path
        self.isBlockDevice = isBlockDevice
        self.device = device
        self.node = node
        self.fileSystemID = fileSystemID
    }

    /// The identity of the open file `fd`, found at `path`: `fstat`, `fstatvfs`, `realpath`.
    /// Throws `invalidArgument` unless it is a regular file or a block device.
    public init(describing fd: Int32, path: String) throws {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw RewindError.io(path: path, operation: "fstat", errno: errno) }
        let type = st.st_mode & S_IFMT
        guard type == S_IFREG || type == S_IFBLK else {
            throw RewindError.invalidArgument("\(path) is neither a regular file nor a block device")
        }
        guard let resolved = realpath(path, nil) else { throw RewindError.io(path: path, operation: "realpath", errno: errno) }
        let canonical = String(cString: resolved)
        free(resolved)
        guard canonical.hasPrefix("/"), canonical.utf8.count <= Self.pathBytesMax else {
            throw RewindError.invalidArgument("\(path): realpath gave \"\(canonical)\", not an absolute path of at most \(Self.pathBytesMax) bytes")
        }
        let block = type == S_IFBLK
        var fsid: UInt64 = 0
        if !block {
            var fs = statvfs()
            if fstatvfs(fd, &fs) == 0 { fsid = UInt64(fs.f_fsid) }
        }
        self.init(path: canonical, isBlockDevice: block, device: UInt64(st.st_dev),
                  node: block ? UInt64(st.st_rdev) : UInt64(st.st_ino), fileSystemID: fsid)
    }

    /// Whether `other` is the same file: for block devices the same device number; for
    /// regular files the same inode on the same file system (same `st_dev`, or the same
    /// nonzero file system ID when the device number changed, see the type's comment).
    public func isSameFile(as other: SourceIdentity) -> Bool {
        guard isBlockDevice == other.isBlockDevice, node == other.node else { return false }
        if isBlockDevice { return true }
        return device == other.device || (fileSystemID != 0 && fileSystemID == other.fileSystemID)
    }

    /// Refuse `current` (the file given on the command line as `given`) unless it is this
    /// recorded source; `mirror` names the mirror in the message.
    public func check(_ current: SourceIdentity, mirror: String, given: String) throws {
        if isSameFile(as: current) { return }
        let remedy = "(use --mirror to give \(given) its own mirror)"
        if current.path == path {
            let what: String
            switch (isBlockDevice, current.isBlockDevice) {
            case (true, true): what = "device \(deviceMajorMinor(node)), now \(deviceMajorMinor(current.node))"
            case (false, false): what = "inode \(node), now \(current.node)"
            case (true, false): what = "a block device, now a regular file"
            case (false, true): what = "a regular file, now a block device"
            }
            throw RewindError.invalidArgument(
                "mirror \(mirror) belongs to source \(path), but that file was replaced since (\(what)): \(given) is not the file the mirror journals \(remedy)")
        }
        throw RewindError.invalidArgument("mirror \(mirror) belongs to source \(path); \(given) is another file \(remedy)")
    }

    public var description: String {
        isBlockDevice ? "\(path) (block device \(deviceMajorMinor(node)))"
            : "\(path) (inode \(node) on device \(deviceMajorMinor(device)))"
    }

    func encoded() -> [UInt8] {
        let pathBytes = Array(path.utf8)
        precondition(!pathBytes.isEmpty && pathBytes.count <= Self.pathBytesMax, "source path of \(pathBytes.count) bytes")
        var b: [UInt8] = [Self.format, isBlockDevice ? 2 : 1]
        b.reserveCapacity(Self.headerBytes + pathBytes.count + 8)
        b.appendLE(UInt16(pathBytes.count))
        b.appendLE(UInt32(0))
        b.appendLE(device)
        b.appendLE(node)
        b.appendLE(fileSystemID)
        b.append(contentsOf: pathBytes)
        b.appendLE(xxh3(b))
        return b
    }

    /// Decode a stored value; anything malformed is `damagedMirror` naming `mirror`.
    static func decode(_ raw: UnsafeRawBufferPointer, mirror: String) throws -> SourceIdentity {
        func damaged(_ why: String) -> RewindError {
            RewindError.damagedMirror(path: mirror, why: "its record of the source (journal meta \"source\") \(why)")
        }
        guard raw.count >= Self.headerBytes + 8 else { throw damaged("is \(raw.count) bytes, too short") }
        let format = raw[0]
        guard format == Self.format else {
            throw damaged(format > Self.format ? "has format \(format), newer than this rewind understands (\(Self.format))"
                                               : "has unknown format \(format)")
        }
        let n = Int(raw.loadLE(at: 2, as: UInt16.self))
        guard n >= 1, n <= Self.pathBytesMax, raw.count == Self.headerBytes + n + 8 else {
            throw damaged("is \(raw.count) bytes for a path of \(n)")
        }
        let end = Self.headerBytes + n
        guard xxh3(UnsafeRawBufferPointer(rebasing: raw[0..<end])) == raw.loadLE(at: end, as: UInt64.self) else {
            throw damaged("fails its checksum")
        }
        guard raw[1] == 1 || raw[1] == 2, raw.loadLE(at: 4, as: UInt32.self) == 0 else {
            throw damaged("has inconsistent fields")
        }
        let path = String(decoding: UnsafeRawBufferPointer(rebasing: raw[Self.headerBytes..<end]), as: UTF8.self)
        return SourceIdentity(path: path, isBlockDevice: raw[1] == 2, device: raw.loadLE(at: 8, as: UInt64.self),
                              node: raw.loadLE(at: 16, as: UInt64.self), fileSystemID: raw.loadLE(at: 24, as: UInt64.self))
    }
}

/// A device number as `major:minor` (glibc's encoding of `dev_t`), as `ls -l` and /proc show it.
func deviceMajorMinor(_ dev: UInt64) -> String {
    let (major, minor) = deviceMajorMinorParts(dev)
    return "\(major):\(minor)"
}

/// glibc's `major()` and `minor()` of a `dev_t` (`gnu_dev_major`, `gnu_dev_minor`).
func deviceMajorMinorParts(_ dev: UInt64) -> (major: UInt64, minor: UInt64) {
    let major = ((dev >> 8) & 0xFFF) | ((dev >> 32) & ~UInt64(0xFFF))
    let minor = (dev & 0xFF) | ((dev >> 12) & ~UInt64(0xFF))
    return (major, minor)
}

extension Mirror {
    /// The source recorded by the first `serve` of this mirror, or nil (never served since
    /// sources were recorded). A damaged value throws `damagedMirror`.
    public func sourceIdentity() throws -> SourceIdentity? {
        let (j, path) = (journal, self.path)
        return try j.env.read { txn in
            guard let raw = try txn.get(j.meta, SourceIdentity.key) else { return nil }
            return try SourceIdentity.decode(raw, mirror: path)
        }
    }

    /// Record `identity` as the file this mirror journals (replacing any earlier record), durably.
    /// Only the mirror's owner (`owner.lock`) calls it, before it starts writing.
    public func recordSource(_ identity: SourceIdentity) throws {
        let j = journal
        try j.env.write { txn in try txn.put(j.meta, SourceIdentity.key, identity.encoded()) }
        try sync()
    }
}
