/* Fused float32 CPU kernels for the implicit decoders (see fused_cpu.py): inference, and LTE's
 * feature and the encoders' 3x3 convolutions in training.
 *
 * Compiled at first use for the machine it runs on (-march=native), loaded with ctypes.
 * Every kernel reads the latent-grid row table through the query's index itself, so the
 * gathered (M, D) rows are never written out, and returns nonzero (having written
 * nothing) when an index is outside the table.
 *
 * ciisr_mlp_decode: an MLP whose first Linear's latent part was precomputed on the LR grid,
 *   from that row table to the output: per group of rows, the first layer (row + the
 *   query's coordinate part, ReLU) and every later layer run on activations that stay in
 *   cache (L1 / L2), and only the output is written. One pass instead of a gather, an add,
 *   a ReLU and an (M, width) tensor written and read back per layer.
 * ciisr_fourier_mlp_decode: the same MLP on LTE's Fourier feature, which it forms per row
 *   from the coefficient and frequency tables (vectorised sin / cos), so the (M, 256)
 *   feature is never written out either.
 * ciisr_fourier_feature (+ _backward): LTE's Fourier feature alone, for training, with its
 *   gradients gathered per latent (ciisr_queries_by_latent) instead of scattered per query.
 * ciisr_winograd_conv (+ _weight_grad): 3x3 convolutions for training, forward and
 *   gradients, by Winograd's F(4x4, 3x3) (a quarter of the multiplications).
 * ciisr_basis_decode: A-LIIF's basis MLPs, mixed per query by coefficients, from the
 *   table of all bases' first-layer latent parts to the output. Every activation stays in
 *   registers or L1; the layer dimensions are compile-time constants (BASIS_* below,
 *   defined by fused_cpu.py), so the loops unroll into straight vector code.
 * Which of them a build has depends on the instruction set (ciisr_kernels below).
 */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
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
#ifndef MLP_GROUP
#define MLP_GROUP 8 /* measured ~7% faster than 1 on 2 AVX2 cores (4-16 alike) */
#endif
typedef float vec __attribute__((vector_size(VEC * 4)));
typedef int32_t veci __attribute__((vector_size(VEC * 4)));

/* The inputs of a block of MLP_ROWS rows that are nonzero in at least one row: input[i],
 * and offset[0][i] / offset[1][i] where its row starts in a packed panel 32 / 16 wide, for
 * i < n. Skipping an input that is zero in every row adds exact zeros, so every sum stays
 * bit-for-bit the same. The lists run PREFETCH entries past n (zeros, a valid offset), so
 * the loop can prefetch ahead without a bound check. */
#define PREFETCH 8 /* weight rows fetched ahead: the hardware prefetcher misses an irregular stride (4-16 measured alike) */
struct live_inputs {
    int64_t *input;
    int64_t *offset[2];
    int n;
};

/* Columns [s, s + VEC * nv) of a packed panel pw columns wide, for MLP_ROWS rows:
 * hout = relu?(hin @ w + b), w the panel's (din, pw) slice of the packed weight; with
 * live, only its inputs are read (laid out so that a step costs one index load). */
