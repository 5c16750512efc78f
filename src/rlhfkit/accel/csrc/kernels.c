/* Float32 CPU kernels of our own, built at first use by rlhfkit/accel/native.py (with -fopenmp:
   loaded after torch, the OpenMP runtime it links is torch's own, so the loops below run on torch's
   threads):
   - GPT-2's tanh-GELU and its derivative (accel/activations.py), on contiguous arrays or on rows
     of a strided (d0, d1, n) view such as a micro-batch's rows of a time-major record;
   - the epilogues of a decode step's linear layers (accel/fastdecode.py): the bias added in place to
     a product written without it, fused with what reads it next (the GELU, the KV-cache writes, the
     residual add), one pass instead of torch's two or three small ops;
   - GPT-2's whole decode step in one call, and plain sampling in one pass (further down);
   - one-pass reductions where torch takes several passes or calls: the gradient norm over every
     parameter, the log-probabilities of given tokens and their logits' gradient;
   - the attention of a training pass, forward and backward, read from and written into the q|k|v
     projection's layout (at the end).

   The GELU:

   gelu(x) = 0.5 x (1 + tanh(u)) = x / (1 + e^(-2u)),   u = sqrt(2 / pi) (x + 0.044715 x^3)
   gelu'(x) = p + x p (1 - p) du2/dx,                    p = 1 / (1 + e^(-2u)),  du2/dx = d(2u)/dx

   Why: torch's own kernel evaluates tanh with a slow, exact routine; this one is a polynomial e^y that
   the compiler vectorises, about 4x faster forward and backward, within 2e-7 of the float64 values
   (tests/test_activations.py). */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* e^y for y clamped to [-40, 40] (so that (1 + e^y)^2 stays a finite float): 2^k e^r with
   r = y - k ln 2 in [-ln2/2, ln2/2] and e^r = 1 + r + r^2 P(r), P fitted by weighted least squares
   (relative error 4e-9 in exact arithmetic). */
static inline float exp_clamped(float y) {
    y = y < -40.0f ? -40.0f : y;
    y = y > 40.0f ? 40.0f : y;
    float k = __builtin_rintf(y * 1.4426950408889634f);
    float r = y - k * 0.693145751953125f - k * 1.4286068203094172e-06f; /* ln 2 in two parts */
    float p = 1.3751408500e-03f;
    p = p * r + 8.3689218132e-03f;
    p = p * r + 4.1669533680e-02f;
    p = p * r + 1.6666518415e-01f;
    p = p * r + 4.9999988591e-01f;
    p = p * r * r + r + 1.0f;
    int32_t bits = ((int32_t)k + 127) << 23; /* 2^k */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#define TWO_C 1.5957691216057308f /* 2 sqrt(2 / pi) */
#define A 0.044715f
#define CUT 20.0f /* past +-CUT gelu is x or 0 and gelu' 1 or 0 in float (|e^-2u| < 1e-260); the
                     clamped exponential would leave x^3-sized terms there */
#define BLOCK 4096 /* elements per task: a parallel loop over blocks, a vector loop inside */

static void forward_block(const float *x, float *y, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        float v = x[i];
        float g = v / (1.0f + exp_clamped(-TWO_C * (v + A * v * v * v)));
        y[i] = v < -CUT ? 0.0f * v : g; /* -0 (and NaN at -inf), as 0.5 x (1 + tanh u) rounds */
    }
}

/* gelu'(v), and p = 1 / (1 + e^(-2u)) into *p (gelu(v) = v p): the derivative's pieces, shared by the
   kernels that need the slope. */
static inline float gelu_slope(float v, float *p_out) {
    float v2 = v * v;
    float q = exp_clamped(-TWO_C * (v + A * v2 * v));
    float p = 1.0f / (1.0f + q);
    float one_minus_p = q * p; /* no cancellation when p is near 1 */
    float d = p + v * TWO_C * (1.0f + 3.0f * A * v2) * (p * one_minus_p);
    d = v > CUT ? 1.0f : d;
    *p_out = p;
    return v < -CUT ? 0.0f : d;
}

static void backward_block(const float *dy, const float *x, float *dx, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        float p;
        dx[i] = dy[i] * gelu_slope(x[i], &p);
    }
}

/* y = gelu(x); y may be x. */
void rlhfkit_gelu_tanh(const float *x, float *y, int64_t n) {
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) if (blocks > 1)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t lo = b * BLOCK;
        forward_block(x + lo, y + lo, n - lo < BLOCK ? n - lo : BLOCK);
    }
}

/* dx = dy * gelu'(x); dx may be dy. */
void rlhfkit_gelu_tanh_backward(const float *dy, const float *x, float *dx, int64_t n) {
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
#pragma omp parallel for schedule(static) if (blocks > 1)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t lo = b * BLOCK;
        backward_block(dy + lo, x + lo, dx + lo, n - lo < BLOCK ? n - lo : BLOCK);
    }
}

/* The rows of a (d0, d1, n) view of x with strides (s0, s1, 1), in a parallel loop over rows. */
#define ROW(r) (x + ((r) / d1) * s0 + ((r) % d1) * s1)

/* y (d0 * d1 * n, contiguous) = gelu(x (d0, d1, n) at strides (s0, s1, 1)). */
void rlhfkit_gelu_tanh_strided(const float *x, int64_t d0, int64_t d1, int64_t n, int64_t s0, int64_t s1,
                               float *y) {
    int64_t rows = d0 * d1;
#pragma omp parallel for schedule(static) if (rows * n > BLOCK)
    for (int64_t r = 0; r < rows; r++)
        forward_block(ROW(r), y + r * n, n);
}

/* dx (contiguous, may be dy) = dy (contiguous) * gelu'(x (d0, d1, n) at strides (s0, s1, 1)). */
void rlhfkit_gelu_tanh_backward_strided(const float *dy, const float *x, int64_t d0, int64_t d1, int64_t n,
                                        int64_t s0, int64_t s1, float *dx) {
    int64_t rows = d0 * d1;
#pragma omp parallel for schedule(static) if (rows * n > BLOCK)
    for (int64_t r = 0; r < rows; r++)
        backward_block(dy + r * n, ROW(r), dx + r * n, n);
}

