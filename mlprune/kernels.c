/* mlprune's compiled paths (mlprune/kernels.py builds and loads this file). */
#include <stdint.h>

/* Row r of the weights starts at w + r*ws0 and its column c is at + c*ws1 (elements). Row r
   of cols holds k column numbers (row stride cs0), row r of vals k values (row stride vs0).
   take: vals <- w at the columns, then w <- 0 there; a row is read whole before any of it is
   zeroed, so a column named twice saves its value twice (put then restores it exactly).
   put: w <- vals at the columns. */
#define LOOPS(W, C)                                                                         \
static void take_##W##_##C(W *restrict w, int64_t ws0, int64_t ws1, const C *restrict cols, int64_t cs0, \
                           int64_t k, int64_t r0, int64_t r1, W *restrict vals, int64_t vs0) { \
    for (int64_t r = r0; r < r1; r++) {                                                     \
        W *row = w + r * ws0; const C *c = cols + r * cs0; W *v = vals + r * vs0;           \
        for (int64_t j = 0; j < k; j++) v[j] = row[(int64_t)c[j] * ws1];                   \
        for (int64_t j = 0; j < k; j++) row[(int64_t)c[j] * ws1] = 0;                      \
    }                                                                                       \
}                                                                                           \
static void put_##W##_##C(W *w, int64_t ws0, int64_t ws1, const C *cols, int64_t cs0,      \
                          int64_t k, int64_t r0, int64_t r1, const W *vals, int64_t vs0) {  \
    for (int64_t r = r0; r < r1; r++) {                                                     \
        W *row = w + r * ws0; const C *c = cols + r * cs0; const W *v = vals + r * vs0;     \
        for (int64_t j = 0; j < k; j++) row[(int64_t)c[j] * ws1] = v[j];                    \
    }                                                                                       \
}

#define FOR_COLS(W) LOOPS(W, int16_t) LOOPS(W, int32_t) LOOPS(W, int64_t)
FOR_COLS(uint16_t) FOR_COLS(uint32_t) FOR_COLS(uint64_t)

/* 1 when every column of rows r0..r1 is in 0..n-1: a min and max in the columns' own type
   (no early exit, so the loop vectorises; it reads the columns once, in order). */
#define IN_RANGE(C)                                                                          \
static int in_range_##C(const C *cols, int64_t cs0, int64_t k, int64_t r0, int64_t r1, int64_t n) { \
    C lo = 0, hi = 0;                                                                        \
    for (int64_t r = r0; r < r1; r++) {                                                      \
        const C *c = cols + r * cs0;                                                         \
        for (int64_t j = 0; j < k; j++) { C x = c[j]; lo = x < lo ? x : lo; hi = x > hi ? x : hi; } \
    }                                                                                        \
    return lo >= 0 && (int64_t)hi < n;                                                       \
}
IN_RANGE(int16_t) IN_RANGE(int32_t) IN_RANGE(int64_t)

#define CALL(op, W, C) op##_##W##_##C((W *)w, ws0, ws1, (const C *)cols, cs0, k, r0, r1, (W *)vals, vs0)
#define BY_COLS(op, W)                                        \
    switch (cs) {                                             \
        case 2: CALL(op, W, int16_t); return 0;               \
        case 4: CALL(op, W, int32_t); return 0;               \
        case 8: CALL(op, W, int64_t); return 0;               \
    }                                                         \
    return -1;

/* es, cs: bytes per weight and per column number; the weights are rows x n_cols. Checks its
   own bounds before it moves anything: returns 0, -1 for sizes it lacks, -2 for rows outside
   the weights and -3 for a column outside them (nothing moved for either). */
int mlprune_move(int put, void *w, int es, int64_t ws0, int64_t ws1, int64_t rows, int64_t n_cols,
                 const void *cols, int cs, int64_t cs0, int64_t k, int64_t r0, int64_t r1,
                 void *vals, int64_t vs0) {
    if (r0 < 0 || r1 < r0 || r1 > rows || k < 0) return -2;
    if (es != 2 && es != 4 && es != 8) return -1;
    int ok;
    switch (cs) {
        case 2: ok = in_range_int16_t((const int16_t *)cols, cs0, k, r0, r1, n_cols); break;
        case 4: ok = in_range_int32_t((const int32_t *)cols, cs0, k, r0, r1, n_cols); break;
        case 8: ok = in_range_int64_t((const int64_t *)cols, cs0, k, r0, r1, n_cols); break;
        default: return -1;
    }
    if (!ok) return -3;
    if (es == 2) { if (put) { BY_COLS(put, uint16_t) } else { BY_COLS(take, uint16_t) } }
    if (es == 4) { if (put) { BY_COLS(put, uint32_t) } else { BY_COLS(take, uint32_t) } }
    if (es == 8) { if (put) { BY_COLS(put, uint64_t) } else { BY_COLS(take, uint64_t) } }
    return -1;
}

