/*
 * expert_pool.h - C ABI of the expertd expert pool (ffi/ in the expertd workspace).
 *
 * The pool keeps the hot experts of every MoE layer in N fixed slots per layer and
 * reads misses from the GGUF file (io_uring, O_DIRECT where the file system allows it,
 * pread as a fallback). Gate, up and down (or fused gate_up and down) of one expert
 * always share one slot index.
 *
 * Link with libexpert_pool.a (built by `cargo build -p expert-pool --release`) and the
 * system libraries Rust's std needs (-lpthread -ldl -lm).
 *
 * Typical use by an engine:
 *   ep_pool_config cfg; ep_pool_config_init(&cfg); cfg.stats_path = "...";
 *   ep_pool *pool; if (ep_pool_new(&cfg, &pool) != EP_OK) fail(ep_last_error());
 *   int32_t f; ep_pool_add_file(pool, "model.gguf", &f);
 *   for each MoE layer: ep_pool_add_layer(pool, &desc);     (at model load)
 *   per MoE layer and ubatch, in a one-thread CPU op:
 *     st = ep_pool_request(pool, il, ids, n_used, n_tokens, ids->nb[1], slots);
 *     EP_OK: use slots with the slot tensors; EP_DOES_NOT_FIT or < 0: use the
 *     original expert tensors for this ubatch.
 *   optionally, while layer il computes: ep_pool_prefetch(pool, il + 1, guess, n, NULL);
 *   ep_pool_delete(pool);                                     (with the model)
 *
 * ---- Conventions ----------------------------------------------------------------
 * - Every function returns an ep_status (or is documented otherwise); on a negative
 *   status, ep_last_error() describes the failure. No function unwinds into C: an
 *   internal panic is caught and becomes EP_ERR_INTERNAL, after which the pool refuses
 *   further calls (they return EP_ERR_INTERNAL) but can still be deleted.
 * - Pointer + length pairs accept NULL when the length is 0. Other NULL pointers give
 *   EP_ERR_INVALID_ARGUMENT.
 * - Strings the pool returns are owned by the pool (or the thread, for
 *   ep_last_error); the caller never frees them.
 * - The caller keeps ownership of everything it passes in; the pool copies what it
 *   keeps (descriptors, paths) and dup()s descriptors.
 *
 * ---- Thread safety --------------------------------------------------------------
 * - All ep_pool_* functions taking a pool are thread-safe: each call locks the pool,
 *   so calls on one pool are serialised (a request blocked on a read also blocks other
 *   calls on the same pool). Different pools are independent.
 * - Exception: ep_pool_delete must not race with any other call on the same pool.
 * - Callbacks (ep_log_fn, ep_copy_fn) run on the thread of the pool call that
 *   triggered them, with the pool locked: never concurrently for one pool, and never
 *   from a background thread. A callback must not call ep_pool_* functions (such calls
 *   return EP_ERR_REENTRANT).
 * - Slot lifetime: the slots returned by ep_pool_request for layer L keep their expert
 *   and bytes until the next ep_pool_request for L (from any thread) or
 *   ep_pool_delete. Prefetches never evict them. So one pool serves one sequence of
 *   graph computations at a time (llama.cpp runs a model's graph ops sequentially);
 *   contexts that compute concurrently need a pool each.
 * - The only thread the pool starts is the stats writer (when stats_path or trace_path
 *   is set); it reads counters and copies new trace tokens under the lock, writes
 *   files outside it, and never calls callbacks.
 *
 * ---- Stats file -----------------------------------------------------------------
 * With cfg.stats_path set, a background thread rewrites that file atomically (write
 * "<path>.tmp.<pid>.<n>", rename over <path>) every stats_interval_ms (default 1000), and
 * once more at ep_pool_delete and on ep_pool_publish_stats. Content: one JSON object
 *   {"format":"expert-pool-stats","version":1,"pid":N,"unix_ms":N,
 *    "io":"io_uring"|"pread","direct_files":N,"files":N,"policy":"lfu-decay",
 *    "warnings":["..."],"total":{<counters>},
 *    "layers":[{"layer":N,"n_experts":N,"n_slots":N,"resident":N,"counters":{...}}]}
 * where <counters> has the fields of ep_stats below, same names and meanings
 * (documented in ffi/src/metrics.rs, type StatsSnapshot).
 */
#ifndef EXPERT_POOL_H
#define EXPERT_POOL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* An expert pool. Opaque; created by ep_pool_new, released by ep_pool_delete. */
typedef struct ep_pool ep_pool;

