/* Float32 CPU kernels of our own, built at first use by rlhfkit/models/native.py (with -fopenmp:
   loaded after torch, the OpenMP runtime it links is torch's own, so the loops below run on torch's
   threads):
   - GPT-2's tanh-GELU and its derivative (models/activations.py), on contiguous arrays or on rows
     of a strided (d0, d1, n) view such as a micro-batch's rows of a time-major record;
   - the epilogues of a decode step's linear layers (rl/fastdecode.py): the bias added in place to
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

static void backward_block(const float *dy, const float *x, float *dx, int64_t n) {
#pragma omp simd
    for (int64_t i = 0; i < n; i++) {
        float v = x[i], v2 = v * v;
        float q = exp_clamped(-TWO_C * (v + A * v2 * v));
        float p = 1.0f / (1.0f + q);
        float one_minus_p = q * p; /* no cancellation when p is near 1 */
        float d = p + v * TWO_C * (1.0f + 3.0f * A * v2) * (p * one_minus_p);
        d = v > CUT ? 1.0f : d;
        d = v < -CUT ? 0.0f : d;
        dx[i] = dy[i] * d;
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

/* A whole GPT-2 decode step in one call (rl/fastdecode.py, GPT2Decoder._c_step): the embeddings, every
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
                          int64_t t) {
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
        }
        float *o = a->o + b * D;
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
        attend_cached(a, out[0], K, Vv, t);
        step_mm(a, a->o, l->proj_w, out[1], B, D, D, 0);
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
   rlhfkit_token_logprobs, written at the same strides into out; logz, g and ids (d0, d1) contiguous. One
   pass (torch's ops take a subtract, an exp, a multiply and a scatter). */
void rlhfkit_logz_backward(const float *x, int64_t d0, int64_t d1, int64_t V, int64_t s0, int64_t s1,
                           const float *logz, const float *g, const int64_t *ids, float inv_t, float *out) {
#pragma omp parallel for schedule(static) if (d0 * d1 * V > 4 * BLOCK)
    for (int64_t r = 0; r < d0 * d1; r++) {
        int64_t at = (r / d1) * s0 + (r % d1) * s1;
        const float *row = x + at;
        float *o = out + at;
        const float shift = logz[r], scale = -g[r] * inv_t;
#pragma omp simd
        for (int64_t i = 0; i < V; i++)
            o[i] = scale * exp_clamped(row[i] * inv_t - shift);
        o[ids[r]] += g[r] * inv_t;
    }
}

/* Attention of a training pass (rl/fastdecode.py), forward and backward, for the short sequences of RL
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
   gradient it sums) gathers its keys transposed (hd, keys) and its values into scratch, so that the
   scores of 4 queries are 4 vector accumulators per 16 keys, and the weighted sums 16 floats of hd at a
   time. The forward keeps each query's log-sum-exp, from which the backward recomputes the softmax. */

typedef float vec16 __attribute__((vector_size(64)));

