/* Fused float32 CPU kernels for the implicit decoders' inference (see fused_cpu.py).
 *
 * Compiled at first use for the machine it runs on (-march=native), loaded with ctypes.
 * Every kernel reads the latent-grid row table through the query's index itself, so the
 * gathered (M, D) rows are never written out, and returns nonzero (having written
 * nothing) when an index is outside the table.
 *
 * ciisr_first_layer: relu?(table[idx] + extra @ wt), the first Linear of an MLP whose
 *   latent part was precomputed on the LR grid; one pass over each output row instead of
 *   three (gather, add, ReLU).
 * ciisr_basis_decode: A-LIIF's basis MLPs, mixed per query by coefficients, from the
 *   table of all bases' first-layer latent parts to the output. Every activation stays in
 *   registers or L1; the layer dimensions are compile-time constants (BASIS_* below,
 *   defined by fused_cpu.py), so the loops unroll into straight vector code.
 */
#include <stdint.h>
#include <string.h>

/* 16 floats; the unaligned variant for loads from tensors */
typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

static int index_outside(int64_t m, const int64_t *idx, int64_t n)
{
    int bad = 0;
    for (int64_t i = 0; i < m; i++)
        bad |= (idx[i] < 0) | (idx[i] >= n);
    return bad;
}

int ciisr_first_layer(int64_t m, int64_t d, int64_t e, int relu, const float *table, int64_t n,
                      const int64_t *idx, const float *extra, const float *wt, float *out)
{
    if (index_outside(m, idx, n))
        return 1;
    for (int64_t r = 0; r < m; r++) {
        const float *restrict t = table + idx[r] * d;
        const float *restrict x = extra + r * e;
        float *restrict o = out + r * d;
        for (int64_t j = 0; j < d; j++)
            o[j] = t[j];
        for (int64_t q = 0; q < e; q++) {
            const float xq = x[q];
            const float *restrict w = wt + q * d;
            for (int64_t j = 0; j < d; j++)
                o[j] += xq * w[j];
        }
        if (relu)
            for (int64_t j = 0; j < d; j++)
                o[j] = o[j] > 0.0f ? o[j] : 0.0f;
    }
    return 0;
}

#ifdef BASIS_K
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