/* ---- Status codes ------------------------------------------------------------- */
typedef int32_t ep_status;
enum {
    EP_OK = 0,
    /* The request's distinct experts exceed the layer's slots: nothing changed; use the
     * original tensors for this ubatch. Counted in ep_stats.does_not_fit. */
    EP_DOES_NOT_FIT = 1,
    /* ep_pool_prefetch: some hints were dropped (no slot free of held or filling
     * experts, or the in-flight limit). Not an error. */
    EP_DROPPED = 2,
    EP_ERR_INVALID_ARGUMENT = -1, /* NULL pointer, id out of range, bad descriptor */
    EP_ERR_IO = -2,               /* reading the model file failed, or it is too short */
    EP_ERR_FILE_CHANGED = -3,     /* file truncated, modified or replaced since added */
    EP_ERR_NO_MEMORY = -4,
    EP_ERR_STATE = -5,            /* unknown/duplicate layer, no stats path, ... */
    EP_ERR_REENTRANT = -6,        /* pool function called from a pool callback */
    EP_ERR_INTERNAL = -7          /* internal error (caught panic); pool unusable */
};

/* ---- Policies and I/O modes ------------------------------------------------------ */
enum {
    EP_POLICY_DEFAULT = 0,     /* currently EP_POLICY_LFU_DECAY (see bench/RESULTS.md) */
    EP_POLICY_LRU = 1,
    EP_POLICY_LEAST_STALE = 2, /* LRU that protects unused prefetches for one request */
    EP_POLICY_LFU_DECAY = 3,   /* decayed use frequency, half-life 256 requests */
    EP_POLICY_LFRU = 4,        /* frequency + learned reuse bonus */
    EP_POLICY_ERD = 5          /* expected reuse distance */
};
enum {
    EP_IO_AUTO = 0,            /* io_uring + O_DIRECT where allowed; else buffered; else pread */
    EP_IO_URING = 1,           /* same as AUTO */
    EP_IO_URING_BUFFERED = 2,  /* io_uring, never O_DIRECT */
    EP_IO_PREAD = 3,           /* pread in the calling thread, never O_DIRECT */
    EP_IO_PREAD_DIRECT = 4     /* pread, O_DIRECT where allowed */
};
enum { EP_LOG_INFO = 0, EP_LOG_WARN = 1, EP_LOG_ERROR = 2 };

/* ---- Callbacks ------------------------------------------------------------------- */
/* Log sink: level is EP_LOG_*, msg is NUL-terminated and valid during the call only.
 * Warnings (io_uring unavailable, O_DIRECT refused for a file) are logged once each
 * and also listed in the stats JSON "warnings". */
typedef void (*ep_log_fn)(void *user, int32_t level, const char *msg);

/* Slot fill sink: store len bytes at src (valid during the call only) as projection
 * proj of slot `slot` of layer `layer`, in whatever layout the engine wants (plain
 * copy, repack, GPU upload). Called once per projection per fill, before the slot is
 * ever returned by ep_pool_request. */
typedef void (*ep_copy_fn)(void *user, int32_t layer, int32_t proj, int32_t slot,
                           const void *src, size_t len);

/* Stage sink (ep_pool_stage): for one distinct expert of the ubatch, either
 *   slot >= 0, proj == -1, src NULL: the expert is ready in that slot of the layer;
 *       copy it (every projection) from the slot's memory, which keeps it;
 *   slot == -1, proj >= 0: src holds the len file bytes of projection proj of the
 *       expert (valid during the call only).
 * Runs on the calling thread, with the pool locked. */
typedef void (*ep_stage_fn)(void *user, int32_t layer, int32_t expert, int32_t slot,
                            int32_t proj, const void *src, size_t len);

/* ---- Configuration ----------------------------------------------------------------- */
typedef struct ep_pool_config {
    uint32_t policy;                /* EP_POLICY_* */
    uint32_t io_mode;               /* EP_IO_* */
    uint32_t queue_depth;           /* io_uring entries; 0 = 256 */
    uint32_t max_prefetch_inflight; /* prefetch fills in flight at most; 0 = 64 */
    const char *stats_path;         /* stats file (copied); NULL = none */
    uint32_t stats_interval_ms;     /* minimum interval between writes; 0 = 1000 */
    ep_log_fn log_fn;               /* NULL = no logging */
    void *log_user;                 /* passed to log_fn */
    const char *trace_path;         /* routing trace file (copied); NULL = none. The
                                       binary trace format of ffi/TRACE_FORMAT.md,
                                       written atomically at ep_pool_delete, on
                                       ep_pool_publish_stats, and every 10 s while it
                                       grows (by the pool's background thread, so a
                                       killed process keeps all but the last seconds;
                                       the pool keeps a second copy of the trace in
                                       memory for these writes;
                                       a long trace is written less often, so that its
                                       writes take at most a tenth of the time). Each
                                       write is skipped when the file already holds as
                                       many tokens (a file removed meanwhile is not
                                       written again until a token arrives).
                                       A token enters it once
                                       every registered layer served it in one ubatch
                                       (in practice: generated tokens). */
} ep_pool_config;