static inline __attribute__((always_inline)) void mlp_tile(const int pw, const int s, const int nv,
                                                           const int64_t din, const int64_t stride,
                                                           const float *restrict hin, const float *restrict w,
                                                           const float *restrict b, const int relu,
                                                           const struct live_inputs *live, float *restrict hout)
{
    vec acc[MLP_ROWS][2];
    for (int v = 0; v < nv; v++) {
        const vec bias = *(const vec *)(b + s + VEC * v);
        for (int r = 0; r < MLP_ROWS; r++)
            acc[r][v] = bias;
    }
    if (live) {
        const int64_t *restrict offset = live->offset[pw == 32 ? 0 : 1], *restrict input = live->input;
        const int n = live->n;
#pragma GCC unroll 4
        for (int i = 0; i < n; i++) {
            const float *restrict wk = w + offset[i] + s;
            __builtin_prefetch(w + offset[i + PREFETCH] + s);
            const vec w0 = *(const vec *)wk;
            const vec w1 = nv == 2 ? *(const vec *)(wk + VEC) : w0;
            const float *restrict x = hin + input[i];
            for (int r = 0; r < MLP_ROWS; r++) {
                const float a = x[r * stride];
                acc[r][0] += a * w0;
                if (nv == 2)
                    acc[r][1] += a * w1;
            }
        }
    } else {
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
                                                            const struct live_inputs *live, float *restrict hout)
{
    for (int s = 0; s < pw; s += 2 * VEC)
        mlp_tile(pw, s, pw - s >= 2 * VEC ? 2 : 1, din, stride, hin, w, b, relu, live, hout);
}

/* A layer for nblocks blocks of MLP_ROWS rows (MLP_ROWS * stride floats apart): panel by
 * panel, each panel for every block while it is in L1 (the weights of a 256-wide MLP, 768 KB,
 * do not fit in L2; block by block they came from L3 once per block) */
static inline __attribute__((always_inline)) void mlp_layer_panels(const int64_t din, const int64_t dout,
                                                                   const int64_t stride, const float *restrict hin,
                                                                   const float *restrict w, const float *restrict b,
                                                                   const int relu,
                                                                   const struct live_inputs *const *live,
                                                                   const int nblocks, float *restrict hout)
{
    int64_t c = 0;
    for (; c + 32 <= dout; c += 32)
        for (int g = 0; g < nblocks; g++)
            mlp_panel(32, din, stride, hin + g * MLP_ROWS * stride, w + c * din, b + c, relu, live[g],
                      hout + g * MLP_ROWS * stride + c);
    if (c < dout)
        for (int g = 0; g < nblocks; g++)
            mlp_panel(16, din, stride, hin + g * MLP_ROWS * stride, w + c * din, b + c, relu, live[g],
                      hout + g * MLP_ROWS * stride + c);
}

/* List the inputs of a block that are nonzero in some row (see struct live_inputs); worth
 * it after a ReLU: on LTE's and LIIF's hidden layers, a sixth to a half of the inputs are
 * zero in all rows of a block of neighbouring queries (measured; it depends on the weights
 * and the image). din a multiple of VEC, the buffers' padding columns zero. */
static void list_live(const int64_t din, const int64_t stride, const float *restrict hin, struct live_inputs *live)
{
    const vec zero = {0};
    int n = 0;
    for (int64_t j = 0; j < din; j += VEC) {
        veci any = (veci)zero;
        for (int r = 0; r < MLP_ROWS; r++)
            any |= *(const veci *)(hin + r * stride + j);
        for (int l = 0; l < VEC; l++) {
            const int64_t k = j + l;
            live->input[n] = k;
            live->offset[0][n] = k * 32;
            live->offset[1][n] = k * 16;
            n += any[l] != 0; /* an input zero in every row is overwritten by the next */
        }
    }
    for (int i = n; i < n + PREFETCH; i++)
        live->input[i] = live->offset[0][i] = live->offset[1][i] = 0;
    live->n = n;
}

/* relu?(hin @ W + b) for nblocks blocks of MLP_ROWS rows; dout a multiple of 16 (W packed in
 * panels of 32 columns, the last one 16 wide when dout is not a multiple of 32). sparse: hin
 * comes out of a ReLU, so skip the inputs that are zero throughout a block. */
static void mlp_layer(const int64_t din, const int64_t dout, const int64_t stride, const float *restrict hin,
                      const float *restrict w, const float *restrict b, const int relu, const int sparse,
                      struct live_inputs *live, const int nblocks, float *restrict hout)
{
    const struct live_inputs *use[MLP_GROUP];
    for (int g = 0; g < nblocks; g++) {
        use[g] = NULL; /* the dense loop */
        if (sparse && din % VEC == 0) {
            list_live(din, stride, hin + g * MLP_ROWS * stride, &live[g]);
            if (live[g].n < din)
                use[g] = &live[g];
        }
    }
    if (din == 256 && dout == 256 && stride == 256) /* the papers' widths, as constants: measured ~5% faster */
        mlp_layer_panels(256, 256, 256, hin, w, b, relu, use, nblocks, hout);
    else
        mlp_layer_panels(din, dout, stride, hin, w, b, relu, use, nblocks, hout);
}

/* A decoder's working memory: two activation buffers of MLP_GROUP blocks of MLP_ROWS rows,
 * each block's live-input lists */
#define GROUP_ROWS (MLP_GROUP * MLP_ROWS)
struct mlp_scratch {
    float *h[2];
    struct live_inputs live[MLP_GROUP];
    int64_t *lists;
};

static int scratch_alloc(struct mlp_scratch *sc, const int64_t stride)
{
    const int64_t len = stride + PREFETCH;
    float *buf = aligned_alloc(64, 2 * GROUP_ROWS * stride * sizeof(float));
    int64_t *lists = calloc(3 * MLP_GROUP * len, sizeof(int64_t));
    if (!buf || !lists) {
        free(buf);
        free(lists);
        return 0;
    }
    sc->h[0] = buf;
    sc->h[1] = buf + GROUP_ROWS * stride;
    sc->lists = lists;
    for (int g = 0; g < MLP_GROUP; g++) {
        int64_t *l = lists + 3 * g * len;
        sc->live[g] = (struct live_inputs){l, {l + len, l + 2 * len}, 0};
    }
    return 1;
}

static void scratch_free(struct mlp_scratch *sc)
{
    free(sc->h[0]);
    free(sc->lists);
}

/* The layers on the first nr <= GROUP_ROWS rows of h[0]: out gets those nr rows.
 * first_sparse: h[0] came out of a ReLU. */
static void mlp_group(struct mlp_scratch *sc, const int nr, const int first_sparse, const int64_t nlayers,
                      const int64_t *widths, const int *relus, const float *const *ws, const float *const *bs,
                      const int64_t stride, float *out)
{
    const int nblocks = (nr + MLP_ROWS - 1) / MLP_ROWS;
    if (nr < nblocks * MLP_ROWS) /* the last block's missing rows: computed on zeros, never written out */
        memset(sc->h[0] + nr * stride, 0, (nblocks * MLP_ROWS - nr) * stride * sizeof(float));
    int cur = 0;
    for (int64_t l = 0; l < nlayers; l++, cur = 1 - cur)
        mlp_layer(widths[l], (widths[l + 1] + 15) / 16 * 16, stride, sc->h[cur], ws[l], bs[l], relus[l],
                  l == 0 ? first_sparse : relus[l - 1], sc->live, nblocks, sc->h[1 - cur]);
    const int64_t dout = widths[nlayers];
    for (int r = 0; r < nr; r++)
        memcpy(out + r * dout, sc->h[cur] + r * stride, dout * sizeof(float));
}

/* What a decoder feeds its layers: fill(inputs, i, o) writes query i's first activations to o */
typedef void (*fill_row)(const void *inputs, int64_t i, float *restrict o);

/* m rows through the layers (nlayers layers of widths[l] -> widths[l + 1], weights ws and
 * biases bs zero-padded to whole vectors, relus[l]), each row's input made by fill; idx: the
 * rows of the n-row tables that fill reads. stride >= every padded width and widths[0].
 * first_sparse: fill's rows come out of a ReLU. 1 if an index is outside the tables (nothing
 * written), 2 if out of memory. */
static int decode_rows(const int64_t m, const int64_t *idx, const int64_t n, const fill_row fill, const void *inputs,
                       const int first_sparse, const int64_t nlayers, const int64_t *widths, const int *relus,
                       const float *const *ws, const float *const *bs, const int64_t stride, float *out)
{
    if (index_outside(m, idx, n))
        return 1;
    struct mlp_scratch sc;
    if (!scratch_alloc(&sc, stride))
        return 2;
    for (int64_t r0 = 0; r0 < m; r0 += GROUP_ROWS) {
        const int nr = m - r0 < GROUP_ROWS ? (int)(m - r0) : GROUP_ROWS;
        for (int r = 0; r < nr; r++)
            fill(inputs, r0 + r, sc.h[0] + r * stride);
        mlp_group(&sc, nr, first_sparse, nlayers, widths, relus, ws, bs, stride, out + r0 * widths[nlayers]);
    }
    scratch_free(&sc);
    return 0;
}

struct latent_inputs {
    const float *table, *extra, *wt;
    const int64_t *idx;
    int64_t d0, e;
    int relu;
};

/* table[idx[i]] + extra[i] @ wt, ReLU'd if relu */
static void fill_latent_row(const void *inputs, const int64_t i, float *restrict o)
{
    const struct latent_inputs *in = inputs;
    const int64_t d0 = in->d0;
    const float *restrict t = in->table + in->idx[i] * d0;
    const float *restrict x = in->extra + i * in->e;
    for (int64_t j = 0; j < d0; j++)
        o[j] = t[j];
    for (int64_t q = 0; q < in->e; q++) {
        const float xq = x[q];
        const float *restrict wq = in->wt + q * d0;
        for (int64_t j = 0; j < d0; j++)
            o[j] += xq * wq[j];
    }
    if (in->relu)
        for (int64_t j = 0; j < d0; j++)
            o[j] = o[j] > 0.0f ? o[j] : 0.0f;
}

/* m rows: out = the MLP of (table[idx] + extra @ wt, ReLU if first_relu), through nlayers later
 * layers of widths[l] -> widths[l + 1] (see decode_rows). */
int ciisr_mlp_decode(int64_t m, int64_t e, int first_relu, const float *table, int64_t n, const int64_t *idx,
                     const float *extra, const float *wt, int64_t nlayers, const int64_t *widths, const int *relus,
                     const float *const *ws, const float *const *bs, int64_t stride, float *out)
{
    const struct latent_inputs in = {table, extra, wt, idx, widths[0], e, first_relu};
    return decode_rows(m, idx, n, fill_latent_row, &in, first_relu, nlayers, widths, relus, ws, bs, stride, out);
}

/* sin and cos of VEC angles at once, for |x| < SINCOS_LIMIT (the caller sends larger ones,
 * rare, to libm): x = j pi/2 + r with |r| <= pi/4, pi/2 in three parts whose products with j
 * are exact in that range (Cody and Waite's reduction, the constants of Cephes' sinf); then
 * the Cephes minimax polynomials on r, within a few float ulps of sin and cos there. */
#define SINCOS_LIMIT 8192.0f
static inline __attribute__((always_inline)) void sincos_vec(const vec x, vec *restrict sin_out,
                                                             vec *restrict cos_out)
{
    const vec round_magic = (vec){0} + 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    const vec j = (x * 0.636619772367581343f + round_magic) - round_magic;
    const vec r = ((x - j * 1.5703125f) - j * 4.837512969970703125e-4f) - j * 7.54978995489188216e-8f;
    const vec z = r * r;
    const vec sin_r = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * r + r;
    const vec cos_r = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f) * z * z -
                      0.5f * z + 1.0f;
    const veci q = __builtin_convertvector(j, veci);
    const veci odd = -(q & 1); /* all ones where j is odd: sin and cos swap */
    const veci s = ((veci)cos_r & odd) | ((veci)sin_r & ~odd);
    const veci c = ((veci)sin_r & odd) | ((veci)cos_r & ~odd);
    *sin_out = (vec)(s ^ ((q & 2) << 30));       /* negative for j mod 4 in {2, 3} */
    *cos_out = (vec)(c ^ (((q + 1) & 2) << 30)); /* negative for j mod 4 in {1, 2} */
}

