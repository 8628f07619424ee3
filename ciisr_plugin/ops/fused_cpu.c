/* Fused float32 CPU kernels for the implicit decoders' inference (see fused_cpu.py).
 *
 * Compiled at first use for the machine it runs on (-march=native), loaded with ctypes.
 * Every kernel reads the latent-grid row table through the query's index itself, so the
 * gathered (M, D) rows are never written out, and returns nonzero (having written
 * nothing) when an index is outside the table.
 *
 * ciisr_mlp_decode: an MLP whose first Linear's latent part was precomputed on the LR grid,
 *   from that row table to the output: per block of rows, the first layer (row + the
 *   query's coordinate part, ReLU) and every later layer run on activations that stay in
 *   L1, and only the output is written. One pass instead of a gather, an add, a ReLU and
 *   an (M, width) tensor written and read back per layer.
 * ciisr_basis_decode: A-LIIF's basis MLPs, mixed per query by coefficients, from the
 *   table of all bases' first-layer latent parts to the output. Every activation stays in
 *   registers or L1; the layer dimensions are compile-time constants (BASIS_* below,
 *   defined by fused_cpu.py), so the loops unroll into straight vector code.
 * Which of them a build has depends on the instruction set (ciisr_kernels below).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* 16 floats; the unaligned variant for loads from tensors */
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));
typedef int32_t v16i __attribute__((vector_size(64)));

static int index_outside(int64_t m, const int64_t *idx, int64_t n)
{
    int bad = 0;
    for (int64_t i = 0; i < m; i++)
        bad |= (idx[i] < 0) | (idx[i] >= n);
    return bad;
}

/* What this build has. Each kernel is compiled only for the instruction sets where it was
 * measured faster than torch's own path (on the project's AVX-512 machine, and with builds
 * and torch limited to AVX2 / SSE4 there): elsewhere the decoders run on torch. */
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#define HAS_MLP_KERNEL 1 /* AVX2: ~1.15x torch end to end; SSE4: ~0.9x, left out */
#else
#define HAS_MLP_KERNEL 0
#endif
#if defined(__AVX512F__)
#define HAS_BASIS_KERNEL 1 /* AVX2: ~0.93x torch end to end (2 threads), left out */
#else
#define HAS_BASIS_KERNEL 0
#endif

/* 1: ciisr_mlp_decode is built; 2: ciisr_basis_decode is, where BASIS_* are defined */
int ciisr_kernels(void)
{
    return HAS_MLP_KERNEL | (HAS_BASIS_KERNEL << 1);
}

#if HAS_MLP_KERNEL
/* The MLP kernel's tile: MLP_ROWS rows x 2 native vectors of accumulators, sized to the
 * register file (as hand-written SGEMM tiles are); a 512-bit vector type on a 256-bit
 * machine would spill and run ~20x slower. */
#if defined(__AVX512F__)
#define VEC 16 /* 32 zmm registers: 28 accumulators, 2 weight vectors, 1 broadcast */
#define MLP_ROWS 14
#else
#define VEC 8 /* 16 ymm registers: the classic 6 x 16 tile */
#define MLP_ROWS 6
#endif
typedef float vec __attribute__((vector_size(VEC * 4)));
typedef int32_t veci __attribute__((vector_size(VEC * 4)));

/* Columns [s, s + VEC * nv) of a packed panel pw columns wide, for MLP_ROWS rows:
 * hout = relu?(hin @ w + b), w the panel's (din, pw) slice of the packed weight. */
