/// A volume's bytes read from outside a mirror, mostly in order from the start: an image file
/// (`BlockFile`), or an NBD export (`NBDVolumeSource` in RewindDaemon). What `init --from`
/// copies into a base and `verify --against` compares a point with.
public protocol VolumeSource {
    /// How it is named in messages.
    var name: String { get }
    func size() throws -> UInt64
    func read(at offset: UInt64, into buffer: UnsafeMutableRawBufferPointer) throws
    /// The ranges below `size` that may hold data, ascending; the rest reads as zeros (a
    /// file's holes, an export's zero extents).
    func dataExtents(size: UInt64, from: UInt64) throws -> [Range<UInt64>]
}

extension BlockFile: VolumeSource {
    public var name: String { path }
}