/* LTE's Fourier feature for one query into o (2 * half floats): with the latent's
 * coefficient c (2 * half), frequencies fy, fx (half each), the relative coordinate (dy, dx)
 * and the phase weight's columns p0, p1 (half each) applied to the relative cell (cy, cx),
 * o = c * [cos(a), sin(a)], a = pi (fy dy + fx dx + p0 cy + p1 cx). */
typedef float vecu __attribute__((vector_size(VEC * 4), aligned(4))); /* for rows of tensors: unaligned */

/* The angles pi (fy dy + fx dx + p0 cy + p1 cx) of one vector of a Fourier feature's channels */
static inline __attribute__((always_inline)) vec fourier_angle(const vec fy, const vec fx, const float dy,
                                                               const float dx, const vec p0, const vec p1,
                                                               const float cy, const float cx)
{
    return (fy * dy + fx * dx + (p0 * cy + p1 * cx)) * 3.14159265358979323846f;
}

/* n < VEC floats from p, zero-padded to a vector (the partial last vector of a row) */
static inline vec load_part(const float *p, const int64_t n)
{
    vec v = {0};
    memcpy(&v, p, n * sizeof(float));
    return v;
}

/* all ones in the lanes whose angle is beyond sincos_vec's range, or NaN */
static inline __attribute__((always_inline)) veci beyond_sincos_range(const vec a)
{
    return ~((vec)((veci)a & ((veci){0} + 0x7fffffff)) < SINCOS_LIMIT);
}