/* g = gelu(x) and dg *= gelu'(x) in one pass over x (one exponential for both): the backward of the
   MLP's down-projection in replay, which needs the activation for the weight's gradient after the
   input's gradient dg = dy W^T is known. x a strided (d0, d1, n) view as above, dg and g contiguous. */
void rlhfkit_gelu_tanh_and_backward_strided(const float *x, int64_t d0, int64_t d1, int64_t n, int64_t s0,
                                            int64_t s1, float *dg, float *g) {
    int64_t rows = d0 * d1;
#pragma omp parallel for schedule(static) if (rows * n > BLOCK)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = ROW(r);
        float *dr = dg + r * n, *gr = g + r * n;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) {
            float v = xr[i], p;
            dr[i] *= gelu_slope(v, &p);
            gr[i] = v < -CUT ? 0.0f * v : v * p;
        }
    }
}

/* dx = dy * gelu'(x) (all (rows, n), contiguous) and colsum = dx summed over the rows (n): the backward of
   a linear layer's bias + GELU, whose bias gradient is that sum, in one pass instead of two. Each thread
   sums its rows, then the threads' sums are added. */
void rlhfkit_gelu_tanh_backward_colsum(const float *dy, const float *x, float *dx, int64_t rows, int64_t n,
                                       float *colsum) {
    int nt = omp_get_max_threads();
    float *part = calloc((size_t)nt * (size_t)n, sizeof(float));
    if (part == NULL) { /* no memory for the threads' sums: one thread's, as the pass goes */
        nt = 1;
        part = colsum;
        memset(colsum, 0, (size_t)n * sizeof(float));
    }
#pragma omp parallel num_threads(nt)
    {
        float *p = part + (int64_t)omp_get_thread_num() * n;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            backward_block(dy + r * n, x + r * n, dx + r * n, n);
#pragma omp simd
            for (int64_t i = 0; i < n; i++)
                p[i] += dx[r * n + i];
        }
    }
    if (part == colsum)
        return;
    for (int64_t i = 0; i < n; i++) {
        float t = 0.0f;
        for (int k = 0; k < nt; k++)
            t += part[(int64_t)k * n + i];
        colsum[i] = t;
    }
    free(part);
}

/* Decode-step epilogues. y is a (rows, n) product x @ W written without its bias b (n); each adds b to
   y in place (y is then what addmm would have given, and what the record keeps) and fuses the next use. */

static inline void add_bias(float *y, const float *b, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++)
        y[i] += b[i];
}

/* y += b; g = gelu(y)  (GPT-2's MLP up-projection and its activation) */
void rlhfkit_bias_gelu_tanh(float *y, const float *b, float *g, int64_t rows, int64_t n) {
#pragma omp parallel for schedule(static) if (rows * n > BLOCK)
    for (int64_t r = 0; r < rows; r++) {
        add_bias(y + r * n, b, n);
        forward_block(y + r * n, g + r * n, n);
    }
}

/* y += b; k[r] = y[r, off : off + m]; v[r] = y[r, off + m : off + 2m]  (the attention's q|k|v
   projection, and this step's keys and values into their (rows, m) cache blocks) */
void rlhfkit_bias_kv(float *y, const float *b, int64_t rows, int64_t n, int64_t off, int64_t m, float *k,
                     float *v) {
#pragma omp parallel for schedule(static) if (rows * n > BLOCK)
    for (int64_t r = 0; r < rows; r++) {
        float *yr = y + r * n;
        add_bias(yr, b, n);
        memcpy(k + r * m, yr + off, m * sizeof(float));
        memcpy(v + r * m, yr + off + m, m * sizeof(float));
    }
}

/* y += b; x += y  (an output projection and the residual stream x, both (rows, n)) */
void rlhfkit_bias_residual(float *y, const float *b, float *x, int64_t rows, int64_t n) {
#pragma omp parallel for schedule(static) if (rows * n > BLOCK)
    for (int64_t r = 0; r < rows; r++) {
        float *yr = y + r * n, *xr = x + r * n;
        add_bias(yr, b, n);
#pragma omp simd
        for (int64_t i = 0; i < n; i++)
            xr[i] += yr[i];
    }
}

/* A whole GPT-2 decode step in one call (accel/fastdecode.py, GPT2Decoder._c_step): the embeddings, every
   block and the final norm, then the LM head, for one new token per row. The matmuls are the BLAS sgemm
   that torch's own mm calls (its address is handed in: `sgemm`), the rest is ours: layer norms, the bias
   epilogues above, and the attention of one query per row over the KV cache (scores, softmax and the
   weighted sum of values in one pass per row and head). What it saves is per-op work, not arithmetic:
   about 70 torch calls per step from Python, each a few microseconds of dispatch and a parallel region. */

typedef void (*sgemm_fn)(const char *ta, const char *tb, const int *m, const int *n, const int *k,
                         const float *alpha, const float *a, const int *lda, const float *b, const int *ldb,
                         const float *beta, float *c, const int *ldc);

struct gpt2_layer {
    const float *ln1_w, *ln1_b, *attn_w, *attn_b, *proj_w, *proj_b; /* Conv1D weights: (in, out) */
    const float *ln2_w, *ln2_b, *fc_w, *fc_b, *mproj_w, *mproj_b;
    double eps1, eps2;
    float *rec[4]; /* the record's (n, B, width_j) outputs of this layer's linears, or NULL */
    float *rec_o, *rec_lse; /* the record's (n, B, D) attention outputs and (n, B, H) log-sum-exps, or NULL */
};

struct gpt2_step {
    int64_t B, D, H, hd, F, V, T, L; /* rows, width, heads, head width, MLP width, vocab, cache slots, layers */
    const float *wte, *wpe, *lnf_w, *lnf_b;
    double eps_f;
    const float *head_w, *head_b;    /* (V, D) and (V,) or NULL */
    float *KV;                       /* (L, T, 2, B, H, hd) */
    const unsigned char *key_ok;     /* (B, T): keys a row may attend to; NULL: all */
    float *x, *h, *o, *g, *scores;   /* scratch: (B, D) x3, (B, F), (B * H, T) */
    float *scr[4];                   /* scratch outputs of unrecorded linears: (B, width_j) */
    sgemm_fn sgemm;
    int64_t split_cols;              /* 1: each thread multiplies its share of the columns (mm_cols) */
    const struct gpt2_layer *layer;  /* L of them */
};

