/* Float32 CPU kernels of our own, built at first use by rlhfkit/models/native.py (with -fopenmp:
   loaded after torch, the OpenMP runtime it links is torch's own, so the loops below run on torch's
   threads). Two kinds:
   - GPT-2's tanh-GELU and its derivative (models/activations.py), on contiguous arrays or on rows
     of a strided (d0, d1, n) view such as a micro-batch's rows of a time-major record;
   - the epilogues of a decode step's linear layers (rl/fastdecode.py): the bias added in place to
     a product written without it, fused with what reads it next (the GELU, the KV-cache writes, the
     residual add), one pass instead of torch's two or three small ops.

   The GELU:

   gelu(x) = 0.5 x (1 + tanh(u)) = x / (1 + e^(-2u)),   u = sqrt(2 / pi) (x + 0.044715 x^3)
   gelu'(x) = p + x p (1 - p) du2/dx,                    p = 1 / (1 + e^(-2u)),  du2/dx = d(2u)/dx

   Why: torch's own kernel evaluates tanh with a slow, exact routine; this one is a polynomial e^y that
   the compiler vectorises, about 4x faster forward and backward, within 2e-7 of the float64 values
   (tests/test_activations.py). */
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
