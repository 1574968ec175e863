#ifndef CLMDBGUARD_H
#define CLMDBGUARD_H
#include <lmdb.h>

/* Reads of a damaged data.mdb must fail, not kill the process. LMDB 0.9 follows page numbers
   and node offsets from the file without bounds checks: a flipped bit in a branch page can
   point past the end of the file (SIGBUS on the map) or into garbage (SIGSEGV). These calls run
   LMDB's read-side functions under a guard: a fault on this thread while the guard is set
   jumps back into the wrapper, which returns REWIND_MDB_FAULT. See guard.c. */
#define REWIND_MDB_FAULT (-30600)

/* Install the SIGBUS/SIGSEGV handler (once per process; returns 0 on success). */
int rewind_mdb_install_fault_guard(void);
/* Route the environment's failed internal assertions through the guard (before abort()). */
int rewind_mdb_set_assert(MDB_env *env);
/* The signal the last guarded call on this thread took (SIGBUS or SIGSEGV), or 0. */
int rewind_mdb_last_fault_signal(void);

/* mdb_cursor_get / mdb_get, guarded. With hi != NULL (a read transaction), a key or value that
   does not lie inside [lo, hi) — the data file's part of the map — is refused as MDB_CORRUPTED
   before the caller reads it. */
int rewind_mdb_cursor_get(MDB_cursor *cursor, MDB_val *key, MDB_val *data, MDB_cursor_op op,
                          const char *lo, const char *hi);
int rewind_mdb_get(MDB_txn *txn, MDB_dbi dbi, MDB_val *key, MDB_val *data, const char *lo, const char *hi);
int rewind_mdb_txn_begin(MDB_env *env, unsigned int flags, MDB_txn **txn);
int rewind_mdb_dbi_open(MDB_txn *txn, const char *name, unsigned int flags, MDB_dbi *dbi);
int rewind_mdb_cursor_open(MDB_txn *txn, MDB_dbi dbi, MDB_cursor **cursor);
int rewind_mdb_stat(MDB_txn *txn, MDB_dbi dbi, MDB_stat *stat);

#endif