/* c (rows, n) = a (rows, k) @ op(w), all row-major, through the column-major sgemm of the transposes:
   op(w) = w (k, n) if !wt, else w^T for w stored (n, k). The sizes live in 64-bit integers whose addresses
   go to sgemm as int pointers: an LP64 BLAS reads their low halves and an ILP64 one the whole, the same
   values either way on a little-endian machine. Also exported (rlhfkit_mm_rows) so that native.py can
   check the sgemm it found on a small product before any decode step uses it. */
static void mm_block(sgemm_fn sgemm, const float *a, const float *w, float *c, int64_t rows, int64_t k, int64_t n,
                     int wt, int64_t lo, int64_t hi) { /* columns lo..hi of c only */
    int64_t m_ = hi - lo, n_ = rows, k_ = k, ldw = wt ? k : n, ldc = n;
    float one = 1.0f, zero = 0.0f;
    sgemm(wt ? "T" : "N", "N", (const int *)&m_, (const int *)&n_, (const int *)&k_, &one, wt ? w + lo * k : w + lo,
          (const int *)&ldw, a, (const int *)&k_, &zero, c + lo, (const int *)&ldc);
}

void rlhfkit_mm_rows(sgemm_fn sgemm, const float *a, const float *w, float *c, int64_t rows, int64_t k, int64_t n,
                     int wt) {
    mm_block(sgemm, a, w, c, rows, k, n, wt, 0, n);
}

/* As rlhfkit_mm_rows, with the columns of c split between torch's threads, each calling sgemm on its
   share (a BLAS called inside a parallel region runs on the calling thread only). */
static void mm_cols(sgemm_fn sgemm, const float *a, const float *w, float *c, int64_t rows, int64_t k, int64_t n,
                    int wt) {
#pragma omp parallel
    {
        int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
        int64_t lo = (n * t / nt) & ~(int64_t)15, hi = t == nt - 1 ? n : (n * (t + 1) / nt) & ~(int64_t)15;
        if (hi > lo)
            mm_block(sgemm, a, w, c, rows, k, n, wt, lo, hi);
    }
}

static void step_mm(const struct gpt2_step *s, const float *a, const float *w, float *c, int64_t rows, int64_t k,
                    int64_t n, int wt) {
    if (s->split_cols)
        mm_cols(s->sgemm, a, w, c, rows, k, n, wt);
    else
        rlhfkit_mm_rows(s->sgemm, a, w, c, rows, k, n, wt);
}

static void layer_norm_rows(const float *x, const float *w, const float *b, double eps, float *y, int64_t rows,
                            int64_t n) {
#pragma omp parallel for schedule(static) if (rows * n > BLOCK)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * n;
        float *yr = y + r * n;
        float sum = 0.0f, sq = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < n; i++)
            sum += xr[i];
        float mean = sum / (float)n;
#pragma omp simd reduction(+ : sq)
        for (int64_t i = 0; i < n; i++)
            sq += (xr[i] - mean) * (xr[i] - mean);
        float rstd = 1.0f / __builtin_sqrtf(sq / (float)n + (float)eps);
#pragma omp simd
        for (int64_t i = 0; i < n; i++)
            yr[i] = (xr[i] - mean) * rstd * w[i] + b[i];
    }
}

/* o[b, h] = softmax(q[b, h] . K[0..t] / sqrt(hd)) V[0..t] for every row b and head h; q rows of qkv
   (B, 3D) (biased), K and V this layer's time-major cache blocks. A task is one row, all its heads: a
   slot's keys (and values) of one row are then D contiguous floats, where one head's are hd. Decoding
   reads the whole cache every step; a slot is 2 B D floats from the next, a stride no hardware prefetcher
   follows, so the loops prefetch PREFETCH slots ahead. */
#define PREFETCH 8
static inline void prefetch_ahead(const float *row, int64_t j, int64_t t, int64_t slot, int64_t D) {
    if (j + PREFETCH <= t) /* the same row's D floats PREFETCH slots on */
        for (int64_t l = 0; l < D; l += 16)
            __builtin_prefetch(row + PREFETCH * slot + l);
}

static void attend_cached(const struct gpt2_step *a, const float *qkv, const float *K, const float *Vv,
                          int64_t t, float *out, float *lse) { /* out (B, D); lse (B, H) or NULL */
    const int64_t B = a->B, H = a->H, hd = a->hd, D = a->D, T = a->T, slot = 2 * B * H * hd;
    const float scale = 1.0f / __builtin_sqrtf((float)hd);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < B; b++) {
        const float *q = qkv + b * 3 * D;
        const unsigned char *ok = a->key_ok ? a->key_ok + b * T : NULL;
        float *s = a->scores + b * H * T;
        for (int64_t j = 0; j <= t; j++) {
            const float *k = K + j * slot + b * D;
            prefetch_ahead(k, j, t, slot, D);
            for (int64_t h = 0; h < H; h++) {
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < hd; d++)
                    dot += q[h * hd + d] * k[h * hd + d];
                s[h * T + j] = (ok && !ok[j]) ? -__builtin_inff() : dot * scale;
            }
        }
        float total[H];
        for (int64_t h = 0; h < H; h++) {
            float peak = -__builtin_inff(), sum = 0.0f;
            for (int64_t j = 0; j <= t; j++)
                peak = s[h * T + j] > peak ? s[h * T + j] : peak;
            for (int64_t j = 0; j <= t; j++) {
                float e = (ok && !ok[j]) ? 0.0f : exp_clamped(s[h * T + j] - peak);
                s[h * T + j] = e;
                sum += e;
            }
            total[h] = sum;
            if (lse != NULL)
                lse[b * H + h] = peak + __builtin_logf(sum);
        }
        float *o = out + b * D;
        for (int64_t d = 0; d < D; d++)
            o[d] = 0.0f;
        for (int64_t j = 0; j <= t; j++) {
            const float *v = Vv + j * slot + b * D;
            prefetch_ahead(v, j, t, slot, D);
            for (int64_t h = 0; h < H; h++) {
                float p = s[h * T + j];
#pragma omp simd
                for (int64_t d = 0; d < hd; d++)
                    o[h * hd + d] += p * v[h * hd + d];
            }
        }
        for (int64_t h = 0; h < H; h++) {
            float inv = 1.0f / total[h];
            for (int64_t d = 0; d < hd; d++)
                o[h * hd + d] *= inv;
        }
    }
}