static inline __attribute__((always_inline)) void mlp_tile(const int pw, const int s, const int nv,
                                                           const int64_t din, const int64_t stride,
                                                           const float *restrict hin, const float *restrict w,
                                                           const float *restrict b, const int relu,
                                                           float *restrict hout)
{
    vec acc[MLP_ROWS][2];
    for (int v = 0; v < nv; v++) {
        const vec bias = *(const vec *)(b + s + VEC * v);
        for (int r = 0; r < MLP_ROWS; r++)
            acc[r][v] = bias;
    }
#pragma GCC unroll 4 /* measured ~6% faster than no unrolling, 2 cores busy */
    for (int64_t k = 0; k < din; k++) {
        const vec w0 = *(const vec *)(w + k * pw + s);
        const vec w1 = nv == 2 ? *(const vec *)(w + k * pw + s + VEC) : w0;
        for (int r = 0; r < MLP_ROWS; r++) {
            const float a = hin[r * stride + k];
            acc[r][0] += a * w0;
            if (nv == 2)
                acc[r][1] += a * w1;
        }
    }
    const vec zero = {0};
    for (int r = 0; r < MLP_ROWS; r++)
        for (int v = 0; v < nv; v++) {
            vec y = acc[r][v];
            if (relu)
                y = (vec)((veci)y & (y > zero)); /* lanes not > 0 become +0 */
            *(vec *)(hout + r * stride + s + VEC * v) = y;
        }
}

/* One packed panel (pw = 32 or 16 columns) in tiles of up to 2 vectors */
static inline __attribute__((always_inline)) void mlp_panel(const int pw, const int64_t din, const int64_t stride,
                                                            const float *restrict hin, const float *restrict w,
                                                            const float *restrict b, const int relu,
                                                            float *restrict hout)
{
    for (int s = 0; s < pw; s += 2 * VEC)
        mlp_tile(pw, s, pw - s >= 2 * VEC ? 2 : 1, din, stride, hin, w, b, relu, hout);
}

static inline __attribute__((always_inline)) void mlp_layer_panels(const int64_t din, const int64_t dout,
                                                                   const int64_t stride, const float *restrict hin,
                                                                   const float *restrict w, const float *restrict b,
                                                                   const int relu, float *restrict hout)
{
    int64_t c = 0;
    for (; c + 32 <= dout; c += 32)
        mlp_panel(32, din, stride, hin, w + c * din, b + c, relu, hout + c);
    if (c < dout)
        mlp_panel(16, din, stride, hin, w + c * din, b + c, relu, hout + c);
}

/* relu?(hin @ W + b) for MLP_ROWS rows; dout a multiple of 16 (W packed in panels of 32
 * columns, the last one 16 wide when dout is not a multiple of 32) */
static void mlp_layer(const int64_t din, const int64_t dout, const int64_t stride, const float *restrict hin,
                      const float *restrict w, const float *restrict b, const int relu, float *restrict hout)
{
    if (din == 256 && dout == 256 && stride == 256) /* the papers' widths, as constants: measured ~5% faster */
        mlp_layer_panels(256, 256, 256, hin, w, b, relu, hout);
    else
        mlp_layer_panels(din, dout, stride, hin, w, b, relu, hout);
}

/* m rows: out = the MLP of (table[idx] + extra @ wt, ReLU if first_relu), through nlayers later
 * layers of widths[l] -> widths[l + 1] (weights ws, biases bs, zero-padded to whole vectors;
 * relus[l]); stride >= every padded width and widths[0]. 2 if out of memory. */
