/*
 * TEST AND BENCH ONLY: entry points that the tests and `pkeys bench` use
 * and that no production path calls.  Read by cffi (through
 * _build_ffi.py) after pkeys_api.h, and by the C compiler through
 * pkeys_internal.h, like that header; the same rules apply (no
 * preprocessor logic).
 */

/* ---- test_steps.c: a revocation at a chosen step boundary ------------- */
/* Arm this thread: at the `step`-th boundary it passes (1-based), `pkey`
 * is revoked (access-disable) in every thread by a helper thread, the
 * handler running here.  0 disarms. */
int pk_test_revoke_at_step(int step, int pkey, uint32_t identity);
/* 1 if the revocation was delivered since arming, 0 if the boundary was
 * not reached (and the thread is disarmed), negative: it failed. */
int pk_test_revoked_at_step(void);

/* ---- guard.c, sigframe.c: what the kernel does with PKRU and signals -- */
int pk_signal_pkru(int64_t *in_handler, int64_t *after_return);
