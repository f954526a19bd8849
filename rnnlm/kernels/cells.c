/* Fused elementwise steps of the LSTM and GRU cells, and whole-window loops of the RNN, GRU
 * and LSTM (end of file), float32, row-major, contiguous (the window loops' products may take
 * bf16 operands: see "bf16 products").
 *
 * One call per time step does what otherwise takes four to ten tensor ops (each a pass
 * over memory plus dispatch): the gate nonlinearities, the state update and, in the
 * backward pass, every gate derivative. The step functions leave the recurrent matmul to
 * the caller; the window functions call MKL for it themselves.
 *
 * The loops are written so that the compiler vectorises them (-O3, -march=native): no
 * branches inside them, and exp is computed here (range reduction plus a Taylor
 * polynomial), because a call to the C library's expf would keep each loop scalar. Relative
 * error of exp_approx is below 1e-7, the size of float32 rounding; sigmoid and tanh are
 * built on it.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define RESTRICT __restrict__

static inline float exp_approx(float x)
{
    /* e^x = 2^n e^r with n = round(x / ln 2) and |r| <= ln(2)/2. */
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    const float round_magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    float n = (x * 1.44269504088896341f + round_magic) - round_magic;
    /* ln 2 split in two parts so that n * ln2 is exact enough (Cody and Waite) */
    float r = (x - n * 0.693145751953125f) - n * 1.428606820309417e-06f;
    /* Taylor series of e^r to degree 7: the remainder is < 0.35^8/8! ~ 6e-9 */
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23; /* 2^n as a float's exponent field */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }

static inline float tanh_approx(float x) { return 2.0f / (1.0f + exp_approx(-2.0f * x)) - 1.0f; }

/* gates (B, 4H): in, the pre-activations i|f|g|o; out, sigma(i), sigma(f), tanh(g),
 * sigma(o). c = f * c_prev + i * g, tanh_c = tanh(c), h = o * tanh_c (all (B, H)). */
void lstm_forward_step(float *gates, const float *RESTRICT c_prev, float *RESTRICT c,
                       float *RESTRICT tanh_c, float *RESTRICT h, int64_t B, int64_t H)
{
    for (int64_t b = 0; b < B; ++b) {
        float *RESTRICT gi = gates + b * 4 * H;
        float *RESTRICT gf = gi + H;
        float *RESTRICT gg = gi + 2 * H;
        float *RESTRICT go = gi + 3 * H;
        const int64_t row = b * H;
        for (int64_t j = 0; j < H; ++j) {
            float i = sigmoid(gi[j]), f = sigmoid(gf[j]), g = tanh_approx(gg[j]);
            float o = sigmoid(go[j]);
            float cj = f * c_prev[row + j] + i * g;
            float tc = tanh_approx(cj);
            gi[j] = i;
            gf[j] = f;
            gg[j] = g;
            go[j] = o;
            c[row + j] = cj;
            tanh_c[row + j] = tc;
            h[row + j] = o * tc;
        }
    }
}

/* One backward step. dh (B, H) is dL/dh_t (from the loss and from step t+1); dc (B, H) comes
 * in as dL/dc_t from step t+1 and leaves as dL/dc_{t-1}. acts are step t's gate activations,
 * c_prev = c_{t-1}, tanh_c = tanh(c_t). Writes d(pre-activations) (B, 4H) to dgates. */
static inline void lstm_backward_row(const float *RESTRICT dh, float *RESTRICT dc,
                                     const float *RESTRICT ai, const float *RESTRICT af,
                                     const float *RESTRICT ag, const float *RESTRICT ao,
                                     const float *RESTRICT c_prev,
                                     const float *RESTRICT tanh_c, float *RESTRICT di,
                                     float *RESTRICT df, float *RESTRICT dg,
                                     float *RESTRICT d_o, int64_t H)
{
    for (int64_t j = 0; j < H; ++j) {
        float i = ai[j], f = af[j], g = ag[j], o = ao[j], tc = tanh_c[j];
        float dcj = dc[j] + dh[j] * o * (1.0f - tc * tc);
        di[j] = dcj * g * i * (1.0f - i);
        df[j] = dcj * c_prev[j] * f * (1.0f - f);
        dg[j] = dcj * i * (1.0f - g * g);
        d_o[j] = dh[j] * tc * o * (1.0f - o);
        dc[j] = dcj * f;
    }
}