int ciisr_mlp_decode(int64_t m, int64_t e, int first_relu, const float *table, int64_t n, const int64_t *idx,
                     const float *extra, const float *wt, int64_t nlayers, const int64_t *widths, const int *relus,
                     const float *const *ws, const float *const *bs, int64_t stride, float *out)
{
    if (index_outside(m, idx, n))
        return 1;
    float *buf = aligned_alloc(64, 2 * MLP_ROWS * stride * sizeof(float));
    if (!buf)
        return 2;
    float *h[2] = {buf, buf + MLP_ROWS * stride};
    const int64_t d0 = widths[0], dout = widths[nlayers];
    for (int64_t r0 = 0; r0 < m; r0 += MLP_ROWS) {
        const int nr = m - r0 < MLP_ROWS ? (int)(m - r0) : MLP_ROWS;
        for (int r = 0; r < nr; r++) {
            const float *restrict t = table + idx[r0 + r] * d0;
            const float *restrict x = extra + (r0 + r) * e;
            float *restrict o = h[0] + r * stride;
            for (int64_t j = 0; j < d0; j++)
                o[j] = t[j];
            for (int64_t q = 0; q < e; q++) {
                const float xq = x[q];
                const float *restrict wq = wt + q * d0;
                for (int64_t j = 0; j < d0; j++)
                    o[j] += xq * wq[j];
            }
            if (first_relu)
                for (int64_t j = 0; j < d0; j++)
                    o[j] = o[j] > 0.0f ? o[j] : 0.0f;
        }
        if (nr < MLP_ROWS) /* the last block's missing rows: computed on zeros, never written out */
            memset(h[0] + nr * stride, 0, (MLP_ROWS - nr) * stride * sizeof(float));
        int cur = 0;
        for (int64_t l = 0; l < nlayers; l++, cur = 1 - cur)
            mlp_layer(widths[l], (widths[l + 1] + 15) / 16 * 16, stride, h[cur], ws[l], bs[l], relus[l], h[1 - cur]);
        for (int r = 0; r < nr; r++)
            memcpy(out + (r0 + r) * dout, h[cur] + r * stride, dout * sizeof(float));
    }
    free(buf);
    return 0;
}

#endif /* HAS_MLP_KERNEL */

#if defined(BASIS_K) && HAS_BASIS_KERNEL
/* Defined by fused_cpu.py:
 *   BASIS_K       number of bases
 *   BASIS_E       query inputs per row (relative coordinate, cell)
 *   BASIS_H0      width of each basis's first layer
 *   BASIS_OUT     output channels
 *   BASIS_STRIDE  floats per row of the activation buffers (>= every padded width)
 *   BASIS_LAYERS(nr)  the later layers as mixed_layer(nr, d_in, n_vec, relu, ...) calls,
 *                 alternating the buffers ha / hb; BASIS_RESULT names the last one's output.
 * Weights of later layer i: (K, d_in, 16 * n_vec), basis k's matrix transposed and its
 * output columns zero-padded to whole vectors; biases (K, 16 * n_vec), zero-padded.
 */
#define ROWS 16 /* rows decoded together: independent accumulators keep the FMA units busy (16: measured ~15% faster than 8) */

/* h_out[r] = relu?(sum_k c[r][k] (W_k h_in[r] + b_k)), for nr rows */
static inline __attribute__((always_inline)) void mixed_layer(const int nr, const int din, const int nv,
                                                              const int relu, const float *restrict c,
                                                              const float *restrict hin, float *restrict hout,
                                                              const float *restrict w, const float *restrict b)
{
    float ch[nr][BASIS_K * din]; /* c_k h_j: the outer product the stacked weights apply to */
    for (int r = 0; r < nr; r++)
        for (int k = 0; k < BASIS_K; k++)
            for (int j = 0; j < din; j++)
                ch[r][k * din + j] = c[r * BASIS_K + k] * hin[r * BASIS_STRIDE + j];
    v16 acc[nr][nv];
    for (int r = 0; r < nr; r++)
        for (int v = 0; v < nv; v++) {
            v16 s = {0};
            for (int k = 0; k < BASIS_K; k++)
                s += c[r * BASIS_K + k] * *(const v16u *)(b + (k * nv + v) * 16);
            acc[r][v] = s;
        }
    for (int kj = 0; kj < BASIS_K * din; kj++)
        for (int v = 0; v < nv; v++) {
            const v16 wv = *(const v16u *)(w + (kj * nv + v) * 16);
            for (int r = 0; r < nr; r++)
                acc[r][v] += ch[r][kj] * wv;
        }
    for (int r = 0; r < nr; r++) {
        memcpy(hout + r * BASIS_STRIDE, acc[r], sizeof(acc[r]));
        if (relu)
            for (int j = 0; j < nv * 16; j++)
                hout[r * BASIS_STRIDE + j] = hout[r * BASIS_STRIDE + j] > 0.0f ? hout[r * BASIS_STRIDE + j] : 0.0f;
    }
}

