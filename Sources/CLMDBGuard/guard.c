/* Guarded LMDB reads: see CLMDBGuard.h.
 *
 * One definition of the guard's state for the whole process. (As `static inline` code in a
 * system-library header it was compiled into each Swift file's object separately, each with
 * its own thread-local slot, and the handler never saw the slot the wrapper had set.)
 *
 * Only calls that read are guarded (look-ups, cursor moves, opening transactions, databases
 * and cursors, mdb_stat); never mdb_put, mdb_del or a commit, which a jump could leave half
 * done. The jump lands in this file's wrappers, never across Swift frames. The handler is
 * installed with SA_NODEFER, so no signal stays blocked after the jump, and _setjmp need not
 * save the signal mask: no system call per guarded read. A fault with no guard set goes to
 * the handler that was there before (Swift's crash reporter, or the default action). */
#define _GNU_SOURCE
#include "CLMDBGuard.h"
#include <setjmp.h>
#include <signal.h>
#include <string.h>

static __thread jmp_buf *guard_slot;
static __thread volatile sig_atomic_t fault_signal;
static struct sigaction previous_bus, previous_segv;

static void fault_handler(int sig, siginfo_t *info, void *context) {
    jmp_buf *guard = guard_slot;
    (void)info; (void)context;
    if (guard) {
        guard_slot = 0;
        fault_signal = sig;
        _longjmp(*guard, 1);
    }
    /* Not ours: put the previous handler back and return; the faulting instruction runs
       again and faults into it. */
    sigaction(sig, sig == SIGBUS ? &previous_bus : &previous_segv, 0);
}

/* LMDB's own consistency checks (mdb_cassert: "Assertion 'IS_LEAF(mp)' failed in
   mdb_cursor_next()") call this before abort(): inside a guarded read it jumps back like a
   fault, so a damaged page is an error there too; elsewhere it returns and LMDB aborts. */
static void assert_handler(MDB_env *env, const char *message) {
    jmp_buf *guard = guard_slot;
    (void)env; (void)message;
    if (guard) {
        guard_slot = 0;
        fault_signal = SIGABRT;
        _longjmp(*guard, 1);
    }
}

int rewind_mdb_set_assert(MDB_env *env) { return mdb_env_set_assert(env, assert_handler); }

int rewind_mdb_install_fault_guard(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = fault_handler;
    sa.sa_flags = SA_SIGINFO | SA_NODEFER | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGBUS, &sa, &previous_bus) != 0) return -1;
    if (sigaction(SIGSEGV, &sa, &previous_segv) != 0) return -1;
    return 0;
}

int rewind_mdb_last_fault_signal(void) { return fault_signal; }

static int inside(const MDB_val *v, const char *lo, const char *hi) {
    if (!hi || v->mv_size == 0) return 1;
    const char *p = (const char *)v->mv_data;
    return p >= lo && p <= hi && v->mv_size <= (size_t)(hi - p);
}

/* Run `call` with the guard set; a fault inside returns REWIND_MDB_FAULT from the wrapper. */
#define GUARDED(call)                                                   \
    jmp_buf here;                                                       \
    jmp_buf *volatile outer = guard_slot;                               \
    if (_setjmp(here)) { guard_slot = outer; return REWIND_MDB_FAULT; } \
    guard_slot = &here;                                                 \
    int rc = (call);                                                    \
    guard_slot = outer;

int rewind_mdb_cursor_get(MDB_cursor *cursor, MDB_val *key, MDB_val *data, MDB_cursor_op op,
                          const char *lo, const char *hi) {
    GUARDED(mdb_cursor_get(cursor, key, data, op))
    if (rc == 0 && (!inside(key, lo, hi) || !inside(data, lo, hi))) return MDB_CORRUPTED;
    return rc;
}

int rewind_mdb_get(MDB_txn *txn, MDB_dbi dbi, MDB_val *key, MDB_val *data, const char *lo, const char *hi) {
    GUARDED(mdb_get(txn, dbi, key, data))
    if (rc == 0 && !inside(data, lo, hi)) return MDB_CORRUPTED;
    return rc;
}

int rewind_mdb_txn_begin(MDB_env *env, unsigned int flags, MDB_txn **txn) {
    GUARDED(mdb_txn_begin(env, 0, flags, txn))
    return rc;
}

int rewind_mdb_dbi_open(MDB_txn *txn, const char *name, unsigned int flags, MDB_dbi *dbi) {
    GUARDED(mdb_dbi_open(txn, name, flags, dbi))
    return rc;
}

int rewind_mdb_cursor_open(MDB_txn *txn, MDB_dbi dbi, MDB_cursor **cursor) {
    GUARDED(mdb_cursor_open(txn, dbi, cursor))
    return rc;
}

int rewind_mdb_stat(MDB_txn *txn, MDB_dbi dbi, MDB_stat *stat) {
    GUARDED(mdb_stat(txn, dbi, stat))
    return rc;
}