/* One projection (gate, up, down, gate_up) of a layer's expert tensor. */
typedef struct ep_proj_desc {
    int32_t file;             /* id from ep_pool_add_file / ep_pool_add_fd */
    uint64_t offset;          /* absolute file offset of expert 0
                                 (gguf_get_data_offset + gguf_get_tensor_offset) */
    uint64_t expert_stride;   /* distance between experts in the file (nb[2]) */
    uint64_t expert_bytes;    /* bytes per expert (<= expert_stride, <= 4 GiB) */
    void *dst_base;           /* slot 0 of this projection in engine memory, or NULL */
    uint64_t dst_slot_stride; /* bytes between slots at dst_base (>= expert_bytes) */
} ep_proj_desc;

/* A MoE layer. Destination, one of:
 *  (a) copy_fn != NULL: fills go through copy_fn; every dst_base must be NULL.
 *  (b) every dst_base != NULL: slot s of projection p is written to
 *      proj[p].dst_base + s * proj[p].dst_slot_stride (expert_bytes bytes). The memory
 *      stays owned by the engine and must stay valid and unmoved until ep_pool_delete.
 *  (c) every dst_base NULL and copy_fn NULL: the pool allocates the slot memory
 *      (64-byte aligned slots); get it with ep_pool_slot_memory. Where every expert of
 *      each projection starts at the same 64-byte aligned place in a 4 KiB page of the
 *      file (expert_stride a multiple of 4096, as in GGUF files), slots are whole pages
 *      apart and ep_pool_request reads the file straight into them (no copy).
 * The engine may read a slot's memory only while ep_pool_request has it returned
 * (see "Slot lifetime"). */
typedef struct ep_layer_desc {
    int32_t layer;              /* engine layer index, 0..65535, unique per pool */
    uint32_t n_experts;         /* 1..65536 */
    uint32_t n_slots;           /* 1..65536 */
    uint32_t n_proj;            /* 1..4 */
    const ep_proj_desc *proj;   /* n_proj descriptors (copied) */
    ep_copy_fn copy_fn;         /* see (a); NULL otherwise */
    void *copy_user;            /* passed to copy_fn */
} ep_layer_desc;

/* Cumulative counters (per layer or total). hits + inflight_hits + misses = distinct
 * experts of all served requests. */
typedef struct ep_stats {
    uint64_t requests;              /* requests served */
    uint64_t hits;                  /* distinct requested experts ready in a slot */
    uint64_t inflight_hits;         /* ... whose prefetch was in flight (waited) */
    uint64_t misses;                /* ... read on demand */
    uint64_t evictions;             /* experts removed to make room */
    uint64_t bytes_read;            /* expert bytes read (demand + prefetch) */
    uint64_t stall_ns;              /* time requests waited for reads */
    uint64_t prefetch_issued;       /* prefetch fills started */
    uint64_t prefetch_issued_bytes;
    uint64_t prefetch_useful;       /* prefetched experts later used by a request */
    uint64_t prefetch_useful_bytes;
    uint64_t prefetch_wasted;       /* prefetched experts evicted unused */
    uint64_t prefetch_wasted_bytes;
    uint64_t prefetch_dropped;      /* prefetch hints not started */
    uint64_t does_not_fit;          /* requests answered EP_DOES_NOT_FIT */
    uint64_t errors;                /* failed requests, stage calls and prefetch fills */
    uint64_t staged;                /* ep_pool_stage calls served */
    uint64_t staged_from_slots;     /* ... distinct experts handed over from a slot */
    uint64_t staged_reads;          /* ... distinct experts read from the file */
    uint64_t copy_ns;               /* time handing read bytes to the engine (slot copies
                                       or repacks, staging copies) */
    uint64_t stage_ahead;           /* experts read ahead by ep_pool_stage_ahead */
    uint64_t stage_ahead_used;      /* ... that the next stage call or request needed */
    uint64_t ahead_fills;           /* misses of requests filled from those reads */
} ep_stats;

/* ---- Functions ---------------------------------------------------------------------- */

/* The pool's version, e.g. "0.1.0". Static storage: never NULL, never freed by the
 * caller. Thread-safe. */