/* LTE's Fourier feature for one query into o (2 * half floats): with the latent's
 * coefficient c (2 * half), frequencies fy, fx (half each), the relative coordinate (dy, dx)
 * and the phase weight's columns p0, p1 (half each) applied to the relative cell (cy, cx),
 * o = c * [cos(a), sin(a)], a = pi (fy dy + fx dx + p0 cy + p1 cx). */
static inline void fourier_row(const int64_t half, const float *restrict c, const float *restrict fy,
                               const float *restrict fx, const float dy, const float dx, const float *restrict p0,
                               const float *restrict p1, const float cy, const float cx, float *restrict o)
{
    veci large = {0}; /* lanes whose angle is beyond SINCOS_LIMIT, or NaN */
    vec a, sin_a, cos_a;
    int64_t j = 0;
    for (; j + VEC <= half; j += VEC) {
        a = fourier_angle(*(const vecu *)(fy + j), *(const vecu *)(fx + j), dy, dx, *(const vecu *)(p0 + j),
                          *(const vecu *)(p1 + j), cy, cx);
        large |= beyond_sincos_range(a);
        sincos_vec(a, &sin_a, &cos_a);
        *(vecu *)(o + j) = *(const vecu *)(c + j) * cos_a;
        *(vecu *)(o + half + j) = *(const vecu *)(c + half + j) * sin_a;
    }
    if (j < half) { /* a partial last vector, through zero-padded copies */
        const int64_t n = half - j;
        a = fourier_angle(load_part(fy + j, n), load_part(fx + j, n), dy, dx, load_part(p0 + j, n),
                          load_part(p1 + j, n), cy, cx);
        large |= beyond_sincos_range(a);
        sincos_vec(a, &sin_a, &cos_a);
        cos_a *= load_part(c + j, n);
        sin_a *= load_part(c + half + j, n);
        memcpy(o + j, &cos_a, n * sizeof(float));
        memcpy(o + half + j, &sin_a, n * sizeof(float));
    }
    int any = 0;
    for (int l = 0; l < VEC; l++)
        any |= large[l];
    if (__builtin_expect(any, 0)) /* the whole row again, on libm, from the same float angles */
        for (j = 0; j < half; j += VEC) {
            const int64_t n = half - j < VEC ? half - j : VEC;
            a = fourier_angle(load_part(fy + j, n), load_part(fx + j, n), dy, dx, load_part(p0 + j, n),
                              load_part(p1 + j, n), cy, cx);
            for (int64_t l = 0; l < n; l++) {
                o[j + l] = c[j + l] * cosf(a[l]);
                o[half + j + l] = c[half + j + l] * sinf(a[l]);
            }
        }
}

struct fourier_inputs {
    const float *coef, *freq_y, *freq_x, *rel, *cell, *phase_t;
    const int64_t *idx;
    int64_t half;
};

static void fill_fourier_row(const void *inputs, const int64_t i, float *restrict o)
{
    const struct fourier_inputs *in = inputs;
    const int64_t half = in->half, t = in->idx[i];
    fourier_row(half, in->coef + t * 2 * half, in->freq_y + t * half, in->freq_x + t * half, in->rel[2 * i],
                in->rel[2 * i + 1], in->phase_t, in->phase_t + half, in->cell[2 * i], in->cell[2 * i + 1], o);
}

/* m rows: out = the MLP (nlayers layers from widths[0] = 2 * half, see decode_rows) of LTE's
 * Fourier feature of query i: latent idx[i]'s rows of coef (n, 2 * half), freq_y and freq_x
 * (n, half), rel[i] = (dy, dx), cell[i] = (cy, cx), phase_t (2, half) the phase weight
 * transposed. */
int ciisr_fourier_mlp_decode(int64_t m, int64_t half, const float *coef, const float *freq_y, const float *freq_x,
                             int64_t n, const int64_t *idx, const float *rel, const float *cell,
                             const float *phase_t, int64_t nlayers, const int64_t *widths, const int *relus,
                             const float *const *ws, const float *const *bs, int64_t stride, float *out)
{
    const struct fourier_inputs in = {coef, freq_y, freq_x, rel, cell, phase_t, idx, half};
    return decode_rows(m, idx, n, fill_fourier_row, &in, 0, nlayers, widths, relus, ws, bs, stride, out);
}