/* One step: tokens (B,) at positions pos (B,) into cache slot t; the record's step s (if s >= 0 its
   buffers get this step's outputs); logits (B, V) out. */
void rlhfkit_gpt2_step(const struct gpt2_step *a, const int64_t *tokens, const int64_t *pos, int64_t t,
                       int64_t s, float *logits) {
    const int64_t B = a->B, D = a->D, F = a->F, T = a->T;
    const int64_t width[4] = {3 * D, D, F, D};
    float *x = a->x;
#pragma omp parallel for schedule(static) if (B * D > BLOCK)
    for (int64_t b = 0; b < B; b++) {
        const float *e = a->wte + tokens[b] * D, *p = a->wpe + pos[b] * D;
#pragma omp simd
        for (int64_t i = 0; i < D; i++)
            x[b * D + i] = e[i] + p[i];
    }
    for (int64_t i = 0; i < a->L; i++) {
        const struct gpt2_layer *l = a->layer + i;
        float *out[4];
        for (int j = 0; j < 4; j++)
            out[j] = (l->rec[j] && s >= 0) ? l->rec[j] + s * B * width[j] : a->scr[j];
        float *K = a->KV + (i * T) * 2 * B * D, *Vv = K + B * D; /* slot 0 of layer i */
        layer_norm_rows(x, l->ln1_w, l->ln1_b, l->eps1, a->h, B, D);
        step_mm(a, a->h, l->attn_w, out[0], B, D, 3 * D, 0);
        rlhfkit_bias_kv(out[0], l->attn_b, B, 3 * D, D, D, K + t * 2 * B * D, Vv + t * 2 * B * D);
        float *o = (l->rec_o && s >= 0) ? l->rec_o + s * B * D : a->o;
        attend_cached(a, out[0], K, Vv, t, o, (l->rec_lse && s >= 0) ? l->rec_lse + s * B * a->H : NULL);
        step_mm(a, o, l->proj_w, out[1], B, D, D, 0);
        rlhfkit_bias_residual(out[1], l->proj_b, x, B, D);
        layer_norm_rows(x, l->ln2_w, l->ln2_b, l->eps2, a->h, B, D);
        step_mm(a, a->h, l->fc_w, out[2], B, D, F, 0);
        rlhfkit_bias_gelu_tanh(out[2], l->fc_b, a->g, B, F);
        step_mm(a, a->g, l->mproj_w, out[3], B, F, D, 0);
        rlhfkit_bias_residual(out[3], l->mproj_b, x, B, D);
    }
    layer_norm_rows(x, a->lnf_w, a->lnf_b, a->eps_f, a->h, B, D);
    step_mm(a, a->h, a->head_w, logits, B, D, a->V, 1); /* logits = h head_w^T */
    if (a->head_b)
        for (int64_t b = 0; b < B; b++)
            add_bias(logits + b * a->V, a->head_b, a->V);
}

/* Plain sampling (no top-k / top-p) of one token per row of logits (B, V), by inverting the CDF of
   softmax(logits / temperature) at u[b] (in [0, 1)), as rollout.sample_next does with torch's ops: the
   token is the first index whose running sum of the unnormalised weights exceeds u[b] times their total,
   the running sum accumulated in double and compared as a float (torch's cumsum and searchsorted), by
   blocks of 16 first. u[b] is at u + b * u_stride. Out, each (B,): the tokens, their log-probabilities,
   log Z and the entropy. `divide` is a constant in each call below, so the compiler makes a copy of the
   row loop without the division for temperature 1. */
#define SCALED(x) (divide ? (x) / temperature : (x))

/* The first index whose running sum exceeds target, or -1 (then *end is the whole row's sum). */
static inline int64_t cdf_search(const float *x, int64_t V, float temperature, int divide, float peak,
                                 float target, double *end) {
    double run = 0.0;
    int64_t i = 0;
    for (; i + 16 <= V; i += 16) {
        float part = 0.0f;
#pragma omp simd reduction(+ : part)
        for (int64_t j = i; j < i + 16; j++)
            part += exp_clamped(SCALED(x[j]) - peak);
        if ((float)(run + part) > target)
            break;
        run += part;
    }
    for (; i < V; i++) {
        run += (double)exp_clamped(SCALED(x[i]) - peak);
        if ((float)run > target)
            return i;
    }
    *end = run;
    return -1;
}

static inline void sample_row(const float *x, int64_t V, float temperature, int divide, float u,
                              int64_t *tok, float *lp, float *logz, float *entropy) {
    float peak = -__builtin_inff();
#pragma omp simd reduction(max : peak)
    for (int64_t i = 0; i < V; i++)
        peak = SCALED(x[i]) > peak ? SCALED(x[i]) : peak;
    float total = 0.0f;
    double wsum = 0.0; /* of w * logit, for the entropy (a difference of close numbers) */
#pragma omp simd reduction(+ : total, wsum)
    for (int64_t i = 0; i < V; i++) {
        float w = exp_clamped(SCALED(x[i]) - peak);
        total += w;
        wsum += (double)(w * SCALED(x[i]));
    }
    double end = 0.0;
    int64_t k = cdf_search(x, V, temperature, divide, peak, u * total, &end);
    if (k < 0) /* u within rounding of 1 and this total above the running sum's: search against that */
        k = cdf_search(x, V, temperature, divide, peak, u * (float)end, &end);
    k = k < 0 ? V - 1 : k; /* as torch's clamp of searchsorted's V */
    float lz = peak + __builtin_logf(total);
    *tok = k;
    *lp = SCALED(x[k]) - lz;
    *logz = lz;
    *entropy = lz - (float)(wsum / total);
}