/* ---- few-row matmuls: out[r, j] = sum_i w[j, i] * x[r, i] for m <= 16 rows (decoding).
   Each weight row is read from memory once, by one of `parts` threads (this one and
   helpers it starts once and keeps), in blocks of 4 weight rows by 4 input rows, fp32.
   (bf16 weights widened in registers measured slower than torch's bf16 GEMM from 8 rows
   and rounded differently; torch keeps them.) Vector code for AVX-512, AVX2 or plain x86-64,
   chosen at load time (target_clones), so a cached library runs on any x86-64 CPU. */
#include <string.h>
#include <pthread.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__ELF__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif
#if defined(__x86_64__) || defined(__i386__)
#define PAUSE() __builtin_ia32_pause()
#elif defined(__aarch64__)
#define PAUSE() __asm__ volatile("yield")
#else
#define PAUSE() ((void)0)
#endif
#define INLINE static inline __attribute__((always_inline))
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"  /* 64-byte vectors between inlined helpers only */
#endif
typedef float v16 __attribute__((vector_size(64)));
typedef float v8 __attribute__((vector_size(32)));
typedef float v4 __attribute__((vector_size(16)));

INLINE v16 vec_f32(const float *p) { v16 v; memcpy(&v, p, 64); return v; }
INLINE float one_f32(const float *p) { return *p; }
INLINE float hsum(const v16 *p) {
    v16 v = *p;
    v8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
    return (b[0] + b[2]) + (b[1] + b[3]);
}

#define BLOCK(W, T, RW, RX)                                                                 \
INLINE void block_##T##_##RW##_##RX(const W *w, int64_t ws, const float *x, int64_t xs,      \
                                    int64_t k, float *out, int64_t os) {                    \
    v16 acc[RW][RX];                                                                        \
    for (int a = 0; a < RW; a++) for (int b = 0; b < RX; b++) acc[a][b] = (v16){0};          \
    int64_t i = 0;                                                                          \
    for (; i + 16 <= k; i += 16) {                                                          \
        v16 xv[RX];                                                                         \
        for (int b = 0; b < RX; b++) xv[b] = vec_f32(x + b * xs + i);                        \
        for (int a = 0; a < RW; a++) {                                                      \
            v16 wv = vec_##T(w + a * ws + i);                                               \
            for (int b = 0; b < RX; b++) acc[a][b] += wv * xv[b];                           \
        }                                                                                   \
    }                                                                                       \
    for (int a = 0; a < RW; a++)                                                            \
        for (int b = 0; b < RX; b++) {                                                      \
            float s = hsum(&acc[a][b]);                                                      \
            for (int64_t t = i; t < k; t++) s += one_##T(w + a * ws + t) * x[b * xs + t];   \
            out[b * os + a] = s;                                                            \
        }                                                                                   \
}
#define RANGE(W, T)                                                                         \
BLOCK(W, T, 4, 1) BLOCK(W, T, 4, 4) BLOCK(W, T, 1, 1) BLOCK(W, T, 1, 4)                      \
CLONES static void range_##T(const W *w, int64_t ws, const float *x, int64_t xs, int64_t m,  \
                             int64_t k, float *out, int64_t os, int64_t j0, int64_t j1) {    \
    int64_t j = j0;                                                                         \
    for (; j + 4 <= j1; j += 4) {                                                           \
        int64_t r = 0;                                                                      \
        for (; r + 4 <= m; r += 4) block_##T##_4_4(w + j * ws, ws, x + r * xs, xs, k, out + r * os + j, os); \
        for (; r < m; r++) block_##T##_4_1(w + j * ws, ws, x + r * xs, xs, k, out + r * os + j, os); \
    }                                                                                       \
    for (; j < j1; j++) {                                                                   \
        int64_t r = 0;                                                                      \
        for (; r + 4 <= m; r += 4) block_##T##_1_4(w + j * ws, ws, x + r * xs, xs, k, out + r * os + j, os); \
        for (; r < m; r++) block_##T##_1_1(w + j * ws, ws, x + r * xs, xs, k, out + r * os + j, os); \
    }                                                                                       \
}
RANGE(float, f32)

