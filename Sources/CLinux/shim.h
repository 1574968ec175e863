/* Linux calls Glibc's Swift overlay hides behind _GNU_SOURCE. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <unistd.h>
#include <linux/falloc.h>

static inline int rewind_punch_hole(int fd, off_t offset, off_t length) {
    return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}
static inline off_t rewind_seek_data(int fd, off_t offset) { return lseek(fd, offset, SEEK_DATA); }
static inline off_t rewind_seek_hole(int fd, off_t offset) { return lseek(fd, offset, SEEK_HOLE); }
static inline ssize_t rewind_copy_file_range(int in, off_t *inOffset, int out, off_t *outOffset, size_t length) {
    return copy_file_range(in, inOffset, out, outOffset, length, 0);
}

#include <malloc.h>
static inline void rewind_tune_malloc(int mmapThreshold, int trimThreshold) {
    mallopt(M_MMAP_THRESHOLD, mmapThreshold);
    mallopt(M_TRIM_THRESHOLD, trimThreshold);
}

static inline int rewind_preallocate_range(int fd, off_t offset, off_t length) {
    return fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length);
}
static inline int rewind_zero_range(int fd, off_t offset, off_t length) {
    return fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length);
}
static inline int rewind_fadvise_willneed(int fd, off_t offset, off_t length) {
    return posix_fadvise(fd, offset, length, POSIX_FADV_WILLNEED);
}
static inline void rewind_limit_arenas(int n) { mallopt(M_ARENA_MAX, n); }
/* Start writeback of a range now, or wait until it is written (not a durability barrier). */
static inline int rewind_start_writeback(int fd, off_t offset, off_t length) {
    return sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE);
}
static inline int rewind_finish_writeback(int fd, off_t offset, off_t length) {
    return sync_file_range(fd, offset, length,
                           SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
}

#include <sys/syscall.h>
/* A read that never waits for the disk: EAGAIN (or a short count) unless the page cache holds it.
   preadv2(RWF_NOWAIT) through syscall(2): <sys/uio.h> would pull in <sys/select.h> under
   _GNU_SOURCE, whose fd_set clashes with the one Dispatch's module sees. */
struct rewind_iovec { void *base; size_t length; };  /* struct iovec's layout */
#define REWIND_RWF_NOWAIT 0x00000008
static inline ssize_t rewind_pread_nowait(int fd, void *buffer, size_t length, off_t offset) {
    struct rewind_iovec iov = { buffer, length };
    return syscall(SYS_preadv2, fd, &iov, 1, (unsigned long)offset, 0UL, REWIND_RWF_NOWAIT);
}

#include <sys/ioctl.h>
#include <sys/vfs.h>
#include <linux/fs.h>
/* The file system type (statfs's f_type: 0xEF53 ext2/3/4, 0x58465342 XFS), or -1. */
static inline long rewind_fs_type(int fd) {
    struct statfs s;
    return fstatfs(fd, &s) == 0 ? (long)s.f_type : -1;
}
/* Whether an XFS file lives on the realtime device (its fdatasync flushes that device only). */
static inline int rewind_is_realtime(int fd) {
    struct fsxattr x;
    if (ioctl(fd, FS_IOC_FSGETXATTR, &x) != 0) return 0;
    return (x.fsx_xflags & FS_XFLAG_REALTIME) != 0;
}