void rlhfkit_sample_rows(const float *logits, int64_t B, int64_t V, float temperature, const float *u,
                         int64_t u_stride, int64_t *tok, float *lp, float *logz, float *entropy) {
#pragma omp parallel for schedule(static) if (B * V > 4 * BLOCK)
    for (int64_t b = 0; b < B; b++) {
        const float *x = logits + b * V;
        if (temperature == 1.0f)
            sample_row(x, V, temperature, 0, u[b * u_stride], tok + b, lp + b, logz + b, entropy + b);
        else
            sample_row(x, V, temperature, 1, u[b * u_stride], tok + b, lp + b, logz + b, entropy + b);
    }
}

/* The sum of squares of n float arrays (ptrs[i], sizes[i] floats), into *out: a gradient's squared norm
   over every parameter in one parallel pass (torch's clip_grad_norm_ takes a norm per tensor, then
   their norm). Floats by blocks, the blocks summed in double. */
void rlhfkit_sum_squares(const float *const *ptrs, const int64_t *sizes, int64_t n, double *out) {
    double acc = 0.0;
#pragma omp parallel for schedule(dynamic, 1) reduction(+ : acc)
    for (int64_t i = 0; i < n; i++) {
        const float *x = ptrs[i];
        for (int64_t at = 0; at < sizes[i]; at += BLOCK) {
            int64_t end = at + BLOCK < sizes[i] ? at + BLOCK : sizes[i];
            float part = 0.0f;
#pragma omp simd reduction(+ : part)
            for (int64_t j = at; j < end; j++)
                part += x[j] * x[j];
            acc += (double)part;
        }
    }
    *out = acc;
}

/* log softmax(x)[id] of each row of a strided (d0, d1, V) view of logits (row (i, j) at i s0 + j s1,
   its V entries contiguous), ids (d0, d1) contiguous, out (d0, d1): the reference model's log-probs of
   the sampled tokens, one pass over the vocabulary per row for the maximum and one for the sum (torch's
   logsumexp takes four: max, subtract, exp, sum). */
void rlhfkit_token_logprobs(const float *x, int64_t d0, int64_t d1, int64_t V, int64_t s0, int64_t s1,
                            const int64_t *ids, float *out) {
#pragma omp parallel for schedule(static) if (d0 * d1 * V > 4 * BLOCK)
    for (int64_t r = 0; r < d0 * d1; r++) {
        const float *row = x + (r / d1) * s0 + (r % d1) * s1;
        float peak = -__builtin_inff();
#pragma omp simd reduction(max : peak)
        for (int64_t i = 0; i < V; i++)
            peak = row[i] > peak ? row[i] : peak;
        float total = 0.0f;
#pragma omp simd reduction(+ : total)
        for (int64_t i = 0; i < V; i++)
            total += exp_clamped(row[i] - peak);
        out[r] = row[ids[r]] - peak - __builtin_logf(total);
    }
}

/* The gradient of logits[id] / T - logz with logz = logsumexp(logits / T) known, g its incoming gradient:
   dlogits = g / T (onehot(id) - exp(logits / T - logz)), rows of a strided (d0, d1, V) view as in
   rlhfkit_token_logprobs, written into out, rows at (o0, o1); logz, g and ids (d0, d1) contiguous. One
   pass (torch's ops take a subtract, an exp, a multiply and a scatter). */
void rlhfkit_logz_backward(const float *x, int64_t d0, int64_t d1, int64_t V, int64_t s0, int64_t s1,
                           const float *logz, const float *g, const int64_t *ids, float inv_t, float *out,
                           int64_t o0, int64_t o1) {
#pragma omp parallel for schedule(static) if (d0 * d1 * V > 4 * BLOCK)
    for (int64_t r = 0; r < d0 * d1; r++) {
        const float *row = x + (r / d1) * s0 + (r % d1) * s1;
        float *o = out + (r / d1) * o0 + (r % d1) * o1;
        const float shift = logz[r], scale = -g[r] * inv_t;
#pragma omp simd
        for (int64_t i = 0; i < V; i++)
            o[i] = scale * exp_clamped(row[i] * inv_t - shift);
        o[ids[r]] += g[r] * inv_t;
    }
}

/* Attention of a training pass (accel/fastdecode.py), forward and backward, for the short sequences of RL
   fine-tuning (tens to a few hundred positions), where torch's flash-attention kernel spends more time in
   its block set-up, its zero-filled gradients and the copies around it than in arithmetic.

   Per row b and head h: queries q (m of them) are the last m of the row's own n2 positions; the keys are a
   prefix of n1 positions shared by the G consecutive rows of a group (a prompt's keys, held once for its G
   completions; n1 may be 0) followed by the row's own n2 keys. Query i (own position p = n2 - m + i) sees
   every prefix key, its own keys up to p, each only where key_ok says it is a real token, and always key
   p itself (a padding query sees itself, so no row is empty: the decoders' masks, _prompt_masks).

   Every tensor is a (rows, heads, positions, hd) view at element strides with contiguous rows of hd, read
   and written in place: the queries, keys and values are views of the q|k|v projection's output and the
   gradients are written straight into the projection's gradient, so nothing is copied, stacked or
   zero-filled around the kernel. A task (row, head; for the backward a group's rows, whose prefix
   gradient it sums) gathers its keys transposed (hd, keys) into scratch, so that the scores of a block
   of QB queries are QB vector accumulators per 16 keys, and the weighted sums QB accumulators of 16
   floats of hd, the value rows read in place. The forward keeps each query's log-sum-exp, from which the backward recomputes the softmax. */

typedef float vec16 __attribute__((vector_size(64)));
typedef float vec16u __attribute__((vector_size(64), aligned(4))); /* at any float's address */

/* Typed loads and stores (not memcpy, which may alias anything: the compiler would reload the row
   pointers after every store). */
static inline vec16 vload(const float *p) { return *(const vec16u *)p; }

static inline void vstore(float *p, vec16 v) { *(vec16u *)p = v; }