/* Training: LTE's Fourier feature as its own autograd op, forward and backward here (the
 * MLP's products run on oneDNN). In torch the feature is ~10 passes over (M, 256) tensors
 * each way, the gathers' backward a scatter-add; here one pass each way. */

/* out (m, 2 * half): the Fourier features of queries [0, m) (see fourier_row). 1 if an
 * index is outside the tables (nothing written). */
int ciisr_fourier_feature(int64_t m, int64_t half, const float *coef, const float *freq_y, const float *freq_x,
                          int64_t n, const int64_t *idx, const float *rel, const float *cell, const float *phase_t,
                          float *out)
{
    if (index_outside(m, idx, n))
        return 1;
    const struct fourier_inputs in = {coef, freq_y, freq_x, rel, cell, phase_t, idx, half};
    for (int64_t i = 0; i < m; i++)
        fill_fourier_row(&in, i, out + i * 2 * half);
    return 0;
}

/* The m queries grouped by latent (a counting sort, stable): latent t's are
 * order[starts[t] .. starts[t + 1]), in increasing query order. The backward then gathers
 * per latent instead of scattering per query: no two threads write one latent's gradient,
 * and every sum is made in the same order whatever the thread count. 1 if an index is
 * outside [0, n). */
int ciisr_queries_by_latent(int64_t m, const int64_t *idx, int64_t n, int64_t *starts, int64_t *order)
{
    if (index_outside(m, idx, n))
        return 1;
    memset(starts, 0, (n + 1) * sizeof(int64_t));
    for (int64_t i = 0; i < m; i++)
        starts[idx[i] + 1]++;
    for (int64_t t = 0; t < n; t++)
        starts[t + 1] += starts[t];
    int64_t *next = malloc(n * sizeof(int64_t) + 1);
    if (!next)
        return 2;
    memcpy(next, starts, n * sizeof(int64_t));
    for (int64_t i = 0; i < m; i++)
        order[next[idx[i]]++] = i;
    free(next);
    return 0;
}

/* sin and cos of VEC angles, any magnitude: the vector polynomials, and libm for lanes beyond
 * their range (or NaN) */
static inline __attribute__((always_inline)) void sincos_any(const vec a, vec *restrict sin_a, vec *restrict cos_a)
{
    sincos_vec(a, sin_a, cos_a);
    const veci large = beyond_sincos_range(a);
    int any = 0;
    for (int l = 0; l < VEC; l++)
        any |= large[l];
    if (__builtin_expect(any, 0))
        for (int l = 0; l < VEC; l++)
            if (large[l]) {
                (*sin_a)[l] = sinf(a[l]);
                (*cos_a)[l] = cosf(a[l]);
            }
}

/* One vector of channels [j, j + nj) of latent t's gradients, from its queries' rows of grad
 * (see ciisr_fourier_feature_backward). nj == VEC: direct loads; else zero-padded copies. */
static inline __attribute__((always_inline)) void fourier_backward_vector(
    const int64_t t, const int64_t j, const int64_t nj, const int64_t half, const float *restrict coef,
    const float *restrict freq_y, const float *restrict freq_x, const int64_t *restrict starts,
    const int64_t *restrict order, const float *restrict rel, const float *restrict cell,
    const float *restrict phase_t, const float *restrict grad, float *restrict grad_coef, float *restrict grad_fy,
    float *restrict grad_fx, double *restrict grad_phase)
{
    const int full = nj == VEC;
#define LOAD(p) (full ? *(const vecu *)(p) : load_part((p), nj))
    const vec c_cos = LOAD(coef + t * 2 * half + j), c_sin = LOAD(coef + t * 2 * half + half + j);
    const vec fy = LOAD(freq_y + t * half + j), fx = LOAD(freq_x + t * half + j);
    const vec p0 = LOAD(phase_t + j), p1 = LOAD(phase_t + half + j);
    vec g_ccos = {0}, g_csin = {0}, g_fy = {0}, g_fx = {0}, g_p0 = {0}, g_p1 = {0};
    for (int64_t k = starts[t]; k < starts[t + 1]; k++) {
        const int64_t i = order[k];
        const float dy = rel[2 * i], dx = rel[2 * i + 1], cy = cell[2 * i], cx = cell[2 * i + 1];
        vec sin_a, cos_a;
        sincos_any(fourier_angle(fy, fx, dy, dx, p0, p1, cy, cx), &sin_a, &cos_a);
        const vec g_cos = LOAD(grad + i * 2 * half + j), g_sin = LOAD(grad + i * 2 * half + half + j);
        g_ccos += g_cos * cos_a;
        g_csin += g_sin * sin_a;
        /* d/da of c_cos cos(a) + c_sin sin(a), with a's own factor pi */
        const vec g_a = (g_sin * c_sin * cos_a - g_cos * c_cos * sin_a) * 3.14159265358979323846f;
        g_fy += g_a * dy;
        g_fx += g_a * dx;
        g_p0 += g_a * cy;
        g_p1 += g_a * cx;
    }
#undef LOAD
    const vec outs[4] = {g_ccos, g_csin, g_fy, g_fx};
    float *dst[4] = {grad_coef + t * 2 * half + j, grad_coef + t * 2 * half + half + j, grad_fy + t * half + j,
                     grad_fx + t * half + j};
    for (int o = 0; o < 4; o++)
        if (full)
            *(vecu *)dst[o] = outs[o];
        else
            memcpy(dst[o], &outs[o], nj * sizeof(float));
    for (int64_t l = 0; l < nj; l++) { /* the phase weight's gradient sums over every query: in double */
        grad_phase[j + l] += g_p0[l];
        grad_phase[half + j + l] += g_p1[l];
    }
}