const char *expert_pool_version(void);

/* Message of the most recent failed ep_* call on the calling thread ("" if none).
 * Never NULL. Valid until the next ep_* call on this thread. Thread-safe (per thread). */
const char *ep_last_error(void);

/* Static name of a status code ("EP_OK", ...; "EP_UNKNOWN" otherwise). Thread-safe. */
const char *ep_status_name(ep_status status);

/* Fills *cfg with the defaults (all zero / NULL). cfg NULL: no-op. Thread-safe. */
void ep_pool_config_init(ep_pool_config *cfg);

/* Creates a pool. cfg may be NULL (defaults). On EP_OK, *out owns a new pool that the
 * caller must release with ep_pool_delete; on failure *out is set to NULL. Falls back
 * from io_uring to pread with one EP_LOG_WARN when io_uring is unavailable (EPERM,
 * ENOSYS, missing opcodes). Thread-safe. */
ep_status ep_pool_new(const ep_pool_config *cfg, ep_pool **out);

/* Waits for reads in flight, writes the stats file one last time (if configured),
 * stops the stats thread and frees the pool and the memory it allocated. NULL: no-op.
 * Must not race with other calls on the same pool. Called from inside a pool callback
 * it does nothing (ep_last_error says so): the pool stays valid. */
void ep_pool_delete(ep_pool *pool);

/* Opens a model file (read-only; O_DIRECT too when the io mode wants it and the file
 * system allows it, else one warning). *out_file gets its id. The path is copied. */
ep_status ep_pool_add_file(ep_pool *pool, const char *path, int32_t *out_file);

/* Registers an open descriptor; the pool keeps a dup() of it (the caller may close
 * fd). *out_file gets its id. */
ep_status ep_pool_add_fd(ep_pool *pool, int fd, int32_t *out_file);

/* Registers a MoE layer (see ep_layer_desc); its slots start empty. Checks that every
 * expert lies inside its file. The descriptor is copied. */
ep_status ep_pool_add_layer(ep_pool *pool, const ep_layer_desc *desc);

/* For a layer with pool- or engine-owned slot memory: *out_base gets slot 0 of
 * projection proj and *out_slot_stride the bytes between slots. The memory stays
 * owned by the pool (case c) or engine (case b); valid until ep_pool_delete. */
ep_status ep_pool_slot_memory(ep_pool *pool, int32_t layer, int32_t proj,
                              void **out_base, uint64_t *out_slot_stride);

/* Makes every expert in ids resident and writes its slot to out_slots.
 *   ids: n_tokens rows of n_used int32 expert ids; row t starts at
 *        (const char *)ids + t * ids_row_stride (bytes, as ggml's nb[1]; a multiple of
 *        4 and >= 4 * n_used). Ids must be in 0..n_experts-1, distinct within a row.
 *   out_slots: n_tokens * n_used int32, row-major (contiguous), written on EP_OK only;
 *        must not overlap ids.
 * On EP_OK every returned slot holds its expert's bytes, the slots of one token are
 * distinct, and they stay valid until the next request for this layer. Blocks while
 * misses (all submitted as one batch; those announced by ep_pool_stage_ahead are
 * filled from its reads) and needed in-flight prefetches complete.
 * Returns EP_DOES_NOT_FIT (no slot changed) if the distinct experts exceed n_slots.
 * Any call of it (or of ep_pool_request_start) first ends the layer's started request.
 * On an error (EP_ERR_IO, EP_ERR_FILE_CHANGED, ...) no slot is served and experts
 * whose fill failed are not resident. */
ep_status ep_pool_request(ep_pool *pool, int32_t layer, const int32_t *ids,
                          uint32_t n_used, uint32_t n_tokens, size_t ids_row_stride,
                          int32_t *out_slots);

/* Like ep_pool_request, but returns as soon as the slots are assigned, with the
 * misses' reads in flight, so that the engine computes while they come in: out_slots
 * gets the slots ep_pool_request would give (on EP_OK only), but a slot's projection
 * proj must not be read before ep_pool_request_wait(pool, layer, proj) (or with proj
 * -1) has returned EP_OK. Misses are read in two waves: every projection but the last
 * now; the last one (down) once a wait finds every earlier projection in, or on a wait
 * for it (or -1), or at the layer's next request, whichever comes first, so that it
 * comes in while the engine computes with the earlier ones. *out_in_flight (may be
 * NULL) gets the number of the request's distinct experts still being read: with 0
 * every slot is ready, the request is counted as served, and the waits may be skipped.
 * The request is the layer's started request until a wait with proj -1 ends it; any
 * later request of the layer ends it too, and its slots are then no longer held.
 * Counters count it once it is served (its -1 wait, or at once with nothing in
 * flight); a routing trace records it here. An error returned here (bad ids, no fit,
 * a changed file, a read-ahead read it needed that failed) means nothing was started;
 * read errors of its own reads come from the waits. */
