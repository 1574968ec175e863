#include <lmdb.h>
#include <setjmp.h>
#include <signal.h>
#include <string.h>

/* Reads of a damaged data.mdb must fail, not kill the process. LMDB 0.9 follows page numbers
   from the file without bounds checks: a flipped bit in a branch page can point past the end
   of the file (SIGBUS on the map) or into garbage (SIGSEGV). Read-side LMDB calls run under a
   guard: a fault on this thread while the guard is set jumps back and the call returns
   REWIND_MDB_FAULT. Only calls that read are guarded (cursor and key look-ups, transaction
   and database opening; never mdb_put, mdb_del or a commit, which a jump could leave half
   done), and the jump lands in C, never across Swift frames. The handler is installed with SA_NODEFER so no signal stays blocked after the jump
   (and setjmp need not save the mask: no system call per guarded read). A fault with no guard
   set goes to the handler that was there before (Swift's crash reporter, or the default). */
#define REWIND_MDB_FAULT (-30600)

/* State lives in function-local statics (one copy: only RewindCore includes this header). */
static inline jmp_buf **rewind_mdb_guard_slot(void) { static __thread jmp_buf *slot; return &slot; }
static inline volatile sig_atomic_t *rewind_mdb_fault_slot(void) { static __thread volatile sig_atomic_t sig; return &sig; }
static inline struct sigaction *rewind_mdb_previous_action(int sig) {
    static struct sigaction bus, segv;
    return sig == SIGBUS ? &bus : &segv;
}

static void rewind_mdb_fault_handler(int sig, siginfo_t *info, void *context) {
    jmp_buf *guard = *rewind_mdb_guard_slot();
    if (guard) {
        *rewind_mdb_guard_slot() = 0;
        *rewind_mdb_fault_slot() = sig;
        _longjmp(*guard, 1);
    }
    /* Not ours: put the previous handler back and return; the faulting instruction runs again
       and faults into it. */
    sigaction(sig, rewind_mdb_previous_action(sig), 0);
    (void)info; (void)context;
}

static inline int rewind_mdb_install_fault_guard(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = rewind_mdb_fault_handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, rewind_mdb_previous_action(SIGBUS)) != 0) return -1;
    if (sigaction(SIGSEGV, &sa, rewind_mdb_previous_action(SIGSEGV)) != 0) return -1;
    return 0;
}

/* The signal the last guarded call on this thread took (SIGBUS or SIGSEGV). */
static inline int rewind_mdb_last_fault_signal(void) { return *rewind_mdb_fault_slot(); }

/* Whether [p, p+n) lies inside [lo, hi): a returned key or value that points past the end of
   the file would fault when Swift reads it. hi == 0 disables the check (write transactions:
   their dirty pages live outside the map). */
static inline int rewind_mdb_inside(const MDB_val *v, const char *lo, const char *hi) {
    if (!hi || v->mv_size == 0) return 1;
    const char *p = (const char *)v->mv_data;
    return p >= lo && p <= hi && v->mv_size <= (size_t)(hi - p);
}

#define REWIND_MDB_GUARDED(call)                                              \
    jmp_buf here;                                                             \
    jmp_buf **slot = rewind_mdb_guard_slot();                                 \
    jmp_buf *outer = *slot;                                                   \
    if (_setjmp(here)) { *slot = outer; return REWIND_MDB_FAULT; }            \
    *slot = &here;                                                            \
    int rc = (call);                                                          \
    *slot = outer;

static inline int rewind_mdb_cursor_get(MDB_cursor *cursor, MDB_val *key, MDB_val *data, MDB_cursor_op op,
                                        const char *lo, const char *hi) {
    REWIND_MDB_GUARDED(mdb_cursor_get(cursor, key, data, op))
    if (rc == 0 && (!rewind_mdb_inside(key, lo, hi) || !rewind_mdb_inside(data, lo, hi))) return MDB_CORRUPTED;
    return rc;
}

static inline int rewind_mdb_get(MDB_txn *txn, MDB_dbi dbi, MDB_val *key, MDB_val *data, const char *lo, const char *hi) {
    REWIND_MDB_GUARDED(mdb_get(txn, dbi, key, data))
    if (rc == 0 && !rewind_mdb_inside(data, lo, hi)) return MDB_CORRUPTED;
    return rc;
}

static inline int rewind_mdb_txn_begin(MDB_env *env, unsigned int flags, MDB_txn **txn) {
    REWIND_MDB_GUARDED(mdb_txn_begin(env, 0, flags, txn))
    return rc;
}

static inline int rewind_mdb_dbi_open(MDB_txn *txn, const char *name, unsigned int flags, MDB_dbi *dbi) {
    REWIND_MDB_GUARDED(mdb_dbi_open(txn, name, flags, dbi))
    return rc;
}

static inline int rewind_mdb_cursor_open(MDB_txn *txn, MDB_dbi dbi, MDB_cursor **cursor) {
    REWIND_MDB_GUARDED(mdb_cursor_open(txn, dbi, cursor))
    return rc;
}