/* The gradients of ciisr_fourier_feature for latents [t0, t1), given grad (m, 2 * half) of
 * its output and the queries grouped by latent (ciisr_queries_by_latent): grad_coef,
 * grad_fy, grad_fx get those latents' rows (zeros for a latent no query read), and
 * grad_phase (2, half) - the phase weight's, transposed - adds these latents' queries'
 * share. */
void ciisr_fourier_feature_backward(int64_t t0, int64_t t1, int64_t half, const float *coef, const float *freq_y,
                                    const float *freq_x, const int64_t *starts, const int64_t *order,
                                    const float *rel, const float *cell, const float *phase_t, const float *grad,
                                    float *grad_coef, float *grad_fy, float *grad_fx, double *grad_phase)
{
    for (int64_t t = t0; t < t1; t++) {
        int64_t j = 0;
        for (; j + VEC <= half; j += VEC)
            fourier_backward_vector(t, j, VEC, half, coef, freq_y, freq_x, starts, order, rel, cell, phase_t, grad,
                                    grad_coef, grad_fy, grad_fx, grad_phase);
        if (j < half)
            fourier_backward_vector(t, j, half - j, half, coef, freq_y, freq_x, starts, order, rel, cell, phase_t,
                                    grad, grad_coef, grad_fy, grad_fx, grad_phase);
    }
}


/* ---- Winograd F(4x4, 3x3): training convolutions (3x3, stride 1, zero padding 1) ----
 *
 * Each 4x4 block of outputs ("tile") comes from the 6x6 input patch around it as
 * Y = A^T [(G g G^T) . (B^T d B)] A: 36 products per channel pair instead of 144 (Lavin & Gray,
 * 2016). Per block of WINO_TILES tiles the patches are transformed (V: 36 x tiles x channels),
 * multiplied by the transformed weights at each of the 36 positions (MLP_ROWS x 2-vector
 * register tiles, as the MLP kernel), and transformed back, all within L2. Inputs and outputs
 * are NHWC (channels-last); channels are whole vectors (fused_cpu.py checks). The weight
 * transform and its gradient's (tiny) are done by the caller. Rounding: a few times a direct
 * convolution's (the transforms add and scale before the sums). */
#define WINO_TILES (MLP_ROWS * 4)

/* what fused_cpu.py needs to know of this build: channels must be whole vectors of this many
 * floats, and the weight gradient's transform has its input channels padded to whole blocks */
int ciisr_winograd_vector(void)
{
    return VEC;
}

int ciisr_winograd_rows(void)
{
    return MLP_ROWS;
}

static inline __attribute__((always_inline)) void wino_bt(const vec d0, const vec d1, const vec d2, const vec d3,
                                                          const vec d4, const vec d5, vec *restrict o)
{ /* B^T d for one column of a 6x6 patch */
    o[0] = 4 * d0 - 5 * d2 + d4;
    o[1] = d3 + d4 - 4 * (d1 + d2);
    o[2] = d4 - d3 + 4 * (d1 - d2);
    o[3] = d4 - d2 + 2 * (d3 - d1);
    o[4] = d4 - d2 + 2 * (d1 - d3);
    o[5] = 4 * d1 - 5 * d3 + d5;
}

static inline __attribute__((always_inline)) void wino_at(const vec m0, const vec m1, const vec m2, const vec m3,
                                                          const vec m4, const vec m5, vec *restrict o)
{ /* A^T m: 6 -> 4 */
    const vec a = m1 + m2, b = m1 - m2, c = m3 + m4, d = m3 - m4;
    o[0] = m0 + a + c;
    o[1] = b + 2 * d;
    o[2] = a + 4 * c;
    o[3] = b + 8 * d + m5;
}

static inline __attribute__((always_inline)) void wino_a(const vec d0, const vec d1, const vec d2, const vec d3,
                                                         vec *restrict o)
{ /* A d: 4 -> 6 (the transpose of wino_at, for output gradients) */
    o[0] = d0;
    o[1] = d0 + d1 + d2 + d3;
    o[2] = d0 - d1 + d2 - d3;
    o[3] = d0 + 2 * d1 + 4 * d2 + 8 * d3;
    o[4] = d0 - 2 * d1 + 4 * d2 - 8 * d3;
    o[5] = d3;
}

/* c[r][0:nv vectors] (+)= sum_k a[r * ars + k * aks] b[k][0:nv vectors] for MLP_ROWS rows r and
 * nk terms (b's rows ldb apart, c's ldc; accumulate: add to c instead of overwriting it): the
 * register tile of the 36 products (rows: tiles, terms: input channels) and of the weight
 * gradient's (rows: input channels, terms: tiles) */