struct attn_view {
    float *p;
    int64_t sb, sh, st; /* element strides of row, head, position; hd contiguous */
};

struct attn_args {
    int64_t B, H, hd, m, n1, n2, G;
    float scale;
    struct attn_view q, k1, v1, k2, v2, o, dout, dq, dk1, dv1, dk2, dv2;
    const unsigned char *key_ok; /* (B, n1 + n2) at ok_stride, or NULL: every key is real */
    int64_t ok_stride;
    float *lse; /* (B, H, m) contiguous */
};

static inline float *at(const struct attn_view *v, int64_t b, int64_t h, int64_t t) {
    return v->p + b * v->sb + h * v->sh + t * v->st;
}

/* The largest and the sum of a vector's 16 floats, as a tree of shuffles (a loop over the lanes is a
   chain of 16 dependent operations). */
#if defined(__clang__) || __GNUC__ >= 12
typedef int32_t ivec16 __attribute__((vector_size(64)));

static inline vec16 vmax(vec16 a, vec16 b) {
    ivec16 m = a > b;
    return (vec16)(((ivec16)a & m) | ((ivec16)b & ~m));
}

#define SWAP8 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7
#define SWAP4 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11
#define SWAP2 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13
#define SWAP1 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14

static inline float hmax16(vec16 v) {
    v = vmax(v, __builtin_shufflevector(v, v, SWAP8));
    v = vmax(v, __builtin_shufflevector(v, v, SWAP4));
    v = vmax(v, __builtin_shufflevector(v, v, SWAP2));
    v = vmax(v, __builtin_shufflevector(v, v, SWAP1));
    return v[0];
}

static inline float hsum16(vec16 v) {
    v += __builtin_shufflevector(v, v, SWAP8);
    v += __builtin_shufflevector(v, v, SWAP4);
    v += __builtin_shufflevector(v, v, SWAP2);
    v += __builtin_shufflevector(v, v, SWAP1);
    return v[0];
}

/* A 16 x 16 block in place, r[i][k] -> r[k][i]: four rounds that each swap the off-diagonal sub-blocks of
   the next size down (8, 4, 2, 1), each a two-vector permutation (one instruction with AVX-512). */
#define T8L 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define T8H 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define T4L 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define T4H 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
#define T2L 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define T2H 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
#define T1L 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define T1H 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31
#define TSTEP(B, LO, HI)                                                    \
    for (int i = 0; i < 16; i++)                                            \
        if (!(i & B)) {                                                     \
            vec16 x = r[i], y = r[i + B];                                   \
            r[i] = __builtin_shufflevector(x, y, LO);                       \
            r[i + B] = __builtin_shufflevector(x, y, HI);                   \
        }

static inline void transpose16(vec16 *r) {
    TSTEP(8, T8L, T8H)
    TSTEP(4, T4L, T4H)
    TSTEP(2, T2L, T2H)
    TSTEP(1, T1L, T1H)
}
#else
static inline vec16 vmax(vec16 a, vec16 b) {
    for (int i = 0; i < 16; i++)
        a[i] = a[i] > b[i] ? a[i] : b[i];
    return a;
}

static inline float hmax16(vec16 v) {
    float m = v[0];
    for (int i = 1; i < 16; i++)
        m = v[i] > m ? v[i] : m;
    return m;
}

static inline float hsum16(vec16 v) {
    float t = 0.0f;
    for (int i = 0; i < 16; i++)
        t += v[i];
    return t;
}

static inline void transpose16(vec16 *r) {
    for (int i = 0; i < 16; i++)
        for (int k = i + 1; k < 16; k++) {
            float t = r[i][k];
            r[i][k] = r[k][i];
            r[k][i] = t;
        }
}
#endif

#define QB 8 /* queries per block: QB vector accumulators share each load of keys or values */

/* A task's keys: krow[j], vrow[j] point at key j's rows of hd (the prefix's first, then the row's own),
   read in place; Kt (hd, nkp) holds the keys transposed, and for the backward Vt the values, with zero
   columns up to nkp (a multiple of 16); kb[j] is 0 where key j is a real token, -inf where it is a pad. */
static void transpose_segment(const float *x, int64_t stride, int64_t n, int64_t hd, int64_t nkp, float *Xt) {
    for (int64_t j0 = 0; j0 < n; j0 += 16) { /* blocks of 16 rows (zeros past n) by 16 columns */
        int64_t rows = n - j0 < 16 ? n - j0 : 16;
        for (int64_t c = 0; c < hd; c += 16) {
            vec16 r[16];
            for (int64_t i = 0; i < 16; i++)
                r[i] = i < rows ? vload(x + (j0 + i) * stride + c) : (vec16){0};
            transpose16(r);
            for (int64_t d = 0; d < 16; d++) {
                float *out = Xt + (c + d) * nkp + j0;
                if (rows == 16) {
                    vstore(out, r[d]);
                } else {
                    for (int64_t i = 0; i < rows; i++)
                        out[i] = r[d][i];
                }
            }
        }
    }
}

static void gather_keys(const struct attn_args *a, int64_t b, int64_t h, int64_t nkp, const float **krow,
                        const float **vrow, float *Kt, float *Vt, float *kb) {
    int64_t n1 = a->n1, nk = n1 + a->n2, hd = a->hd;
    for (int64_t j = 0; j < nk; j++) {
        krow[j] = j < n1 ? at(&a->k1, b / a->G, h, j) : at(&a->k2, b, h, j - n1);
        vrow[j] = j < n1 ? at(&a->v1, b / a->G, h, j) : at(&a->v2, b, h, j - n1);
        kb[j] = a->key_ok == NULL || a->key_ok[b * a->ok_stride + j] ? 0.0f : -__builtin_inff();
    }
    for (int64_t k = 0; k < (Vt != NULL ? 2 : 1); k++) {
        const struct attn_view *pre = k ? &a->v1 : &a->k1, *own = k ? &a->v2 : &a->k2;
        float *Xt = k ? Vt : Kt;
        if (n1 > 0)
            transpose_segment(at(pre, b / a->G, h, 0), pre->st, n1, hd, nkp, Xt);
        transpose_segment(at(own, b, h, 0), own->st, a->n2, hd, nkp, Xt + n1);
        for (int64_t d = 0; d < hd; d++)
            for (int64_t j = nk; j < nkp; j++)
                Xt[d * nkp + j] = 0.0f;
    }
}