ep_status ep_pool_request_start(ep_pool *pool, int32_t layer, const int32_t *ids,
                                uint32_t n_used, uint32_t n_tokens,
                                size_t ids_row_stride, int32_t *out_slots,
                                uint32_t *out_in_flight);

/* Waits until projection proj (0..n_proj-1 of the layer's description; any negative
 * value: every projection) of every expert of the layer's started request is in its
 * slot. With a negative proj and EP_OK the request has ended, every slot holds its
 * expert, as after ep_pool_request. On an error (EP_ERR_IO, EP_ERR_FILE_CHANGED, ...)
 * the request failed: none of its slots may be used, and later waits on it return
 * EP_ERR_STATE, as does a wait on a layer with no started request. A proj >= n_proj
 * is EP_ERR_INVALID_ARGUMENT. */
ep_status ep_pool_request_wait(ep_pool *pool, int32_t layer, int32_t proj);

/* For a ubatch too large for the layer's slots, computed by the engine from a staging
 * area that holds the layer's experts at their original ids: hands every distinct
 * expert of ids (same layout as ep_pool_request) to stage_fn, from its slot when it is
 * ready in one, else as its file bytes per projection (all such reads submitted as one
 * batch; each projection handed over as soon as it is in). Does not change the slots
 * or the policy's state. Blocks until every read it started has finished, except when
 * waiting itself fails (the error is returned at once; those reads finish later and
 * are never handed over). On an error (EP_ERR_IO, EP_ERR_FILE_CHANGED, ...) the staging
 * area must not be used: some experts may be missing or come from a file that changed. */
ep_status ep_pool_stage(ep_pool *pool, int32_t layer, const int32_t *ids,
                        uint32_t n_used, uint32_t n_tokens, size_t ids_row_stride,
                        ep_stage_fn stage_fn, void *user);

/* Announces experts that the layer's next ep_pool_stage or ep_pool_request call is
 * likely to need (e.g. predicted by that layer's router from the previous layer's
 * input) and starts reading those not ready in a slot into read buffers, without
 * waiting (with the pread fallback the reads happen in this call); no slot changes.
 * The reads proceed while the engine computes the previous layer; the stage call hands
 * their bytes over instead of reading them again, and a request fills its misses
 * among them from them. Replaces the previous announcement (of any layer); the stage
 * call or request releases announced experts it did not need. A hint: the bytes
 * handed over or filled are the file's either way. *out_n (may be NULL) gets the
 * number of experts whose reads started. */
ep_status ep_pool_stage_ahead(ep_pool *pool, int32_t layer, const int32_t *experts,
                              size_t n, uint32_t *out_n);

/* Starts fills of the given experts of a layer without waiting (io_uring; with the
 * pread fallback the reads happen in this call). Experts already resident or in flight
 * are skipped. A prefetch never evicts an expert held by the layer's latest request
 * nor a slot being filled. A later request needing an expert in flight waits for it
 * instead of reading it again. *out_started (may be NULL) gets the number of fills
 * started. Returns EP_DROPPED if some hints were dropped. */
ep_status ep_pool_prefetch(ep_pool *pool, int32_t layer, const int32_t *experts,
                           size_t n, uint32_t *out_started);

/* Copies completed reads into their slots; never waits. Optional: requests and
 * prefetches do it too. */
ep_status ep_pool_poll(ep_pool *pool);

/* Copies the counters of one layer (layer >= 0) or the sum of all layers (layer < 0)
 * into *out. */
ep_status ep_pool_stats(ep_pool *pool, int32_t layer, ep_stats *out);

/* Writes the stats snapshot (the stats file's JSON) into buf (cap bytes, NUL-terminated
 * when cap > 0; buf may be NULL when cap is 0). *out_len (may be NULL) gets the JSON
 * length without the NUL; if it is >= cap the output was truncated: call again with a
 * larger buffer. */
ep_status ep_pool_stats_json(ep_pool *pool, char *buf, size_t cap, size_t *out_len);

/* Writes the stats file (EP_ERR_STATE if the pool has no stats_path) and the routing
 * trace (if configured) now. */
ep_status ep_pool_publish_stats(ep_pool *pool);

#ifdef __cplusplus
}
#endif

#endif /* EXPERT_POOL_H */
