/*
 * expert_pool.h - C ABI of the expertd expert pool (ffi/ in the expertd workspace).
 *
 * Link with libexpert_pool.a (built by `cargo build -p expert-pool --release`) and the
 * system libraries Rust's std needs (-lpthread -ldl -lm).
 *
 * Conventions: functions never unwind into C; strings returned by the pool are
 * NUL-terminated and owned by the pool unless a function says otherwise.
 */
#ifndef EXPERT_POOL_H
#define EXPERT_POOL_H

#ifdef __cplusplus
extern "C" {
#endif

/* The pool's version, e.g. "0.1.0". Static storage: never NULL, never freed by the
 * caller. Thread-safe. */
const char *expert_pool_version(void);

#ifdef __cplusplus
}
#endif

#endif /* EXPERT_POOL_H */