/* S[r][j] = scale * x_r . Kt[:, j] for the QB rows x_r (hd each) and keys j < lim (rounded up to 16). */
static void dots(const float *const *x, const float *Kt, int64_t nkp, int64_t hd, int64_t lim, float scale,
                 float *S) {
    for (int64_t c = 0; c < lim; c += 16) {
        vec16 s[QB];
        for (int r = 0; r < QB; r++)
            s[r] = (vec16){0};
        for (int64_t d = 0; d < hd; d++) {
            vec16 k = vload(Kt + d * nkp + c);
            for (int r = 0; r < QB; r++)
                s[r] += x[r][d] * k;
        }
        for (int r = 0; r < QB; r++)
            vstore(S + r * nkp + c, s[r] * scale);
    }
}

/* out_r (hd) = f_r * sum over j < lim of W[r][j] * rows[j] (rows of hd), for the QB rows r. */
static void mix(const float *W, int64_t nkp, const float *const *rows, int64_t hd, int64_t lim, const float *f,
                float *const *out) {
    for (int64_t c = 0; c < hd; c += 16) {
        vec16 o[QB];
        for (int r = 0; r < QB; r++)
            o[r] = (vec16){0};
        for (int64_t j = 0; j < lim; j++) {
            vec16 x = vload(rows[j] + c);
            for (int r = 0; r < QB; r++)
                o[r] += W[r * nkp + j] * x;
        }
        for (int r = 0; r < QB; r++)
            vstore(out[r] + c, o[r] * f[r]);
    }
}

/* X[j] += sum over the QB rows r of W[r][j] * x_r, for keys j < lim (X: (keys, hd)). Two keys at a time,
   so that each load of a row chunk of x feeds two FMAs; keys whose weights are all 0 (masked, or past a
   row's causal limit) are skipped in pairs. */
static void outer(const float *W, int64_t nkp, const float *const *x, int64_t hd, int64_t lim, float *X) {
    for (int64_t j = 0; j < lim; j += 2) {
        int two = j + 1 < lim;
        float w[QB], u[QB];
        int any = 0;
        for (int r = 0; r < QB; r++) {
            w[r] = W[r * nkp + j];
            u[r] = two ? W[r * nkp + j + 1] : 0.0f;
            any |= (w[r] != 0.0f) | (u[r] != 0.0f);
        }
        if (!any)
            continue;
        float *X0 = X + j * hd, *X1 = X0 + hd;
        for (int64_t c = 0; c < hd; c += 16) { /* two independent sums a key: one chain waits on each FMA */
            vec16 a0 = vload(X0 + c), a1 = {0}, b0 = two ? vload(X1 + c) : (vec16){0}, b1 = {0};
            for (int r = 0; r < QB; r += 2) {
                vec16 x0 = vload(x[r] + c), x1 = vload(x[r + 1] + c);
                a0 += w[r] * x0;
                a1 += w[r + 1] * x1;
                b0 += u[r] * x0;
                b1 += u[r + 1] * x1;
            }
            vstore(X0 + c, a0 + a1);
            if (two)
                vstore(X1 + c, b0 + b1);
        }
    }
}

/* Row S of query scores turned into its softmax weights in place, over its first `end` entries (a
multiple of 16 at least lim): keys j < lim - 1 where kb[j] = 0 (a real key; -inf for a pad), key lim - 1
(the query's own) always, none from lim on. Forward (lse NULL): the weights are left unnormalised, *inv
gets 1 / their sum (mix scales the outputs by it) and the log-sum-exp is returned; backward: exp(S -
lse), already normalised. */
static float softmax_row(float *S, const float *kb, int64_t lim, int64_t end, const float *lse, float *inv) {
    const float ninf = -__builtin_inff();
    float own = S[lim - 1];
    for (int64_t c = 0; c < end; c += 16)
        vstore(S + c, vload(S + c) + vload(kb + c));
    S[lim - 1] = own;
    for (int64_t j = lim; j < end; j++)
        S[j] = ninf;
    float shift;
    if (lse == NULL) {
        vec16 peak = vload(S);
        for (int64_t c = 16; c < end; c += 16)
            peak = vmax(peak, vload(S + c));
        shift = hmax16(peak);
    } else {
        shift = *lse;
    }
#pragma omp simd
    for (int64_t j = 0; j < end; j++)
        S[j] = S[j] == ninf ? 0.0f : exp_clamped(S[j] - shift);
    if (lse != NULL)
        return shift;
    vec16 total = vload(S);
    for (int64_t c = 16; c < end; c += 16)
        total += vload(S + c);
    float sum = hsum16(total);
    *inv = 1.0f / sum;
    return shift + __builtin_logf(sum);
}

static int64_t round16(int64_t n) { return (n + 15) & ~(int64_t)15; }

/* Per thread: keys transposed (hd, nkp), QB rows of weights (QB, nkp), a row of hd that takes the outputs
   of a block's unused query slots, the key mask (nkp) and the key and value row pointers; for the backward
   also the values transposed (hd, nkp), QB rows of score gradients and the keys' and values' gradients
   (nk, hd). */
static float *task_scratch(int64_t hd, int64_t nk, int64_t nkp, int backward, const float ***rows) {
    int64_t n = hd * nkp + QB * nkp + hd + nkp;
    if (backward)
        n += hd * nkp + QB * nkp + 2 * nk * hd;
    *rows = malloc((size_t)(2 * nk) * sizeof(float *));
    return aligned_alloc(64, (size_t)((n * sizeof(float) + 63) & ~(size_t)63));
}

/* The query block starting at i0: pointers to its up to QB rows of x (v) and of out (w, or `junk` for the
   slots past the last query, which repeat the first). Returns how many are real. */