void lstm_backward_step(const float *dh, float *dc, const float *acts, const float *c_prev,
                        const float *tanh_c, float *dgates, int64_t B, int64_t H)
{
    for (int64_t b = 0; b < B; ++b) {
        const float *a = acts + b * 4 * H;
        float *d = dgates + b * 4 * H;
        const int64_t row = b * H;
        lstm_backward_row(dh + row, dc + row, a, a + H, a + 2 * H, a + 3 * H, c_prev + row,
                          tanh_c + row, d, d + H, d + 2 * H, d + 3 * H, H);
    }
}

/* GRU (torch.nn's equations). xw (B, 3H): x W_ih^T + b_ih; gh (B, 3H): h_prev W_hh^T + b_hh.
 * r = sigma(xr + hr), z = sigma(xz + hz), n = tanh(xn + r * hn), h = n + z * (h_prev - n).
 * Writes r|z to rz (B, 2H), n and h (B, H). */
static inline void gru_forward_row(const float *RESTRICT xr, const float *RESTRICT xz,
                                   const float *RESTRICT xn, const float *RESTRICT hr,
                                   const float *RESTRICT hz, const float *RESTRICT hn,
                                   const float *RESTRICT h_prev, float *RESTRICT r_out,
                                   float *RESTRICT z_out, float *RESTRICT n_out,
                                   float *RESTRICT h, int64_t H)
{
    for (int64_t j = 0; j < H; ++j) {
        float r = sigmoid(xr[j] + hr[j]);
        float z = sigmoid(xz[j] + hz[j]);
        float n = tanh_approx(xn[j] + r * hn[j]);
        r_out[j] = r;
        z_out[j] = z;
        n_out[j] = n;
        h[j] = n + z * (h_prev[j] - n);
    }
}

void gru_forward_step(const float *xw, const float *gh, const float *h_prev, float *rz,
                      float *n, float *h, int64_t B, int64_t H)
{
    for (int64_t b = 0; b < B; ++b) {
        const float *x = xw + b * 3 * H, *g = gh + b * 3 * H;
        const int64_t row = b * H;
        gru_forward_row(x, x + H, x + 2 * H, g, g + H, g + 2 * H, h_prev + row,
                        rz + b * 2 * H, rz + b * 2 * H + H, n + row, h + row, H);
    }
}

/* One GRU backward step, all of it but the matmul. dh (B, H) comes in as
 * dhs_t + dgh_{t+1} W_hh and leaves as dL/dh_t: when dh_next is given (every step but the
 * window's last) z_{t+1} dh_{t+1} is added, the path through h_{t+1} = ... + z_{t+1} h_t.
 * From step t's r|z (rz, (B, 2H)), n (B, H), hn = W_hn h_{t-1} + b_hn (in gh, (B, 3H)) and
 * h_prev it writes d(W_hh h + b_hh) to dgh and d(x W_ih^T + b_ih) to dxw (both (B, 3H)):
 *   dn = dh (1 - z)(1 - n^2),  dz = dh (h_prev - n) z (1 - z),  dr = dn hn r (1 - r);
 *   dxw = [dr, dz, dn],  dgh = [dr, dz, dn r]. */
static inline void gru_backward_row(float *RESTRICT dh, const float *RESTRICT dh_next,
                                    const float *RESTRICT z_next, const float *RESTRICT r,
                                    const float *RESTRICT z, const float *RESTRICT n,
                                    const float *RESTRICT hn, const float *RESTRICT h_prev,
                                    float *RESTRICT dgr, float *RESTRICT dgz,
                                    float *RESTRICT dgn, float *RESTRICT dxr,
                                    float *RESTRICT dxz, float *RESTRICT dxn, int64_t H)
{
    if (dh_next)
        for (int64_t j = 0; j < H; ++j)
            dh[j] += z_next[j] * dh_next[j];
    for (int64_t j = 0; j < H; ++j) {
        float d = dh[j], zj = z[j], nj = n[j], rj = r[j];
        float dn = d * (1.0f - zj) * (1.0f - nj * nj);
        float dz = d * (h_prev[j] - nj) * zj * (1.0f - zj);
        float dr = dn * hn[j] * rj * (1.0f - rj);
        dgr[j] = dr;
        dgz[j] = dz;
        dgn[j] = dn * rj;
        dxr[j] = dr;
        dxz[j] = dz;
        dxn[j] = dn;
    }
}