typedef struct { const float *w; int64_t ws; const float *x; int64_t xs, m, k; float *out; int64_t os, n, parts; } job_t;
#define MAX_HELPERS 31
#define SPIN_NS 100000  /* a helper spins this long for the next job (the next linear of a step), then sleeps */
static job_t job;
static pthread_mutex_t busy = PTHREAD_MUTEX_INITIALIZER;  /* one caller at a time; others run alone */
static pthread_mutex_t sleep_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static atomic_long posted;  /* the number of the latest job */
static atomic_int pending;  /* helpers' parts of it not yet done */
static long first_job[MAX_HELPERS + 1];  /* the job number when each helper was made */
static int helpers;
static pid_t owner;  /* helpers do not survive a fork: a child starts its own */

static void run_part(const job_t *jb, int64_t p) {
    int64_t blocks = (jb->n + 3) / 4, j0 = blocks * p / jb->parts * 4, j1 = blocks * (p + 1) / jb->parts * 4;
    if (j1 > jb->n) j1 = jb->n;
    range_f32(jb->w, jb->ws, jb->x, jb->xs, jb->m, jb->k, jb->out, jb->os, j0, j1);
}

static int64_t now_ns(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec * 1000000000LL + t.tv_nsec; }

static void *helper(void *arg) {
    int64_t index = (int64_t)(intptr_t)arg;
    long seen = first_job[index];  /* not read from `posted`: a job may be posted before it runs */
    for (;;) {
        int64_t start = now_ns();
        long next;
        while ((next = atomic_load_explicit(&posted, memory_order_acquire)) == seen) {
            if (now_ns() - start > SPIN_NS) {
                pthread_mutex_lock(&sleep_lock);
                while ((next = atomic_load(&posted)) == seen) pthread_cond_wait(&wake, &sleep_lock);
                pthread_mutex_unlock(&sleep_lock);
                break;
            }
            PAUSE();
        }
        seen = next;
        if (index < job.parts) run_part(&job, index);
        atomic_fetch_sub_explicit(&pending, 1, memory_order_release);
    }
    return NULL;
}

/* The few-row product over `threads` threads (1: this one alone). Returns 0. */
int mlprune_few_rows(const float *w, int64_t ws, const float *x, int64_t xs, int64_t m,
                     int64_t k, float *out, int64_t os, int64_t n, int threads) {
    job_t mine = {w, ws, x, xs, m, k, out, os, n, 1};
    if (threads <= 1 || pthread_mutex_trylock(&busy) != 0) { run_part(&mine, 0); return 0; }
    if (owner != getpid()) {  /* first call, or a forked child: no helpers, and locks a parent's helper may have held */
        pthread_mutex_t fresh_lock = PTHREAD_MUTEX_INITIALIZER;
        pthread_cond_t fresh_wake = PTHREAD_COND_INITIALIZER;
        sleep_lock = fresh_lock;
        wake = fresh_wake;
        owner = getpid();
        helpers = 0;
    }
    while (helpers < threads - 1 && helpers < MAX_HELPERS) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        first_job[helpers + 1] = atomic_load(&posted);
        int failed = pthread_create(&t, &attr, helper, (void *)(intptr_t)(helpers + 1));
        pthread_attr_destroy(&attr);
        if (failed) break;
        helpers++;
    }
    mine.parts = helpers + 1;  /* every helper takes part (an extra one gets its share) */
    job = mine;
    atomic_store_explicit(&pending, helpers, memory_order_relaxed);
    pthread_mutex_lock(&sleep_lock);
    atomic_fetch_add_explicit(&posted, 1, memory_order_release);
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&sleep_lock);
    run_part(&mine, 0);
    while (atomic_load_explicit(&pending, memory_order_acquire) > 0) PAUSE();
    pthread_mutex_unlock(&busy);
    return 0;
}