/* nr rows: mix the bases' first-layer pre-activations, ReLU, then the later layers */
static inline __attribute__((always_inline)) void basis_rows(const int nr, const float *restrict table,
                                                             const int64_t *restrict idx, const float *restrict extra,
                                                             const float *restrict wt, const float *restrict c,
                                                             const float *const *ws, const float *const *bs,
                                                             float *restrict out)
{
    float ha[nr * BASIS_STRIDE], hb[nr * BASIS_STRIDE];
    memset(ha, 0, sizeof(ha));
#if BASIS_H0 % 16 == 0 /* whole vectors: written out (measured ~20% faster than the plain loops below) */
    for (int r = 0; r < nr; r++) {
        const float *restrict t = table + idx[r] * (BASIS_K * BASIS_H0);
        const float *restrict x = extra + r * BASIS_E;
        v16 acc[BASIS_H0 / 16];
        for (int v = 0; v < BASIS_H0 / 16; v++) {
            v16 s = {0};
            for (int k = 0; k < BASIS_K; k++) {
                v16 p = *(const v16u *)(t + k * BASIS_H0 + v * 16);
                for (int q = 0; q < BASIS_E; q++)
                    p += x[q] * *(const v16u *)(wt + q * BASIS_K * BASIS_H0 + k * BASIS_H0 + v * 16);
                s += c[r * BASIS_K + k] * p;
            }
            acc[v] = s;
        }
        memcpy(ha + r * BASIS_STRIDE, acc, sizeof(acc));
        for (int j = 0; j < BASIS_H0; j++)
            ha[r * BASIS_STRIDE + j] = ha[r * BASIS_STRIDE + j] > 0.0f ? ha[r * BASIS_STRIDE + j] : 0.0f;
    }
#else
    for (int r = 0; r < nr; r++) {
        const float *restrict t = table + idx[r] * (BASIS_K * BASIS_H0);
        const float *restrict x = extra + r * BASIS_E;
        float acc[BASIS_H0] = {0};
        for (int k = 0; k < BASIS_K; k++) {
            float pre[BASIS_H0];
            for (int j = 0; j < BASIS_H0; j++)
                pre[j] = t[k * BASIS_H0 + j];
            for (int q = 0; q < BASIS_E; q++)
                for (int j = 0; j < BASIS_H0; j++)
                    pre[j] += x[q] * wt[q * BASIS_K * BASIS_H0 + k * BASIS_H0 + j];
            for (int j = 0; j < BASIS_H0; j++)
                acc[j] += c[r * BASIS_K + k] * pre[j];
        }
        for (int j = 0; j < BASIS_H0; j++)
            ha[r * BASIS_STRIDE + j] = acc[j] > 0.0f ? acc[j] : 0.0f;
    }
#endif
    BASIS_LAYERS(nr);
    for (int r = 0; r < nr; r++)
        memcpy(out + r * BASIS_OUT, BASIS_RESULT + r * BASIS_STRIDE, BASIS_OUT * sizeof(float));
}

int ciisr_basis_decode(int64_t m, const float *table, int64_t n, const int64_t *idx, const float *extra,
                       const float *wt, const float *coeff, const float *const *ws, const float *const *bs,
                       float *out)
{
    if (index_outside(m, idx, n))
        return 1;
    int64_t r = 0;
    for (; r + ROWS <= m; r += ROWS)
        basis_rows(ROWS, table, idx + r, extra + r * BASIS_E, wt, coeff + r * BASIS_K, ws, bs, out + r * BASIS_OUT);
    for (; r < m; r++)
        basis_rows(1, table, idx + r, extra + r * BASIS_E, wt, coeff + r * BASIS_K, ws, bs, out + r * BASIS_OUT);
    return 0;
}
#endif
