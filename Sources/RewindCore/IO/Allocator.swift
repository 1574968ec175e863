import CLinux

/// Raise glibc's mmap threshold and trim threshold so the multi-MiB buffers of group commits
/// (LMDB's dirty overflow pages, segment buffers) are reused from the heap instead of being
/// mmapped, page-faulted and zeroed afresh on every commit; at most 4 arenas, so a daemon
/// with many threads does not keep a free 64 MiB per thread. Call once at process start.
public func tuneAllocatorForLargeBuffers() {
    rewind_tune_malloc(32 << 20, 64 << 20)
    rewind_limit_arenas(4)
}