static inline __attribute__((always_inline)) void wino_tile(const int nv, const int64_t nk, const float *restrict a,
                                                            const int64_t ars, const int64_t aks,
                                                            const float *restrict b, const int64_t ldb,
                                                            float *restrict c, const int64_t ldc, const int accumulate)
{
    vec acc[MLP_ROWS][2];
    const vec zero = {0};
    for (int r = 0; r < MLP_ROWS; r++)
        for (int q = 0; q < 2; q++)
            acc[r][q] = accumulate && q < nv ? *(const vecu *)(c + r * ldc + q * VEC) : zero;
#pragma GCC unroll 4
    for (int64_t k = 0; k < nk; k++) {
        const vec b0 = *(const vecu *)(b + k * ldb);
        const vec b1 = nv == 2 ? *(const vecu *)(b + k * ldb + VEC) : b0;
        for (int r = 0; r < MLP_ROWS; r++) {
            const float x = a[r * ars + k * aks];
            acc[r][0] += x * b0;
            if (nv == 2)
                acc[r][1] += x * b1;
        }
    }
    for (int r = 0; r < MLP_ROWS; r++)
        for (int q = 0; q < nv; q++)
            *(vecu *)(c + r * ldc + q * VEC) = acc[r][q];
}

struct wino_geometry {
    int64_t h, w, tiles_x, tiles_per_image;
};

/* tile `tile`'s image and the top-left pixel of its 4x4 outputs */
static inline void wino_tile_origin(const struct wino_geometry *geo, const int64_t tile, int64_t *img, int64_t *oy,
                                    int64_t *ox)
{
    const int64_t r = tile % geo->tiles_per_image;
    *img = tile / geo->tiles_per_image;
    *oy = r / geo->tiles_x * 4;
    *ox = r % geo->tiles_x * 4;
}

/* V[p][t][0:c] = (B^T d B)[p] of tile `tile`'s input patch, channels [0, c), stride ldv */
static void wino_input_tile(const struct wino_geometry *geo, const int64_t tile, const int64_t c, const float *x,
                            float *restrict v, const int64_t ldv)
{
    int64_t img, oy, ox;
    wino_tile_origin(geo, tile, &img, &oy, &ox);
    const int64_t y0 = oy - 1, x0 = ox - 1; /* the patch reaches one pixel past the outputs */
    const float *xi = x + img * geo->h * geo->w * c;
    const vec zero = {0};
    for (int64_t k = 0; k < c; k += VEC) {
        vec d[6][6], e[6][6], o[6];
        for (int i = 0; i < 6; i++)
            for (int j = 0; j < 6; j++) {
                const int64_t yy = y0 + i, xx = x0 + j;
                d[i][j] = yy >= 0 && yy < geo->h && xx >= 0 && xx < geo->w
                              ? *(const vecu *)(xi + (yy * geo->w + xx) * c + k) : zero;
            }
        for (int j = 0; j < 6; j++) {
            wino_bt(d[0][j], d[1][j], d[2][j], d[3][j], d[4][j], d[5][j], o);
            for (int i = 0; i < 6; i++)
                e[i][j] = o[i];
        }
        for (int i = 0; i < 6; i++) {
            wino_bt(e[i][0], e[i][1], e[i][2], e[i][3], e[i][4], e[i][5], o);
            for (int j = 0; j < 6; j++)
                *(vec *)(v + (i * 6 + j) * WINO_TILES * ldv + k) = o[j];
        }
    }
}

/* y = conv(x, w) + bias for tiles [t0, t1) of the n images (h x w, NHWC), given the
 * transformed weight u (36, cin, cout); bias may be NULL. Also the input gradient, with u of
 * the flipped, transposed weight. Returns 2 when out of memory (nothing written). */
int ciisr_winograd_conv(int64_t h, int64_t w, int64_t cin, int64_t cout, const float *x, const float *u,
                        const float *bias, float *y, int64_t t0, int64_t t1)
{
    const struct wino_geometry geo = {h, w, (w + 3) / 4, ((h + 3) / 4) * ((w + 3) / 4)};
    float *v = aligned_alloc(64, sizeof(float) * 36 * WINO_TILES * cin);
    float *m = aligned_alloc(64, sizeof(float) * 36 * WINO_TILES * cout);
    if (!v || !m) {
        free(v);
        free(m);
        return 2;
    }
    const vec zero = {0};
    for (int64_t b0 = t0; b0 < t1; b0 += WINO_TILES) {
        const int64_t nb = t1 - b0 < WINO_TILES ? t1 - b0 : WINO_TILES;
        for (int64_t t = 0; t < WINO_TILES; t++)
            if (t < nb)
                wino_input_tile(&geo, b0 + t, cin, x, v + t * cin, cin);
            else /* rows past the last tile: zeros, computed and never written out */
                for (int p = 0; p < 36; p++)
                    memset(v + (p * WINO_TILES + t) * cin, 0, sizeof(float) * cin);
        for (int p = 0; p < 36; p++) {
            const float *restrict vp = v + p * WINO_TILES * cin, *restrict up = u + p * cin * cout;
            float *restrict mp = m + p * WINO_TILES * cout;
            int64_t s = 0;
            for (; s + 2 * VEC <= cout; s += 2 * VEC)
                for (int r0 = 0; r0 < nb; r0 += MLP_ROWS) /* a last partial block: its rows only */
                    wino_tile(2, cin, vp + r0 * cin, cin, 1, up + s, cout, mp + r0 * cout + s, cout, 0);
            if (s < cout)
                for (int r0 = 0; r0 < nb; r0 += MLP_ROWS)
                    wino_tile(1, cin, vp + r0 * cin, cin, 1, up + s, cout, mp + r0 * cout + s, cout, 0);
        }
        for (int64_t t = 0; t < nb; t++) {
            int64_t img, oy, ox;
            wino_tile_origin(&geo, b0 + t, &img, &oy, &ox);
            float *yi = y + img * h * w * cout;
            for (int64_t k = 0; k < cout; k += VEC) {
                vec e[4][6], o[4];
                for (int j = 0; j < 6; j++) {
                    const float *mj = m + (j * WINO_TILES + t) * cout + k;
                    wino_at(*(const vec *)mj, *(const vec *)(mj + 6 * WINO_TILES * cout),
                            *(const vec *)(mj + 12 * WINO_TILES * cout), *(const vec *)(mj + 18 * WINO_TILES * cout),
                            *(const vec *)(mj + 24 * WINO_TILES * cout), *(const vec *)(mj + 30 * WINO_TILES * cout), o);
                    for (int i = 0; i < 4; i++)
                        e[i][j] = o[i];
                }
                const vec bv = bias ? *(const vecu *)(bias + k) : zero;
                for (int i = 0; i < 4 && oy + i < h; i++) {
                    wino_at(e[i][0], e[i][1], e[i][2], e[i][3], e[i][4], e[i][5], o);
                    for (int j = 0; j < 4 && ox + j < w; j++)
                        *(vecu *)(yi + ((oy + i) * w + ox + j) * cout + k) = o[j] + bv;
                }
            }
        }
    }
    free(v);
    free(m);
    return 0;
}

