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
     parameter, the log-probabilities of given tokens and their logits' gradient.

   The GELU:

   gelu(x) = 0.5 x (1 + tanh(u)) = x / (1 + e^(-2u)),   u = sqrt(2 / pi) (x + 0.044715 x^3)
   gelu'(x) = p + x p (1 - p) du2/dx,                    p = 1 / (1 + e^(-2u)),  du2/dx = d(2u)/dx

   Why: torch's own kernel evaluates tanh with a slow, exact routine; this one is a polynomial e^y that
   the compiler vectorises, about 4x faster forward and backward, within 2e-7 of the float64 values
   (tests/test_activations.py). */
#include <omp.h>
#include <stdint.h>
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