static int64_t block_rows(const struct attn_args *a, const struct attn_view *v, const struct attn_view *w,
                          int64_t b, int64_t h, int64_t i0, const float **x, float **out, float *junk) {
    int64_t rows = a->m - i0 < QB ? a->m - i0 : QB;
    for (int64_t r = 0; r < QB; r++) {
        x[r] = at(v, b, h, r < rows ? i0 + r : i0);
        if (out != NULL)
            out[r] = r < rows ? at(w, b, h, i0 + r) : junk;
    }
    return rows;
}

void rlhfkit_attention_forward(const struct attn_args *a) {
    int64_t nk = a->n1 + a->n2, nkp = round16(nk), hd = a->hd, off = a->n2 - a->m;
#pragma omp parallel
    {
        const float **krow;
        float *Kt = task_scratch(hd, nk, nkp, 0, &krow);
        float *S = Kt + hd * nkp, *junk = S + QB * nkp, *kb = junk + hd;
        const float **vrow = krow + nk;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < a->B * a->H; task++) {
            int64_t b = task / a->H, h = task % a->H;
            gather_keys(a, b, h, nkp, krow, vrow, Kt, NULL, kb);
            for (int64_t i0 = 0; i0 < a->m; i0 += QB) {
                const float *x[QB];
                float *out[QB], inv[QB] = {0.0f}; /* unused slots: their outputs 0, to junk */
                int64_t rows = block_rows(a, &a->q, &a->o, b, h, i0, x, out, junk);
                int64_t lim = a->n1 + off + i0 + rows; /* the keys the block's last query sees */
                dots(x, Kt, nkp, hd, lim, a->scale, S);
                for (int64_t r = 0; r < rows; r++)
                    a->lse[(b * a->H + h) * a->m + i0 + r] = softmax_row(S + r * nkp, kb, a->n1 + off + i0 + r + 1,
                                                                         round16(lim), NULL, inv + r);
                mix(S, nkp, vrow, hd, lim, inv, out);
            }
        }
        free(Kt);
        free(krow);
    }
}

/* The gradients of rlhfkit_attention_forward's output: dq, dk2, dv2 of every row and dk1, dv1 of every
   prefix (summed over its group's rows), all written in full (zeros where a key had no weight), from q,
   the keys, the values, the output o, its gradient dout and the forward's log-sum-exp. With P the
   softmax's weights recomputed from the log-sum-exp: dV = P^T dO, dP = dO V^T, dS = P (dP - rowsum(dO o))
   scale, dQ = dS K, dK = dS^T Q. A task is a prefix group's rows for one head. */
void rlhfkit_attention_backward(const struct attn_args *a) {
    int64_t nk = a->n1 + a->n2, nkp = round16(nk), hd = a->hd, off = a->n2 - a->m;
#pragma omp parallel
    {
        const float **krow;
        float *Kt = task_scratch(hd, nk, nkp, 1, &krow);
        float *S = Kt + hd * nkp, *junk = S + QB * nkp, *kb = junk + hd, *Vt = kb + nkp;
        float *dS = Vt + hd * nkp, *dK = dS + QB * nkp, *dV = dK + nk * hd;
        const float **vrow = krow + nk;
        float ones[QB];
        for (int r = 0; r < QB; r++)
            ones[r] = 1.0f;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < a->B / a->G * a->H; task++) {
            int64_t u = task / a->H, h = task % a->H;
            memset(dK, 0, (size_t)(a->n1 * hd) * sizeof(float));
            memset(dV, 0, (size_t)(a->n1 * hd) * sizeof(float));
            for (int64_t b = u * a->G; b < (u + 1) * a->G; b++) {
                gather_keys(a, b, h, nkp, krow, vrow, Kt, Vt, kb);
                memset(dK + a->n1 * hd, 0, (size_t)(a->n2 * hd) * sizeof(float));
                memset(dV + a->n1 * hd, 0, (size_t)(a->n2 * hd) * sizeof(float));
                for (int64_t i0 = 0; i0 < a->m; i0 += QB) {
                    const float *q[QB], *g[QB], *o[QB];
                    float *dq[QB];
                    int64_t rows = block_rows(a, &a->q, &a->dq, b, h, i0, q, dq, junk);
                    block_rows(a, &a->dout, NULL, b, h, i0, g, NULL, NULL);
                    block_rows(a, &a->o, NULL, b, h, i0, o, NULL, NULL);
                    int64_t lim = a->n1 + off + i0 + rows, end = round16(lim);
                    dots(q, Kt, nkp, hd, lim, a->scale, S);
                    dots(g, Vt, nkp, hd, lim, 1.0f, dS);
                    for (int64_t r = 0; r < QB; r++) {
                        float *p = S + r * nkp, *ds = dS + r * nkp;
                        if (r >= rows) {
                            memset(p, 0, (size_t)end * sizeof(float));
                            memset(ds, 0, (size_t)end * sizeof(float));
                            continue;
                        }
                        softmax_row(p, kb, a->n1 + off + i0 + r + 1, end, a->lse + (b * a->H + h) * a->m + i0 + r,
                                    NULL);
                        vec16 dot = {0};
                        for (int64_t d = 0; d < hd; d += 16)
                            dot += vload(g[r] + d) * vload(o[r] + d);
                        float di = hsum16(dot);
#pragma omp simd
                        for (int64_t j = 0; j < end; j++)
                            ds[j] = p[j] * (ds[j] - di) * a->scale;
                    }
                    mix(dS, nkp, krow, hd, lim, ones, dq);
                    outer(dS, nkp, q, hd, lim, dK);
                    outer(S, nkp, g, hd, lim, dV);
                }
                for (int64_t j = a->n1; j < nk; j++) {
                    memcpy(at(&a->dk2, b, h, j - a->n1), dK + j * hd, hd * sizeof(float));
                    memcpy(at(&a->dv2, b, h, j - a->n1), dV + j * hd, hd * sizeof(float));
                }
            }
            for (int64_t j = 0; j < a->n1; j++) {
                memcpy(at(&a->dk1, u, h, j), dK + j * hd, hd * sizeof(float));
                memcpy(at(&a->dv1, u, h, j), dV + j * hd, hd * sizeof(float));
            }
        }
        free(Kt);
        free(krow);
    }
}