void gru_backward_step(float *dh, const float *dh_next, const float *rz_next, const float *rz,
                       const float *n, const float *gh, const float *h_prev, float *dgh,
                       float *dxw, int64_t B, int64_t H)
{
    for (int64_t b = 0; b < B; ++b) {
        const int64_t row = b * H, gates2 = b * 2 * H, gates3 = b * 3 * H;
        float *g = dgh + gates3, *x = dxw + gates3;
        gru_backward_row(dh + row, dh_next ? dh_next + row : 0,
                         dh_next ? rz_next + gates2 + H : 0, rz + gates2, rz + gates2 + H,
                         n + row, gh + gates3 + 2 * H, h_prev + row, g, g + H, g + 2 * H,
                         x, x + H, x + 2 * H, H);
    }
}

/* ---------------------------------------------------------------------------------------
 * Whole windows in C: each step's recurrent matmul as well as its elementwise work.
 *
 * With the loop in Python every step pays two dispatches (the matmul, then the cell call),
 * about a tenth of a step at these sizes. Here the loop runs in C and calls BLAS directly:
 * the single-precision GEMM of the MKL that PyTorch itself links, whose entry points
 * native.py looks up in the loaded torch library and hands over with set_blas (no
 * link-time dependency; without them the Python loops above are used). The forward product
 * h_{t-1} W^T reuses one weight matrix for all T steps, so it is packed once per window into
 * MKL's internal layout (cblas_sgemm_pack / _compute): measured 1.3-1.4x faster than plain
 * sgemm for the LSTM's (B, 256) x (256, 1024) steps, level for the smaller ones. The
 * backward product dgates W stays plain sgemm, which measured as fast as packed or faster.
 * Everything is row-major; a row-major C = A B is the column-major C^T = B^T A^T, which is
 * how sgemm_ (column-major, Fortran) is called.
 * ------------------------------------------------------------------------------------- */

/* MKL's LP64 interface (32-bit ints), the one PyTorch links; the Fortran string-length
 * arguments of sgemm_ are left out, which MKL allows. */
typedef void (*sgemm_fn)(const char *, const char *, const int *, const int *, const int *,
                         const float *, const float *, const int *, const float *,
                         const int *, const float *, float *, const int *);
typedef size_t (*pack_size_fn)(int, int, int, int);
typedef void (*pack_fn)(int, int, int, int, int, int, float, const float *, int, float *);
typedef void (*compute_fn)(int, int, int, int, int, int, const float *, int, const float *,
                           int, float, float *, int);

enum { ROW_MAJOR = 101, NO_TRANS = 111, TRANS = 112, B_MATRIX = 162, PACKED = 151 };

static sgemm_fn blas_sgemm;
static pack_size_fn blas_pack_size;
static pack_fn blas_pack;
static compute_fn blas_compute;

void set_blas(void *sgemm, void *pack_size, void *pack, void *compute)
{
    blas_sgemm = (sgemm_fn)sgemm;
    blas_pack_size = (pack_size_fn)pack_size;
    blas_pack = (pack_fn)pack;
    blas_compute = (compute_fn)compute;
}

/* C (rows, n) += A (rows, k) @ W (k, n), all row-major and contiguous. */
static void gemm_add(const float *A, const float *W, float *C, int rows, int k, int n)
{
    const float one = 1.0f;
    blas_sgemm("N", "N", &n, &rows, &k, &one, W, &n, A, &k, &one, C, &n);
}

/* bf16 products (train.precision: bf16): MKL's gemm_bf16bf16f32 takes bf16 operands and
 * accumulates and writes float32, the contract of bf16 autocast. With AVX-512 BF16 or AMX it
 * measured 2.3x sgemm for a (32, 512) x (512, 512) step on one core and 5.5x for a window's
 * weight gradient; on other CPUs MKL emulates it. Only the operands are rounded: the
 * state, the cells and every sum stay float32. Same argument order as sgemm_. */
typedef void (*gemm_bf16_fn)(const char *, const char *, const int *, const int *,
                             const int *, const float *, const uint16_t *, const int *,
                             const uint16_t *, const int *, const float *, float *,
                             const int *);
static gemm_bf16_fn blas_gemm_bf16;

void set_blas_bf16(void *gemm_bf16) { blas_gemm_bf16 = (gemm_bf16_fn)gemm_bf16; }

/* float32 -> bf16, rounding to nearest even (what PyTorch's .bfloat16() does); NaN stays NaN. */
void to_bf16(const float *RESTRICT x, uint16_t *RESTRICT y, int64_t n)
{
    for (int64_t i = 0; i < n; ++i) {
        uint32_t u;
        memcpy(&u, x + i, sizeof u);
        uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
        y[i] = (uint16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? (u >> 16) | 0x40u : rounded);
    }
}