static inline vec16 vload(const float *p) {
    vec16 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void vstore(float *p, vec16 v) { memcpy(p, &v, sizeof v); }

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

/* Key j (prefix first) of row b, head h, from k (or v): the prefix view's or the row's own. */
static inline float *key_row(const struct attn_args *a, const struct attn_view *pre, const struct attn_view *own,
                             int64_t b, int64_t h, int64_t j) {
    return j < a->n1 ? at(pre, b / a->G, h, j) : at(own, b, h, j - a->n1);
}

/* A task's keys K and values V (nk, hd) copied from their views, the keys transposed into Kt (hd, nkp)
   and for the backward the values into Vt, with zero columns up to nkp (a multiple of 16); ok[j]: key j
   is a real token. */
static void transpose_rows(const float *X, int64_t nk, int64_t hd, int64_t nkp, float *Xt) {
    for (int64_t d = 0; d < hd; d++) {
        float *out = Xt + d * nkp;
#pragma omp simd
        for (int64_t j = 0; j < nk; j++)
            out[j] = X[j * hd + d];
        for (int64_t j = nk; j < nkp; j++) /* the padding columns of the last block of 16 keys */
            out[j] = 0.0f;
    }
}

static void gather_keys(const struct attn_args *a, int64_t b, int64_t h, int64_t nkp, float *Kt, float *V,
                        float *K, float *Vt, float *kb) {
    int64_t nk = a->n1 + a->n2, hd = a->hd;
    for (int64_t j = 0; j < nk; j++) {
        memcpy(K + j * hd, key_row(a, &a->k1, &a->k2, b, h, j), hd * sizeof(float));
        memcpy(V + j * hd, key_row(a, &a->v1, &a->v2, b, h, j), hd * sizeof(float));
        kb[j] = a->key_ok == NULL || a->key_ok[b * a->ok_stride + j] ? 0.0f : -__builtin_inff();
    }
    transpose_rows(K, nk, hd, nkp, Kt);
    if (Vt != NULL)
        transpose_rows(V, nk, hd, nkp, Vt);
}

/* S[r][j] = scale * x_r . Kt[:, j] for the 4 rows x_r (hd each) and keys j < lim (rounded up to 16). */
static void dots4(const float *const *x, const float *Kt, int64_t nkp, int64_t hd, int64_t lim, float scale,
                  float *S) {
    for (int64_t c = 0; c < lim; c += 16) {
        vec16 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
        for (int64_t d = 0; d < hd; d++) {
            vec16 k = vload(Kt + d * nkp + c);
            s0 += x[0][d] * k;
            s1 += x[1][d] * k;
            s2 += x[2][d] * k;
            s3 += x[3][d] * k;
        }
        vstore(S + c, s0 * scale);
        vstore(S + nkp + c, s1 * scale);
        vstore(S + 2 * nkp + c, s2 * scale);
        vstore(S + 3 * nkp + c, s3 * scale);
    }
}

/* out_r (hd) = f_r * sum over j < lim of W[r][j] * X[j] (X: (keys, hd)), for 4 rows r. */
static void mix4(const float *W, int64_t nkp, const float *X, int64_t hd, int64_t lim, const float *f,
                 float *const *out) {
    for (int64_t c = 0; c < hd; c += 16) {
        vec16 o0 = {0}, o1 = {0}, o2 = {0}, o3 = {0};
        for (int64_t j = 0; j < lim; j++) {
            vec16 x = vload(X + j * hd + c);
            o0 += W[j] * x;
            o1 += W[nkp + j] * x;
            o2 += W[2 * nkp + j] * x;
            o3 += W[3 * nkp + j] * x;
        }
        vstore(out[0] + c, o0 * f[0]);
        vstore(out[1] + c, o1 * f[1]);
        vstore(out[2] + c, o2 * f[2]);
        vstore(out[3] + c, o3 * f[3]);
    }
}

/* Row S of query scores turned into its softmax weights in place, over its first `end` entries (a
multiple of 16 at least lim): keys j < lim - 1 where kb[j] = 0 (a real key; -inf for a pad), key lim - 1
(the query's own) always, none from lim on. Forward (lse NULL): the weights are left unnormalised, *inv
gets 1 / their sum (mix4 scales the outputs by it) and the log-sum-exp is returned; backward: exp(S -
lse), already normalised. */
static float softmax_row(float *S, const float *kb, int64_t lim, int64_t end, const float *lse, float *inv) {
    const float ninf = -__builtin_inff();
    float own = S[lim - 1];
#pragma omp simd
    for (int64_t j = 0; j < end; j++)
        S[j] += kb[j];
    S[lim - 1] = own;
    for (int64_t j = lim; j < end; j++)
        S[j] = ninf;
    float peak = ninf;
    if (lse == NULL) {
#pragma omp simd reduction(max : peak)
        for (int64_t j = 0; j < end; j++)
            peak = S[j] > peak ? S[j] : peak;
    }
    float shift = lse == NULL ? peak : *lse, total = 0.0f;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < end; j++) {
        float e = S[j] == ninf ? 0.0f : exp_clamped(S[j] - shift);
        S[j] = e;
        total += e;
    }
    if (lse != NULL)
        return shift;
    *inv = 1.0f / total;
    return shift + __builtin_logf(total);
}

static int64_t round16(int64_t n) { return (n + 15) & ~(int64_t)15; }

/* Per thread: keys transposed (hd, nkp), values (nk, hd), 4 rows of weights (4, nkp), a row of hd that
   takes the outputs of a block's unused query slots, the keys (nk, hd) and the key mask (nkp); for the
   backward also the
   values transposed (hd, nkp), 4 rows of score gradients and the keys' and values' gradients (nk, hd). */
static float *task_scratch(int64_t hd, int64_t nk, int64_t nkp, int backward) {
    int64_t n = hd * nkp + 2 * nk * hd + 4 * nkp + hd + nkp;
    if (backward)
        n += hd * nkp + 4 * nkp + 2 * nk * hd;
    return aligned_alloc(64, (size_t)((n * sizeof(float) + 63) & ~(size_t)63));
}

/* The query block starting at i0: pointers to its up to 4 rows of x (v) and of out (w, or `junk` for the
   slots past the last query, which repeat the first). Returns how many are real. */
