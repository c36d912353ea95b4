/* C-side test of the expert pool ABI: built by ffi/tests/c_abi.rs against
 * ffi/include/expert_pool.h and libexpert_pool.a, then run with a test model file.
 * argv: model path, then per projection "offset:bytes" of layer 0 (n_experts experts).
 * Exits 0 only if every check passes; prints one line per failed check. */
#include "expert_pool.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int failures = 0;
#define CHECK(cond, ...)                                                  \
    do {                                                                  \
        if (!(cond)) {                                                    \
            failures++;                                                   \
            printf("FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);        \
            printf(__VA_ARGS__);                                          \
            printf(" (last error: %s)\n", ep_last_error());               \
        }                                                                 \
    } while (0)

#define N_EXPERTS 10
#define N_SLOTS 4
#define MAX_PROJ 3

static int n_proj;
static uint64_t offs[MAX_PROJ], bytes[MAX_PROJ];
static int model_fd;

/* The callback destination: one buffer per (proj, slot). */
static unsigned char *cb_mem[MAX_PROJ][N_SLOTS];
static int cb_calls;
static ep_pool *cb_pool;
static int cb_reentrant_status = 12345;

static void copy_cb(void *user, int32_t layer, int32_t proj, int32_t slot, const void *src,
                    size_t len) {
    CHECK(user == (void *)&cb_mem, "user pointer passed through");
    CHECK(layer == 1, "layer %d", layer);
    CHECK(proj >= 0 && proj < n_proj && slot >= 0 && slot < N_SLOTS, "proj %d slot %d", proj, slot);
    CHECK(len == bytes[proj], "len %zu", len);
    memcpy(cb_mem[proj][slot], src, len);
    cb_calls++;
    /* Calling back into the pool from a callback is refused, not a deadlock. */
    cb_reentrant_status = ep_pool_poll(cb_pool);
}

static int log_count;
static void log_cb(void *user, int32_t level, const char *msg) {
    (void)user;
    log_count++;
    printf("pool log [%d]: %s\n", level, msg);
}

static int expert_matches(const unsigned char *got, int proj, int expert) {
    unsigned char *want = malloc(bytes[proj]);
    ssize_t n = pread(model_fd, want, bytes[proj], (off_t)(offs[proj] + (uint64_t)expert * bytes[proj]));
    int ok = n == (ssize_t)bytes[proj] && memcmp(got, want, bytes[proj]) == 0;
    free(want);
    return ok;
}

int main(int argc, char **argv) {
    if (argc < 3 || argc - 2 > MAX_PROJ) {
        fprintf(stderr, "usage: smoke MODEL OFFSET:BYTES...\n");
        return 2;
    }
    n_proj = argc - 2;
    for (int p = 0; p < n_proj; p++) {
        unsigned long long o, b;
        if (sscanf(argv[2 + p], "%llu:%llu", &o, &b) != 2) return 2;
        offs[p] = o;
        bytes[p] = b;
    }
    model_fd = open(argv[1], O_RDONLY);
    if (model_fd < 0) return 2;

    CHECK(strlen(expert_pool_version()) > 0, "version");
    CHECK(strcmp(ep_status_name(EP_ERR_IO), "EP_ERR_IO") == 0, "status name");

    /* Errors without a pool. */
    ep_pool *pool = (ep_pool *)0x1;
    CHECK(ep_pool_new(NULL, NULL) == EP_ERR_INVALID_ARGUMENT, "NULL out");
    CHECK(strstr(ep_last_error(), "out") != NULL, "message names the argument");
    ep_pool_config cfg;
    ep_pool_config_init(&cfg);
    cfg.policy = 99;
    CHECK(ep_pool_new(&cfg, &pool) == EP_ERR_INVALID_ARGUMENT, "bad policy");
    CHECK(pool == NULL, "out cleared on failure");

    ep_pool_config_init(&cfg);
    cfg.log_fn = log_cb;
    char stats_path[4096];
    snprintf(stats_path, sizeof stats_path, "%s.stats.json", argv[1]);
    cfg.stats_path = stats_path;
    cfg.stats_interval_ms = 50;
    CHECK(ep_pool_new(&cfg, &pool) == EP_OK, "new");
    cb_pool = pool;

    int32_t file = -1;
    CHECK(ep_pool_add_file(pool, argv[1], &file) == EP_OK && file == 0, "add_file");
    int32_t file2 = -1;
    CHECK(ep_pool_add_fd(pool, model_fd, &file2) == EP_OK && file2 == 1, "add_fd");

    ep_proj_desc proj[MAX_PROJ];
    for (int p = 0; p < n_proj; p++) {
        proj[p].file = p % 2 ? file2 : file;
        proj[p].offset = offs[p];
        proj[p].expert_stride = bytes[p];
        proj[p].expert_bytes = bytes[p];
        proj[p].dst_base = NULL;
        proj[p].dst_slot_stride = 0;
    }
    /* Layer 0: pool-owned slot memory. */
    ep_layer_desc desc = {0, N_EXPERTS, N_SLOTS, (uint32_t)n_proj, proj, NULL, NULL};
    CHECK(ep_pool_add_layer(pool, &desc) == EP_OK, "add_layer 0");
    /* Layer 1: callback. */
    for (int p = 0; p < n_proj; p++)
        for (int s = 0; s < N_SLOTS; s++) cb_mem[p][s] = calloc(1, bytes[p]);
    desc.layer = 1;
    desc.copy_fn = copy_cb;
    desc.copy_user = (void *)&cb_mem;
    CHECK(ep_pool_add_layer(pool, &desc) == EP_OK, "add_layer 1");
    /* Layer 2: engine-owned memory. */
    unsigned char *eng[MAX_PROJ];
    ep_proj_desc proj2[MAX_PROJ];
    for (int p = 0; p < n_proj; p++) {
        proj2[p] = proj[p];
        proj2[p].dst_slot_stride = bytes[p] + 64;
        eng[p] = calloc(N_SLOTS, proj2[p].dst_slot_stride);
        proj2[p].dst_base = eng[p];
    }
    ep_layer_desc desc2 = {2, N_EXPERTS, N_SLOTS, (uint32_t)n_proj, proj2, NULL, NULL};
    CHECK(ep_pool_add_layer(pool, &desc2) == EP_OK, "add_layer 2");
    CHECK(ep_pool_add_layer(pool, &desc2) == EP_ERR_STATE, "duplicate layer");

    /* Two tokens, 2 experts each, ids strided like a ggml view (row stride 4 ids). */
    int32_t ids[8] = {7, 2, -1, -1, 2, 9, -1, -1};
    int32_t slots[4];
    for (int layer = 0; layer < 3; layer++) {
        for (int round = 0; round < 3; round++) {
            int st = ep_pool_request(pool, layer, ids, 2, 2, 4 * sizeof(int32_t), slots);
            CHECK(st == EP_OK, "request layer %d: %s", layer, ep_status_name(st));
            CHECK(slots[0] != slots[1] && slots[2] != slots[3], "distinct per token");
            CHECK(slots[1] == slots[2], "same expert, same slot");
            for (int j = 0; j < 4; j++) {
                int e = ids[(j / 2) * 4 + j % 2];
                for (int p = 0; p < n_proj; p++) {
                    const unsigned char *got;
                    if (layer == 0) {
                        void *base;
                        uint64_t stride;
                        CHECK(ep_pool_slot_memory(pool, 0, p, &base, &stride) == EP_OK, "slot memory");
                        got = (const unsigned char *)base + (size_t)slots[j] * stride;
                    } else if (layer == 1) {
                        got = cb_mem[p][slots[j]];
                    } else {
                        got = eng[p] + (size_t)slots[j] * proj2[p].dst_slot_stride;
                    }
                    CHECK(expert_matches(got, p, e), "layer %d expert %d proj %d bytes", layer, e, p);
                }
            }
            ids[0] = (ids[0] + 1) % N_EXPERTS == 2 || (ids[0] + 1) % N_EXPERTS == 9 ? 0 : (ids[0] + 1) % N_EXPERTS;
        }
    }
    CHECK(cb_calls > 0, "callback called");
    CHECK(cb_reentrant_status == EP_ERR_REENTRANT, "re-entrant call refused: %d", cb_reentrant_status);

    /* Prefetch then request: waits for the in-flight fill instead of reading twice. */
    int32_t pf[3] = {4, 5, 6};
    uint32_t started = 99;
    int st = ep_pool_prefetch(pool, 0, pf, 3, &started);
    CHECK(st == EP_OK || st == EP_DROPPED, "prefetch %d", st);
    CHECK(started <= 2, "prefetch never evicts the 2 held experts of 4 slots: started %u", started);
    CHECK(ep_pool_prefetch(pool, 0, NULL, 0, NULL) == EP_OK, "empty prefetch");
    int32_t two[2] = {4, 5};
    CHECK(ep_pool_request(pool, 0, two, 2, 1, 8, slots) == EP_OK, "request after prefetch");
    ep_stats s;
    CHECK(ep_pool_stats(pool, 0, &s) == EP_OK, "stats");
    CHECK(s.prefetch_issued == started, "issued %llu", (unsigned long long)s.prefetch_issued);
    CHECK(s.prefetch_useful == started, "useful %llu", (unsigned long long)s.prefetch_useful);
    CHECK(s.hits + s.inflight_hits + s.misses == 3 * 3 + 2, "distinct experts add up");

    /* Does not fit: 3 tokens x 2 distinct = 6 > 4. */
    int32_t six[6] = {0, 1, 2, 3, 4, 5};
    CHECK(ep_pool_request(pool, 0, six, 2, 3, 8, slots) == EP_DOES_NOT_FIT, "does not fit");
    CHECK(ep_pool_stats(pool, -1, &s) == EP_OK && s.does_not_fit == 1, "counted");
    int32_t bad[1] = {N_EXPERTS};
    CHECK(ep_pool_request(pool, 0, bad, 1, 1, 4, slots) == EP_ERR_INVALID_ARGUMENT, "bad id");
    CHECK(ep_pool_request(NULL, 0, bad, 1, 1, 4, slots) == EP_ERR_INVALID_ARGUMENT, "NULL pool");

    /* A started request: slots at once, each projection's bytes once its wait returns. */
    int32_t later[2] = {4, 6};
    uint32_t in_flight = 99;
    CHECK(ep_pool_request_start(pool, 2, later, 2, 1, 8, slots, &in_flight) == EP_OK, "request_start");
    CHECK(in_flight <= 2, "in flight %u", in_flight);
    for (int p = 0; p < n_proj; p++) {
        CHECK(ep_pool_request_wait(pool, 2, p) == EP_OK, "wait proj %d", p);
        for (int j = 0; j < 2; j++) {
            const unsigned char *got = eng[p] + (size_t)slots[j] * proj2[p].dst_slot_stride;
            CHECK(expert_matches(got, p, later[j]), "started expert %d proj %d bytes", later[j], p);
        }
    }
    CHECK(ep_pool_request_wait(pool, 2, -1) == EP_OK, "wait all");
    CHECK(ep_pool_request_wait(pool, 2, -1) == EP_ERR_STATE, "the request has ended");
    CHECK(ep_pool_request_start(pool, 2, later, 2, 1, 8, slots, &in_flight) == EP_OK && in_flight == 0,
          "all ready: nothing in flight (%u)", in_flight);
    CHECK(ep_pool_request_wait(pool, 2, n_proj) == EP_ERR_INVALID_ARGUMENT || n_proj == 0, "no such projection");

    /* Stage read-ahead: announced experts are read now; bad ids and NULL are refused. */
    int32_t ahead[2] = {7, 8};
    uint32_t n_ahead = 99;
    CHECK(ep_pool_stage_ahead(pool, 0, ahead, 2, &n_ahead) == EP_OK, "stage ahead");
    CHECK(n_ahead <= 2, "read ahead %u", n_ahead);
    CHECK(ep_pool_stage_ahead(pool, 0, bad, 1, NULL) == EP_ERR_INVALID_ARGUMENT, "stage ahead bad id");
    CHECK(ep_pool_stage_ahead(NULL, 0, ahead, 2, NULL) == EP_ERR_INVALID_ARGUMENT, "stage ahead NULL pool");
    CHECK(ep_pool_stage_ahead(pool, 0, NULL, 0, NULL) == EP_OK, "empty stage ahead");

    char json[16384];
    size_t len = 0;
    CHECK(ep_pool_stats_json(pool, json, sizeof json, &len) == EP_OK && len < sizeof json, "json");
    CHECK(strstr(json, "\"format\":\"expert-pool-stats\"") != NULL, "json format: %s", json);
    char tiny[8];
    CHECK(ep_pool_stats_json(pool, tiny, sizeof tiny, &len) == EP_OK && len >= sizeof tiny &&
              strlen(tiny) == sizeof tiny - 1, "truncated json is NUL-terminated");
    CHECK(ep_pool_publish_stats(pool) == EP_OK, "publish");
    ep_pool_delete(pool);
    ep_pool_delete(NULL);

    FILE *f = fopen(stats_path, "r");
    CHECK(f != NULL, "stats file written");
    if (f) {
        char buf[16384];
        size_t n = fread(buf, 1, sizeof buf - 1, f);
        buf[n] = 0;
        fclose(f);
        CHECK(strstr(buf, "\"does_not_fit\":1") != NULL, "final stats in the file");
        remove(stats_path);
    }
    printf("%s: %d failures\n", failures ? "FAILED" : "ok", failures);
    return failures ? 1 : 0;
}