/* The right-hand side of a window's per-step products, in the layout its precision wants:
 * float32 (packed by MKL for the forward products), or, when lhs is not NULL, a row-major
 * bf16 (k, n) matrix and a bf16 buffer of (rows, k) for the left-hand side, which each
 * product rounds into first. The window functions take both pointers from the caller (lhs
 * NULL: float32), which owns the memory. */
typedef struct {
    const void *W;
    uint16_t *lhs;  /* bf16 only: (rows, k) */
} rhs_t;

/* Bytes of the packed form of a (k, n) right-hand side for products with `rows` rows. */
size_t packed_size(int rows, int k, int n) { return blas_pack_size(B_MATRIX, rows, n, k); }

/* Packs W^T (k, n) from W (n, k) row-major: the recurrent weights W_hh as stored (the packing
 * reads them transposed, which saves a transposed copy per window). */
void pack_transposed_rhs(const float *W, float *dest, int rows, int k, int n)
{
    blas_pack(ROW_MAJOR, B_MATRIX, TRANS, rows, n, k, 1.0f, W, k, dest);
}

/* C (rows, n) += A (rows, k) @ packed W (k, n). */
static void packed_gemm_add(const float *A, const float *packed, float *C, int rows, int k,
                            int n)
{
    blas_compute(ROW_MAJOR, NO_TRANS, PACKED, rows, n, k, A, k, packed, n, 1.0f, C, n);
}

/* C (rows, n) += A (rows, k) @ W (k, n): W packed float32, or bf16 (rhs.lhs set). */
static void product_add(const float *A, rhs_t rhs, float *C, int rows, int k, int n)
{
    if (rhs.lhs) {
        const float one = 1.0f;
        to_bf16(A, rhs.lhs, (int64_t)rows * k);
        blas_gemm_bf16("N", "N", &n, &rows, &k, &one, (const uint16_t *)rhs.W, &n, rhs.lhs,
                       &k, &one, C, &n);
    } else {
        packed_gemm_add(A, (const float *)rhs.W, C, rows, k, n);
    }
}

/* C (rows, n) += A (rows, k) @ W (k, n): W row-major float32, or bf16 (rhs.lhs set). */
static void plain_product_add(const float *A, rhs_t rhs, float *C, int rows, int k, int n)
{
    if (rhs.lhs)
        product_add(A, rhs, C, rows, k, n);
    else
        gemm_add(A, (const float *)rhs.W, C, rows, k, n);
}

/* acts (T, B, 4H) come in holding x W_ih^T + biases and leave as gate activations; hbuf and
 * cbuf (T+1, B, H) hold h_0 and c_0 in their first row; W_t is W_hh^T (H, 4H), packed float32
 * or bf16 with lhs (rhs_t). */
void lstm_forward_window(const void *W_t, uint16_t *lhs, float *acts, float *hbuf,
                         float *cbuf, float *tanh_c, int64_t T, int64_t B, int64_t H)
{
    const int64_t G = 4 * H;
    const rhs_t rhs = {W_t, lhs};
    for (int64_t t = 0; t < T; ++t) {
        float *a = acts + t * B * G;
        product_add(hbuf + t * B * H, rhs, a, (int)B, (int)H, (int)G);
        lstm_forward_step(a, cbuf + t * B * H, cbuf + (t + 1) * B * H, tanh_c + t * B * H,
                          hbuf + (t + 1) * B * H, B, H);
    }
}

/* dh (T, B, H) comes in as dL/dh_t from above the layer; row t gets dgates_{t+1} W_hh added
 * before step t's cell backward. dc (B, H): dL/dc_T in, dL/dc_0 out. W_hh is (4H, H). */
void lstm_backward_window(const void *W_hh, uint16_t *lhs, float *dh, float *dc,
                          const float *acts, const float *cbuf, const float *tanh_c,
                          float *dgates, int64_t T, int64_t B, int64_t H)
{
    const int64_t G = 4 * H;
    const rhs_t rhs = {W_hh, lhs};
    for (int64_t t = T - 1; t >= 0; --t) {
        if (t < T - 1)
            plain_product_add(dgates + (t + 1) * B * G, rhs, dh + t * B * H, (int)B, (int)G,
                              (int)H);
        lstm_backward_step(dh + t * B * H, dc, acts + t * B * G, cbuf + t * B * H,
                           tanh_c + t * B * H, dgates + t * B * G, B, H);
    }
}

/* gh (T, B, 3H) comes in holding b_hh in every row and leaves as W_hh h_{t-1} + b_hh; xw
 * (T, B, 3H); hbuf (T+1, B, H) holds h_0 in its first row; W_t is W_hh^T (rhs_t). */