/* The weight gradient's transform, summed over tiles [t0, t1): du (36, cin_pad, cout) +=
 * V^T dM per position, V of the input x and dM = A gy A^T of the output gradient gy (both
 * NHWC); cin_pad: cin rounded up to whole MLP_ROWS (du's rows past cin get sums of
 * whatever follows a tile's channels: the caller drops them). The caller turns du into the
 * gradient (G^T du G). Returns 2 when out of memory. */
int ciisr_winograd_weight_grad(int64_t h, int64_t w, int64_t cin, int64_t cout, const float *x, const float *gy,
                               float *du, int64_t t0, int64_t t1)
{
    const struct wino_geometry geo = {h, w, (w + 3) / 4, ((h + 3) / 4) * ((w + 3) / 4)};
    const int64_t cin_pad = (cin + MLP_ROWS - 1) / MLP_ROWS * MLP_ROWS;
    const int64_t nv_floats = 36 * WINO_TILES * cin, slack = 64; /* the last row block reads past cin */
    float *v = aligned_alloc(64, sizeof(float) * (nv_floats + slack));
    float *m = aligned_alloc(64, sizeof(float) * 36 * WINO_TILES * cout);
    if (!v || !m) {
        free(v);
        free(m);
        return 2;
    }
    memset(v + nv_floats, 0, sizeof(float) * slack);
    const vec zero = {0};
    for (int64_t b0 = t0; b0 < t1; b0 += WINO_TILES) {
        const int64_t nb = t1 - b0 < WINO_TILES ? t1 - b0 : WINO_TILES;
        for (int64_t t = 0; t < WINO_TILES; t++) {
            if (t >= nb) { /* past the last tile: only read as the padding rows' finite garbage */
                for (int p = 0; p < 36; p++)
                    memset(v + (p * WINO_TILES + t) * cin, 0, sizeof(float) * cin);
                continue;
            }
            wino_input_tile(&geo, b0 + t, cin, x, v + t * cin, cin);
            int64_t img, oy, ox;
            wino_tile_origin(&geo, b0 + t, &img, &oy, &ox);
            const float *gi = gy + img * h * w * cout;
            for (int64_t k = 0; k < cout; k += VEC) {
                vec d[4][4], e[6][4], o[6];
                for (int i = 0; i < 4; i++)
                    for (int j = 0; j < 4; j++)
                        d[i][j] = oy + i < h && ox + j < w ? *(const vecu *)(gi + ((oy + i) * w + ox + j) * cout + k)
                                                           : zero;
                for (int j = 0; j < 4; j++) {
                    wino_a(d[0][j], d[1][j], d[2][j], d[3][j], o);
                    for (int i = 0; i < 6; i++)
                        e[i][j] = o[i];
                }
                for (int i = 0; i < 6; i++) {
                    wino_a(e[i][0], e[i][1], e[i][2], e[i][3], o);
                    for (int j = 0; j < 6; j++)
                        *(vec *)(m + ((i * 6 + j) * WINO_TILES + t) * cout + k) = o[j];
                }
            }
        }
        for (int p = 0; p < 36; p++) {
            const float *restrict vp = v + p * WINO_TILES * cin, *restrict mp = m + p * WINO_TILES * cout;
            float *restrict dup = du + p * cin_pad * cout;
            int64_t s = 0;
            for (; s + 2 * VEC <= cout; s += 2 * VEC)
                for (int64_t r0 = 0; r0 < cin_pad; r0 += MLP_ROWS)
                    wino_tile(2, nb, vp + r0, 1, cin, mp + s, cout, dup + r0 * cout + s, cout, 1);
            if (s < cout)
                for (int64_t r0 = 0; r0 < cin_pad; r0 += MLP_ROWS)
                    wino_tile(1, nb, vp + r0, 1, cin, mp + s, cout, dup + r0 * cout + s, cout, 1);
        }
    }
    free(v);
    free(m);
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