static int64_t block_rows(const struct attn_args *a, const struct attn_view *v, const struct attn_view *w,
                          int64_t b, int64_t h, int64_t i0, const float **x, float **out, float *junk) {
    int64_t rows = a->m - i0 < 4 ? a->m - i0 : 4;
    for (int64_t r = 0; r < 4; r++) {
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
        float *Kt = task_scratch(hd, nk, nkp, 0);
        float *V = Kt + hd * nkp, *S = V + nk * hd, *junk = S + 4 * nkp, *K = junk + hd, *kb = K + nk * hd;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < a->B * a->H; task++) {
            int64_t b = task / a->H, h = task % a->H;
            gather_keys(a, b, h, nkp, Kt, V, K, NULL, kb);
            for (int64_t i0 = 0; i0 < a->m; i0 += 4) {
                const float *x[4];
                float *out[4], inv[4] = {0.0f, 0.0f, 0.0f, 0.0f}; /* unused slots: their outputs 0, to junk */
                int64_t rows = block_rows(a, &a->q, &a->o, b, h, i0, x, out, junk);
                int64_t lim = a->n1 + off + i0 + rows; /* the keys the block's last query sees */
                dots4(x, Kt, nkp, hd, lim, a->scale, S);
                for (int64_t r = 0; r < rows; r++)
                    a->lse[(b * a->H + h) * a->m + i0 + r] = softmax_row(S + r * nkp, kb, a->n1 + off + i0 + r + 1,
                                                                         round16(lim), NULL, inv + r);
                mix4(S, nkp, V, hd, lim, inv, out);
            }
        }
        free(Kt);
    }
}

/* X[j] += sum over the 4 rows r of W[r][j] * x_r, for keys j < lim (X: (keys, hd)). */
static void outer4(const float *W, int64_t nkp, const float *const *x, int64_t hd, int64_t lim, float *X) {
    for (int64_t j = 0; j < lim; j++) {
        float w0 = W[j], w1 = W[nkp + j], w2 = W[2 * nkp + j], w3 = W[3 * nkp + j];
        if (w0 == 0.0f && w1 == 0.0f && w2 == 0.0f && w3 == 0.0f)
            continue;
        for (int64_t c = 0; c < hd; c += 16)
            vstore(X + j * hd + c, vload(X + j * hd + c) + w0 * vload(x[0] + c) + w1 * vload(x[1] + c) +
                                       w2 * vload(x[2] + c) + w3 * vload(x[3] + c));
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
        float *Kt = task_scratch(hd, nk, nkp, 1);
        float *V = Kt + hd * nkp, *S = V + nk * hd, *junk = S + 4 * nkp, *K = junk + hd, *Vt = K + nk * hd;
        float *dS = Vt + hd * nkp, *dK = dS + 4 * nkp, *dV = dK + nk * hd, *kb = dV + nk * hd;
        const float ones[4] = {1.0f, 1.0f, 1.0f, 1.0f};
#pragma omp for schedule(static)
        for (int64_t task = 0; task < a->B / a->G * a->H; task++) {
            int64_t u = task / a->H, h = task % a->H;
            memset(dK, 0, (size_t)(a->n1 * hd) * sizeof(float));
            memset(dV, 0, (size_t)(a->n1 * hd) * sizeof(float));
            for (int64_t b = u * a->G; b < (u + 1) * a->G; b++) {
                gather_keys(a, b, h, nkp, Kt, V, K, Vt, kb);
                memset(dK + a->n1 * hd, 0, (size_t)(a->n2 * hd) * sizeof(float));
                memset(dV + a->n1 * hd, 0, (size_t)(a->n2 * hd) * sizeof(float));
                for (int64_t i0 = 0; i0 < a->m; i0 += 4) {
                    const float *q[4], *g[4], *o[4];
                    float *dq[4];
                    int64_t rows = block_rows(a, &a->q, &a->dq, b, h, i0, q, dq, junk);
                    block_rows(a, &a->dout, NULL, b, h, i0, g, NULL, NULL);
                    block_rows(a, &a->o, NULL, b, h, i0, o, NULL, NULL);
                    int64_t lim = a->n1 + off + i0 + rows, end = round16(lim);
                    dots4(q, Kt, nkp, hd, lim, a->scale, S);
                    dots4(g, Vt, nkp, hd, lim, 1.0f, dS);
                    for (int64_t r = 0; r < 4; r++) {
                        float *p = S + r * nkp, *ds = dS + r * nkp;
                        if (r >= rows) {
                            memset(p, 0, (size_t)end * sizeof(float));
                            memset(ds, 0, (size_t)end * sizeof(float));
                            continue;
                        }
                        softmax_row(p, kb, a->n1 + off + i0 + r + 1, end, a->lse + (b * a->H + h) * a->m + i0 + r,
                                    NULL);
                        float di = 0.0f;
#pragma omp simd reduction(+ : di)
                        for (int64_t d = 0; d < hd; d++)
                            di += g[r][d] * o[r][d];
#pragma omp simd
                        for (int64_t j = 0; j < end; j++)
                            ds[j] = p[j] * (ds[j] - di) * a->scale;
                    }
                    mix4(dS, nkp, K, hd, lim, ones, dq);
                    outer4(dS, nkp, q, hd, lim, dK);
                    outer4(S, nkp, g, hd, lim, dV);
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
    }
}