void gru_forward_window(const void *W_t, uint16_t *lhs, const float *xw, float *gh,
                        float *hbuf, float *rz, float *n, int64_t T, int64_t B, int64_t H)
{
    const int64_t G = 3 * H;
    const rhs_t rhs = {W_t, lhs};
    for (int64_t t = 0; t < T; ++t) {
        float *g = gh + t * B * G;
        product_add(hbuf + t * B * H, rhs, g, (int)B, (int)H, (int)G);
        gru_forward_step(xw + t * B * G, g, hbuf + t * B * H, rz + t * B * 2 * H,
                         n + t * B * H, hbuf + (t + 1) * B * H, B, H);
    }
}

/* dh (T, B, H) comes in as dL/dh_t from above the layer and leaves as the full dL/dh_t. */
void gru_backward_window(const void *W_hh, uint16_t *lhs, float *dh, const float *rz,
                         const float *n, const float *gh, const float *hbuf, float *dgh,
                         float *dxw, int64_t T, int64_t B, int64_t H)
{
    const int64_t G = 3 * H;
    const rhs_t rhs = {W_hh, lhs};
    for (int64_t t = T - 1; t >= 0; --t) {
        const float *dh_next = 0, *rz_next = 0;
        if (t < T - 1) {
            plain_product_add(dgh + (t + 1) * B * G, rhs, dh + t * B * H, (int)B, (int)G,
                              (int)H);
            dh_next = dh + (t + 1) * B * H;
            rz_next = rz + (t + 1) * B * 2 * H;
        }
        gru_backward_step(dh + t * B * H, dh_next, rz_next, rz + t * B * 2 * H, n + t * B * H,
                          gh + t * B * G, hbuf + t * B * H, dgh + t * B * G, dxw + t * B * G,
                          B, H);
    }
}

/* The plain RNN, h_t = phi(xw_t + h_{t-1} W_hh^T) with phi = tanh or the identity. buf
 * (T+1, B, H) holds h_0 in its first row and xw_t in row t+1, which becomes h_t. */
void rnn_forward_window(const void *W_t, uint16_t *lhs, float *buf, int64_t T, int64_t B,
                        int64_t H, int64_t tanh)
{
    const int64_t size = B * H;
    const rhs_t rhs = {W_t, lhs};
    for (int64_t t = 0; t < T; ++t) {
        float *RESTRICT h = buf + (t + 1) * size;
        product_add(buf + t * size, rhs, h, (int)B, (int)H, (int)H);
        if (tanh)
            for (int64_t j = 0; j < size; ++j)
                h[j] = tanh_approx(h[j]);
    }
}

/* dA (T, B, H) comes in as dL/dh_t from above the layer and leaves as da_t = dL/da_t:
 * da_t = (dhs_t + da_{t+1} W_hh) * phi'(a_t), with phi' = 1 - h_t^2 for tanh. hs = h_1..h_T. */
void rnn_backward_window(const void *W_hh, uint16_t *lhs, float *dA, const float *hs,
                         int64_t T, int64_t B, int64_t H, int64_t tanh)
{
    const int64_t size = B * H;
    const rhs_t rhs = {W_hh, lhs};
    for (int64_t t = T - 1; t >= 0; --t) {
        float *RESTRICT d = dA + t * size;
        if (t < T - 1)
            plain_product_add(dA + (t + 1) * size, rhs, d, (int)B, (int)H, (int)H);
        if (tanh) {
            const float *RESTRICT h = hs + t * size;
            for (int64_t j = 0; j < size; ++j)
                d[j] *= 1.0f - h[j] * h[j];
        }
    }
}

/* For the benchmark's matmul roofline (rnnlm/tools/bench.py): the recurrent products of one window
 * the way the window loops above compute them, `steps` forward (B, H) @ W_t (H, G) and
 * `steps` backward (B, G) @ W_b (G, H), without the cells; W_t and W_b as the loops take
 * them (rhs_t: float32, the forward one packed, or bf16 with the lhs buffers). */
void recurrent_products(const void *W_t, uint16_t *lhs_f, const float *h, float *out_f,
                        const void *W_b, uint16_t *lhs_b, const float *dgates, float *out_b,
                        int64_t steps, int64_t B, int64_t H, int64_t G)
{
    const rhs_t forward = {W_t, lhs_f}, backward = {W_b, lhs_b};
    for (int64_t t = 0; t < steps; ++t)
        product_add(h, forward, out_f, (int)B, (int)H, (int)G);
    for (int64_t t = 0; t < steps; ++t)
        plain_product_add(dgates, backward, out_b, (int)B, (int)G, (int)H);
}
