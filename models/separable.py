"""SS-MSA with the AF module as fused CPU kernels: one pass over each window in cache.

In PyTorch ops (``MGSSAFAttention.ss_msa``, the reference path) the local branch is some thirty
small ops per block: 7x7 batched products, softmaxes over 7 elements, broadcast products and
their reductions, each sweeping its tensor through memory. This module computes the same
numbers with two C kernels, a forward and a backward, each of which loads every head's q and k
of one window from the ``(B, H, W, C)`` projection into cache and does all of its work there,
the AF module included: no map leaves the cache. The units (windows) run on PyTorch's OpenMP
threads (``models/ckernel.py``). Per window (``N = w*w`` positions; row attention ``R``, column
attention ``C``, separable map ``P``, AF module ``dw3x3 -> GELU -> 1x1``):

* ``forward``: for each head, ``R[j'][(i,j)]`` = softmax over ``j'`` of ``q(i,j).k(i,j')``,
  ``C[j'][i][i']`` = softmax over ``i'`` of ``q(i,j').k(i',j')``,
  ``P[(i',j')][(i,j)] = R[j'][(i,j)] * C[j'][i][i']`` and ``Y`` = the 3x3 depthwise
  convolution of ``P`` over key positions; then ``Wt = P + mix @ GELU(Y)`` (the 1x1 over
  heads) and ``out = Wt^T @ V + b_mix * sum(V)`` (the keys are the values). In training it
  stores ``R`` and ``C`` (7 + 7 values per query and head) for the backward, nothing else.
* ``backward``: ``P``, ``Y``, ``GELU(Y)`` and ``Wt`` recomputed from ``R`` and ``C``, then the
  gradients of the above in reverse (GELU's derivative included).

GELU is computed in the kernels, in float32 for each run of 64 map values: where all of them lie
in [-1, 1] (AF's inputs mostly do), GELU and its derivative by their Taylor series in y^2 (9
terms, no exp or division; relative error below 3e-7), else with a vectorised erfc (a Chebyshev
fit, relative error below 1.2e-7, and exp by its Taylor polynomial); in float64 with libm's. The
series took a fifth off the kernels' time (MG-SSAF-T's SS-MSA + AF per bf16 training step, batch
8, Zen 4 EPYC: 125-136 -> 98-108 ms). Against the maps
kept in memory between kernels and PyTorch ops (GELU and the 1x1 as ``addmm``), MG-SSAF-T's
SS-MSA + AF took 158 -> 129 ms of a training step at batch 8 and 134 -> 105 ms of a forward at
batch 16 (a Zen 4 EPYC, 2 threads); the maps its backward saved were four tensors of 17 MB per
stage-0 block.

Maps are stored key-major (``[key][query]``), so that the 3x3 convolution and its transpose are
sweeps over 49 contiguous queries. Parameter gradients are summed per window and then over the
windows in PyTorch, so no two threads write the same memory.

The kernels are PyTorch custom ops (``torch.library``): ``mgssaf::separable_attention`` (the
forward, which also returns ``R`` and ``C`` for its backward; they are not differentiable),
``mgssaf::separable_attention_inference`` (the same kernel, output only: where grad is off, or
neither the input nor the AF parameters require it) and
``mgssaf::separable_attention_backward``, each with a fake implementation (shapes, for fake
tensors and tracing) and a FLOP formula (``FlopCounterMode``);
the forward has an autograd formula (the backward op: once differentiable), the two forwards
vmap rules. So ``torch.compile``, ``make_fx``, ``torch.func.vmap`` and dispatch modes keep them
as single ops. They apply on CPU, in float32/float64 outside autocast and under autocast to
bfloat16 (they read the bf16 activations into float32, compute in float32 and write the output,
and the gradient of the bf16 input, in bf16, as the PyTorch ops give them under autocast), to
stage maps that need no window padding (every stage of the released models at 224, and at
448); everywhere else ``ss_msa`` runs its PyTorch ops: CUDA, bf16 weights outside autocast,
autocast to float16, padded maps, no C compiler, within ``pytorch_ops()``, and in graphs
recorded to run elsewhere (``torch.export``, whose programs, like their ONNX files, hold
standard ATen ops only, and ``torch.jit.trace``). Results agree with the PyTorch ops to float
round-off (tested).
"""
from __future__ import annotations

import contextlib
import ctypes
import threading
from typing import Iterator, Optional

import torch
from torch import nn
from torch.utils.flop_counter import register_flop_formula

from . import ckernel
from .conv import recording, wants_grad

__all__ = ["fused_available", "pytorch_ops", "separable_attention"]

_SOURCE = r"""
#include <math.h>
#include <string.h>

/* WS: window side, D: head dimension (a multiple of VL), REAL: float or double, the type the
 * kernels compute in and of the maps and parameters; IO_IS_BF16: the activations (x, out and
 * their gradients) are bfloat16, read into REAL = float and rounded back to nearest even. */
#define N (WS * WS)
#define VL 8
#define NQ ((N + VL - 1) / VL * VL) /* query axis of the maps, zero-padded to whole vectors */
#define SCRATCH (4 * N * D + D * NQ + N * NQ + 2 * N * WS)
#define INLINE static inline __attribute__((always_inline))

typedef REAL vec __attribute__((vector_size(VL * sizeof(REAL)), aligned(sizeof(REAL)), may_alias));
#define V(p) (*(vec *)(p))

#if IO_IS_BF16
#if !REAL_IS_FLOAT
#error "bfloat16 activations are read into float"
#endif
typedef unsigned short IO;
INLINE float ld(IO v) {
    union { unsigned int u; float f; } c = {.u = (unsigned int)v << 16};
    return c.f;
}
INLINE IO st(float f) {
    union { float f; unsigned int u; } c = {.f = f};
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (IO)((c.u >> 16) | 0x40); /* NaN stays NaN */
    return (IO)((c.u + 0x7fffu + ((c.u >> 16) & 1)) >> 16);
}
#else
typedef REAL IO;
#define ld(v) (v)
#define st(v) (v)
#endif

typedef struct Job Job;
struct Job {
    const IO *x;                          /* (B, H, W, ps): q of head h at h*D, k at (heads+h)*D */
    const REAL *wdw, *bdw, *bmix;         /* AF: (heads, 9) 3x3 weights; biases (heads) */
    const REAL *mix;                      /* AF: (heads, heads) 1x1 weights */
    REAL *rowA, *colA;                    /* (heads, G, WS, N): R[j'][(i,j)]; C[j'][i][i'] */
    IO *out;                              /* (B, H, W, heads, D) */
    const IO *dout;                       /* (B, H, W, heads, D) */
    IO *dx;                               /* (B, H, W, 2*heads*D) */
    REAL *part, *bpart, *mpart;           /* per-unit parameter gradients (see backward) */
    REAL *scratch;                        /* ssmsa_scratch(heads) values per thread */
    long B, H, W, ps, heads, G, threads;
    double scale;
    int (*thread_num)(void), (*num_threads)(void);
    void (*unit)(const Job *, long, REAL *);
};

/* Pixel index (b*H + y)*W + x of position n of window g. */
INLINE long pixel(const Job *t, long g, long n) {
    const long nw = t->W / WS, per_image = (t->H / WS) * nw, r = g % per_image;
    return ((g / per_image) * t->H + (r / nw) * WS + n / WS) * t->W + (r % nw) * WS + n % WS;
}

INLINE REAL dot(const REAL *a, const REAL *b, long len) {
    REAL s = 0;
    for (long e = 0; e < len; e++) s += a[e] * b[e];
    return s;
}

#if REAL_IS_FLOAT
typedef int ivec __attribute__((vector_size(VL * sizeof(int))));
typedef unsigned int uvec __attribute__((vector_size(VL * sizeof(int))));
/* Lanewise "m ? a : b" for a comparison's mask m (C has no ?: on vectors). */
INLINE vec select(ivec m, vec a, vec b) { return (vec)(((ivec)a & m) | ((ivec)b & ~m)); }

/* exp(x) for x in [-86, 88] (e^-86 below): x = n ln2 + r, |r| <= ln2/2, e^r by its Taylor
 * polynomial of degree 7 (error below 6e-9), times 2^n through the exponent bits. ln 2 is split
 * in two parts for r; where the compiler merges them (-fassociative-math) the relative error
 * grows to a few 1e-6 at |x| near 88, far out in GELU's tails and where a softmax's terms are
 * below 1e-37 of its largest. */
INLINE vec vexp(vec x) {
    const vec lo = (vec){0} - 86.0f, hi = (vec){0} + 88.0f, half = (vec){0} + 0.5f;
    x = select(x < lo, lo, x);
    x = select(x > hi, hi, x);
    const vec t = x * 1.44269504f;
    const ivec n = __builtin_convertvector(t + select(t < 0, -half, half), ivec);
    const vec nf = __builtin_convertvector(n, vec);
    const vec r = (x - nf * 0.693145752f) - nf * 1.42860677e-06f;
    vec p = (vec){0} + 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    return (vec)((ivec)p + (ivec)((uvec)n << 23));
}
#endif

/* v[e] = exp(v[e]) for the n values at v: vexp in float32 (a whole vector at a time, the last
 * partial one through a copy), libm's exp in float64. */
static void exp_values(REAL *v, long n) {
#if REAL_IS_FLOAT
    long e = 0;
    for (; e + VL <= n; e += VL) V(v + e) = vexp(V(v + e));
    if (e < n) {
        vec tail = {0};
        memcpy(&tail, v + e, (n - e) * sizeof(REAL));
        tail = vexp(tail);
        memcpy(v + e, &tail, (n - e) * sizeof(REAL));
    }
#else
    for (long e = 0; e < n; e++) v[e] = exp(v[e]);
#endif
}

/* A register tile of a small matrix product: for r < RB <= 3 rows and WV <= 4 vectors of VL
 * columns, c[r*ldc + :] = init[r*ldi + :] (or 0 if init is null)
 *                         + sum_{s<S} a[r*ar + s*as] * b[s*ldb + :]. */
INLINE void tile(REAL *c, long ldc, const REAL *init, long ldi, const REAL *a, long ar, long as,
                 const REAL *b, long ldb, long S, const int RB, const int WV) {
    vec acc[3][4];
    _Pragma("GCC unroll 3") for (int r = 0; r < RB; r++)
        _Pragma("GCC unroll 4") for (int v = 0; v < WV; v++)
            acc[r][v] = init ? V(init + r * ldi + v * VL) : (vec){0};
    for (long s = 0; s < S; s++) {
        REAL av[3];
        _Pragma("GCC unroll 3") for (int r = 0; r < RB; r++) av[r] = a[r * ar + s * as];
        _Pragma("GCC unroll 4") for (int v = 0; v < WV; v++) {
            const vec bv = V(b + s * ldb + v * VL);
            _Pragma("GCC unroll 3") for (int r = 0; r < RB; r++) acc[r][v] += av[r] * bv;
        }
    }
    _Pragma("GCC unroll 3") for (int r = 0; r < RB; r++)
        _Pragma("GCC unroll 4") for (int v = 0; v < WV; v++)
            V(c + r * ldc + v * VL) = acc[r][v];
}

/* The product over R rows and WT vectors, in tiles of 3 rows and up to 4 vectors. */
INLINE void gemm(REAL *c, long ldc, const REAL *init, long ldi, const REAL *a, long ar, long as,
                 const REAL *b, long ldb, long R, long S, const int WT) {
    for (int v0 = 0; v0 < WT; v0 += 4) {
        const long off = v0 * VL;
        const REAL *in = init ? init + off : 0;
        const int wv = WT - v0 >= 4 ? 4 : (WT % 4 ? WT % 4 : 4);
        long r = 0;
        for (; r + 3 <= R; r += 3)
            tile(c + r * ldc + off, ldc, in ? in + r * ldi : 0, ldi, a + r * ar, ar, as, b + off, ldb, S, 3, wv);
        for (; r < R; r++)
            tile(c + r * ldc + off, ldc, in ? in + r * ldi : 0, ldi, a + r * ar, ar, as, b + off, ldb, S, 1, wv);
    }
}

INLINE REAL hsum(vec v) {
    REAL s = 0;
    for (int e = 0; e < VL; e++) s += v[e];
    return s;
}

/* Rows of head h in window g, from (B, H, W, stride) maps at channel offset `channel`, times
 * scale, to (N, D); and back. */
static void gather(const Job *t, const IO *src, long stride, long channel, long g,
                   REAL scale, REAL *rows) {
    for (long n = 0; n < N; n++) {
        const IO *p = src + pixel(t, g, n) * stride + channel;
        for (long e = 0; e < D; e++) rows[n * D + e] = ld(p[e]) * scale;
    }
}

static void scatter(const Job *t, IO *dst, long stride, long channel, long g, REAL scale,
                    const REAL *rows) {
    for (long n = 0; n < N; n++) {
        IO *p = dst + pixel(t, g, n) * stride + channel;
        for (long e = 0; e < D; e++) p[e] = st(rows[n * D + e] * scale);
    }
}

/* Head h of window g: row and column attention (ra, ca: N*WS each). */
static void attention(const Job *t, long h, long g, REAL *s, REAL *ra, REAL *ca) {
    REAL *q = s, *k = s + N * D, mx[N], sum[N];
    gather(t, t->x, t->ps, h * D, g, (REAL)t->scale, q);
    gather(t, t->x, t->ps, (t->heads + h) * D, g, 1, k);
    /* row attention ra[j'][n]: query n = (i, j) over the keys (i, j') of its row */
    for (long jj = 0; jj < WS; jj++)
        for (long n = 0; n < N; n++) ra[jj * N + n] = dot(q + n * D, k + (n / WS * WS + jj) * D, D);
    for (long n = 0; n < N; n++) mx[n] = ra[n], sum[n] = 0;
    for (long jj = 1; jj < WS; jj++)
        for (long n = 0; n < N; n++) mx[n] = ra[jj * N + n] > mx[n] ? ra[jj * N + n] : mx[n];
    for (long jj = 0; jj < WS; jj++)
        for (long n = 0; n < N; n++) ra[jj * N + n] -= mx[n];
    exp_values(ra, N * WS);
    for (long jj = 0; jj < WS; jj++)
        for (long n = 0; n < N; n++) sum[n] += ra[jj * N + n];
    for (long jj = 0; jj < WS; jj++)
        for (long n = 0; n < N; n++) ra[jj * N + n] /= sum[n];
    /* column attention ca[j'][i][i']: query (i, j') over the keys (i', j') of its column */
    for (long jj = 0; jj < WS; jj++)
        for (long i = 0; i < WS; i++) {
            REAL *c = ca + (jj * WS + i) * WS, m;
            for (long ii = 0; ii < WS; ii++) c[ii] = dot(q + (i * WS + jj) * D, k + (ii * WS + jj) * D, D);
            m = c[0];
            for (long ii = 1; ii < WS; ii++) m = c[ii] > m ? c[ii] : m;
            for (long ii = 0; ii < WS; ii++) c[ii] -= m;
        }
    exp_values(ca, N * WS);
    for (long row = 0; row < N; row++) {
        REAL *c = ca + row * WS, total = 0;
        for (long ii = 0; ii < WS; ii++) total += c[ii];
        for (long ii = 0; ii < WS; ii++) c[ii] /= total;
    }
}

/* Head h: the separable map P from ra and ca, and Y, AF's 3x3 convolution of it (N*NQ each). */
static void maps(const Job *t, long h, const REAL *ra, const REAL *ca, REAL *P, REAL *Y) {
    /* P[(i', j')][(i, j)] = ra[j'][(i, j)] * ca[j'][i][i'] */
    for (long ii = 0; ii < WS; ii++)
        for (long jj = 0; jj < WS; jj++) {
            REAL *p = P + (ii * WS + jj) * NQ;
            for (long i = 0; i < WS; i++) {
                const REAL c = ca[(jj * WS + i) * WS + ii];
                for (long j = 0; j < WS; j++) p[i * WS + j] = ra[jj * N + i * WS + j] * c;
            }
            for (long n = N; n < NQ; n++) p[n] = 0;
        }
    /* Y: the AF's 3x3 depthwise convolution over the key positions (zero padding 1) */
    const REAL *w3 = t->wdw + h * 9;
    for (long a = 0; a < WS; a++)
        for (long b = 0; b < WS; b++) {
            vec acc[NQ / VL];
            for (int v = 0; v < NQ / VL; v++) acc[v] = (vec){0} + t->bdw[h];
            for (long di = 0; di < 3; di++)
                for (long dj = 0; dj < 3; dj++) {
                    const long ia = a + di - 1, ib = b + dj - 1;
                    if (ia < 0 || ia >= WS || ib < 0 || ib >= WS) continue;
                    const REAL wv = w3[di * 3 + dj], *p = P + (ia * WS + ib) * NQ;
                    for (int v = 0; v < NQ / VL; v++) acc[v] += wv * V(p + v * VL);
                }
            for (int v = 0; v < NQ / VL; v++) V(Y + (a * WS + b) * NQ + v * VL) = acc[v];
        }
}

/* out[n] = b_mix * sum_m v[m] + sum_m Wt[m][n] v[m], for head h of window g */
static void apply(const Job *t, long h, long g, REAL *s, const REAL *Wt) {
    REAL *v = s, *o = s + N * D, vsum[D] = {0};
    gather(t, t->x, t->ps, (t->heads + h) * D, g, 1, v);
    for (long m = 0; m < N; m++)
        for (long e = 0; e < D; e++) vsum[e] += v[m * D + e];
    for (long e = 0; e < D; e++) vsum[e] *= t->bmix[h];
    gemm(o, D, vsum, 0, Wt, 1, NQ, v, D, N, N, D / VL);
    scatter(t, t->out, t->heads * D, h * D, g, 1, o);
}

/* dWt[m][n] = go[n] . v[m]; dv[m] = b_mix * sum_n go[n] + sum_n Wt[m][n] go[n] (N*D: the
 * values' part of k's gradient); *dbmix = d b_mix = sum_n go[n] . sum_m v[m] (head h, window g) */
static void apply_backward(const Job *t, long h, long g, REAL *s, const REAL *Wt, REAL *dWt,
                           REAL *dv, REAL *dbmix) {
    REAL *v = s, *go = s + N * D, *goT = go + N * D, vsum[D] = {0}, gsum[D] = {0};
    gather(t, t->x, t->ps, (t->heads + h) * D, g, 1, v);
    gather(t, t->dout, t->heads * D, h * D, g, 1, go);
    for (long m = 0; m < N; m++)
        for (long e = 0; e < D; e++) vsum[e] += v[m * D + e], gsum[e] += go[m * D + e];
    *dbmix = dot(gsum, vsum, D);
    for (long e = 0; e < D; e++) {
        for (long n = 0; n < N; n++) goT[e * NQ + n] = go[n * D + e];
        for (long n = N; n < NQ; n++) goT[e * NQ + n] = 0;
    }
    gemm(dWt, NQ, 0, 0, v, D, 1, goT, NQ, N, D, NQ / VL);
    for (long e = 0; e < D; e++) gsum[e] *= t->bmix[h];
    gemm(dv, D, gsum, 0, Wt, NQ, 1, go, D, N, N, D / VL);
}

/* From dY (through the GELU) and dWt of head h: the AF convolution's gradients (part[tap], bias
 * at tap 9), then dP = dWt + conv^T(dY), back through P = R * C and both softmaxes to q and k;
 * k's gradient is that plus dv, its gradient as the values (apply_backward), stored once. */
static void scores_backward(const Job *t, long h, long g, REAL *s, const REAL *P,
                            const REAL *dy, const REAL *dWt, const REAL *dv, const REAL *ra,
                            const REAL *ca, REAL *part) {
    REAL *q = s, *k = q + N * D, *dq = k + N * D, *dk = dq + N * D;
    REAL *dP = dk + N * D, *dra = dP + N * NQ, *dca = dra + N * WS, sum[N];
    gather(t, t->x, t->ps, h * D, g, (REAL)t->scale, q);
    gather(t, t->x, t->ps, (t->heads + h) * D, g, 1, k);
    const REAL *w3 = t->wdw + h * 9;
    memcpy(dP, dWt, N * NQ * sizeof(REAL));
    vec bias = {0};
    for (long mn = 0; mn < N * NQ; mn += VL) bias += V(dy + mn);
    part[9] = hsum(bias);
    for (long tap = 0; tap < 9; tap++) part[tap] = 0;
    for (long a = 0; a < WS; a++)
        for (long b = 0; b < WS; b++)
            for (long di = 0; di < 3; di++)
                for (long dj = 0; dj < 3; dj++) {
                    const long ia = a + di - 1, ib = b + dj - 1;
                    if (ia < 0 || ia >= WS || ib < 0 || ib >= WS) continue;
                    const REAL *yrow = dy + (a * WS + b) * NQ, wv = w3[di * 3 + dj];
                    REAL *d = dP + (ia * WS + ib) * NQ;
                    part[di * 3 + dj] += dot(yrow, P + (ia * WS + ib) * NQ, NQ);
                    for (int v = 0; v < NQ / VL; v++) V(d + v * VL) += wv * V(yrow + v * VL);
                }
    /* P[(i', j')][(i, j)] = ra[j'][(i, j)] * ca[j'][i][i'] */
    memset(dra, 0, N * WS * sizeof(REAL));
    for (long ii = 0; ii < WS; ii++)
        for (long jj = 0; jj < WS; jj++)
            for (long i = 0; i < WS; i++) {
                const REAL *dp = dP + (ii * WS + jj) * NQ + i * WS, *r = ra + jj * N + i * WS;
                const REAL c = ca[(jj * WS + i) * WS + ii];
                REAL *dr = dra + jj * N + i * WS, acc = 0;
                for (long j = 0; j < WS; j++) dr[j] += dp[j] * c, acc += dp[j] * r[j];
                dca[(jj * WS + i) * WS + ii] = acc;
            }
    /* softmax backward: dS = A * (dA - sum(dA * A)) over the keys */
    for (long n = 0; n < N; n++) sum[n] = 0;
    for (long jj = 0; jj < WS; jj++)
        for (long n = 0; n < N; n++) sum[n] += dra[jj * N + n] * ra[jj * N + n];
    for (long jj = 0; jj < WS; jj++)
        for (long n = 0; n < N; n++) dra[jj * N + n] = ra[jj * N + n] * (dra[jj * N + n] - sum[n]);
    for (long row = 0; row < N; row++) {
        const REAL *c = ca + row * WS;
        REAL *dc = dca + row * WS;
        const REAL sc = dot(c, dc, WS);
        for (long ii = 0; ii < WS; ii++) dc[ii] = c[ii] * (dc[ii] - sc);
    }
    /* to q and k through the row scores (i, j).(i, j') of each window row i ... */
    for (long i = 0; i < WS; i++) {
        const long row = i * WS;
        gemm(dq + row * D, D, 0, 0, dra + row, 1, N, k + row * D, D, WS, WS, D / VL);
        gemm(dk + row * D, D, dv + row * D, D, dra + row, N, 1, q + row * D, D, WS, WS, D / VL);
    }
    /* ... and the column scores (i, j').(i', j') of each window column j' */
    for (long jj = 0; jj < WS; jj++) {
        const REAL *dc = dca + jj * WS * WS;
        gemm(dq + jj * D, WS * D, dq + jj * D, WS * D, dc, WS, 1, k + jj * D, WS * D, WS, WS, D / VL);
        gemm(dk + jj * D, WS * D, dk + jj * D, WS * D, dc, 1, WS, q + jj * D, WS * D, WS, WS, D / VL);
    }
    scatter(t, t->dx, 2 * t->heads * D, h * D, g, (REAL)t->scale, dq);
    scatter(t, t->dx, 2 * t->heads * D, (t->heads + h) * D, g, 1, dk);
}

#if REAL_IS_FLOAT
/* Phi(y) = (1 + erf(y/sqrt 2)) / 2 = erfc(-y/sqrt 2) / 2, the standard normal CDF, with erfc(z)
 * for z = |y|/sqrt 2 by the Chebyshev fit of Numerical Recipes (relative error below 1.2e-7 for
 * all z), so that it is computed without cancellation also for negative y. */
INLINE vec vphi(vec y) {
    const ivec negative = y < 0;
    const vec z = select(negative, -y, y) * 0.707106781f, t = 1.0f / (1.0f + 0.5f * z);
    vec p = (vec){0} + 0.17087277f;
    p = p * t - 0.82215223f;
    p = p * t + 1.48851587f;
    p = p * t - 1.13520398f;
    p = p * t + 0.27886807f;
    p = p * t - 0.18628806f;
    p = p * t + 0.09678418f;
    p = p * t + 0.37409196f;
    p = p * t + 1.00002368f;
    p = p * t - 1.26551223f;
    const vec erfc = t * vexp(p - z * z);
    return 0.5f * select(negative, erfc, 2.0f - erfc);
}

/* GELU(y) = y Phi(y); its derivative Phi(y) + y phi(y), phi the standard normal density */
INLINE vec vgelu(vec y) { return y * vphi(y); }
INLINE vec vgelu_grad(vec y) { return vphi(y) + y * 0.398942280f * vexp(-0.5f * y * y); }

/* For |y| <= 1, with u = y^2: Phi(y) - 1/2 = y S(u) and GELU'(y) - 1/2 = y T(u), S and T the
 * Taylor series (9 terms) of erf(y/sqrt 2)/(2y) = sum_n (-1)^n u^n / (sqrt(2 pi) 2^n n! (2n+1))
 * and of S(u) + exp(-u/2)/sqrt(2 pi): no exp, no division. The terms alternate and fall, so
 * Horner's rule is stable; the truncation is below 3e-9, and GELU's relative error below 3e-7
 * (at y = -1, where 1/2 + y S(u) cancels to Phi(-1) = 0.16). */
#define SERIES_BOUND 1.0f
static const float SERIES_S[9] = {
    2.273529824e-09f, -4.122667415e-08f, 6.659693516e-07f,
    -9.444656260e-06f, 1.154346876e-04f, -1.187328215e-03f,
    9.973557010e-03f, -6.649038007e-02f, 3.989422804e-01f
};
static const float SERIES_T[9] = {
    4.092353684e-08f, -6.596267864e-07f, 9.323570923e-06f,
    -1.133358751e-04f, 1.154346876e-03f, -9.498625724e-03f,
    5.984134206e-02f, -2.659615203e-01f, 7.978845608e-01f
};
/* The series' value at u by Horner's rule, its coefficients c highest first */
INLINE vec series(const float *c, vec u) {
    vec p = (vec){0} + c[0];
    for (int k = 1; k < 9; k++) p = p * u + c[k];
    return p;
}
INLINE vec vgelu_series(vec y) { return y * (0.5f + y * series(SERIES_S, y * y)); }
INLINE vec vgelu_grad_series(vec y) { return 0.5f + y * series(SERIES_T, y * y); }

/* Whether every one of the n values (a multiple of VL) at y lies in [-1, 1] (NaN does too:
 * the series give NaN for it, as the erfc path does). */
static int series_range(const REAL *y, long n) {
    ivec out = {0};
    for (long e = 0; e < n; e += VL)
        out |= (V(y + e) > SERIES_BOUND) | (V(y + e) < -SERIES_BOUND);
    for (int l = 0; l < VL; l++)
        if (out[l]) return 0;
    return 1;
}
#else
INLINE vec vgelu(vec y) {
    vec out;
    for (int e = 0; e < VL; e++) out[e] = 0.5 * y[e] * erfc(-y[e] * 0.70710678118654752440);
    return out;
}
INLINE vec vgelu_grad(vec y) {
    vec out;
    for (int e = 0; e < VL; e++)
        out[e] = 0.5 * erfc(-y[e] * 0.70710678118654752440)
                 + y[e] * 0.39894228040143267794 * exp(-0.5 * y[e] * y[e]);
    return out;
}
#define series_range(y, n) 0 /* double: libm's erfc always */
#define vgelu_series vgelu
#define vgelu_grad_series vgelu_grad
#endif

/* a[e] = GELU(y[e]) for the n values (a multiple of VL) at y, into a (which may be y): by the
 * series in each run of GELU_RUN values that allows it, else by erfc. */
#define GELU_RUN 64
static void gelu_values(const REAL *y, REAL *a, long n) {
    for (long e0 = 0; e0 < n; e0 += GELU_RUN) {
        const long e1 = e0 + GELU_RUN < n ? e0 + GELU_RUN : n;
        if (series_range(y + e0, e1 - e0))
            for (long e = e0; e < e1; e += VL) V(a + e) = vgelu_series(V(y + e));
        else
            for (long e = e0; e < e1; e += VL) V(a + e) = vgelu(V(y + e));
    }
}

/* Head h's AF weights Wt = P[h] + sum_k mix[h][k] A[k] (A = GELU(Y) of every head), values
 * e0 to e1 of each map, into wt[e] (which may be P[h] itself). */
INLINE void mix_head(const Job *t, long h, const REAL *P, const REAL *A, REAL *wt, long e0,
                     long e1) {
    const long heads = t->heads, M = N * NQ;
    for (long e = e0; e < e1; e += VL) {
        vec acc = V(P + h * M + e);
        for (long k = 0; k < heads; k++) acc += t->mix[h * heads + k] * V(A + k * M + e);
        V(wt + e) = acc;
    }
}

/* Wt of every head in place of P, a block of MIXB values at a time (every head's block of A
 * stays in L1); A = GELU(Y) is first computed in place of Y. */
#define MIXB 256
static void mix_heads(const Job *t, REAL *P, REAL *A) {
    const long heads = t->heads, M = N * NQ;
    for (long e0 = 0; e0 < M; e0 += MIXB) {
        const long e1 = e0 + MIXB < M ? e0 + MIXB : M;
        for (long k = 0; k < heads; k++)
            gelu_values(A + k * M + e0, A + k * M + e0, e1 - e0);
        for (long h = 0; h < heads; h++) mix_head(t, h, P, A, P + h * M, e0, e1);
    }
}

/* The forward of window g, every head in one pass: R and C (into t->rowA and t->colA for the
 * backward, if given), P and Y in scratch, Wt = P + mix GELU(Y) in place of P, out = apply(Wt).
 * No map leaves the cache. */
static void forward(const Job *t, long g, REAL *s) {
    const long heads = t->heads, M = N * NQ;
    REAL *P = s + SCRATCH, *A = P + heads * M, *ra = A + heads * M, *ca = ra + N * WS;
    for (long h = 0; h < heads; h++) {
        const long u = h * t->G + g;
        REAL *r = t->rowA ? t->rowA + u * N * WS : ra, *c = t->colA ? t->colA + u * N * WS : ca;
        attention(t, h, g, s, r, c);
        maps(t, h, r, c, P + h * M, A + h * M);
    }
    mix_heads(t, P, A);
    for (long h = 0; h < heads; h++) apply(t, h, g, s, P + h * M);
}

/* The backward of window g, every head in one pass, from the saved R and C: P, Y, A = GELU(Y)
 * and each head's Wt (mix_head) recomputed in scratch; dWt and dv (apply_backward); the
 * gradient of AF's 1x1, mpart[g][h][k] = dWt[h] . A[k]; dY[k] = (sum_h mix[h][k] dWt[h]) GELU'(Y[k]), in place of Y;
 * then scores_backward for each head. Per-window parameter gradients: bpart (heads, G),
 * part (heads, G, 10), mpart (G, heads, heads). */
static void backward(const Job *t, long g, REAL *s) {
    const long heads = t->heads, M = N * NQ;
    REAL *P = s + SCRATCH, *Y = P + heads * M, *A = Y + heads * M, *dWt = A + heads * M;
    REAL *Wt = dWt + heads * M, *dv = Wt + M;
    for (long h = 0; h < heads; h++) {
        const long u = h * t->G + g;
        maps(t, h, t->rowA + u * N * WS, t->colA + u * N * WS, P + h * M, Y + h * M);
        gelu_values(Y + h * M, A + h * M, M);
    }
    for (long h = 0; h < heads; h++) {
        mix_head(t, h, P, A, Wt, 0, M);
        apply_backward(t, h, g, s, Wt, dWt + h * M, dv + h * N * D, t->bpart + h * t->G + g);
    }
    for (long h = 0; h < heads; h++)
        for (long k = 0; k < heads; k++) {
            vec acc = {0};
            for (long e = 0; e < M; e += VL) acc += V(dWt + h * M + e) * V(A + k * M + e);
            t->mpart[(g * heads + h) * heads + k] = hsum(acc);
        }
    for (long k = 0; k < heads; k++)
        for (long e0 = 0; e0 < M; e0 += GELU_RUN) {
            const long e1 = e0 + GELU_RUN < M ? e0 + GELU_RUN : M;
            const int series = series_range(Y + k * M + e0, e1 - e0);
            for (long e = e0; e < e1; e += VL) {
                vec acc = {0};
                for (long h = 0; h < heads; h++) acc += t->mix[h * heads + k] * V(dWt + h * M + e);
                const vec y = V(Y + k * M + e);
                V(Y + k * M + e) = acc * (series ? vgelu_grad_series(y) : vgelu_grad(y));
            }
        }
    for (long h = 0; h < heads; h++) {
        const long u = h * t->G + g;
        scores_backward(t, h, g, s, P + h * M, Y + h * M, dWt + h * M, dv + h * N * D,
                        t->rowA + u * N * WS, t->colA + u * N * WS, t->part + u * 10);
    }
}

/* Scratch values per thread for `heads` heads: the per-head functions' SCRATCH, then the
 * window's maps: P, Y, A and dWt of every head, one Wt, dv of every head (backward; the
 * forward's P, GELU(Y), R and C take less). */
long ssmsa_scratch(long heads) { return SCRATCH + (4 * heads + 1) * N * NQ + heads * N * D; }

static void run(void *arg) {
    const Job *t = (const Job *)arg;
    const long n = t->thread_num ? t->thread_num() : 0, units = t->G;
    const long threads = t->num_threads ? t->num_threads() : 1; /* the team actually started */
    REAL *s = t->scratch + n * ssmsa_scratch(t->heads);
    for (long g = n * units / threads; g < (n + 1) * units / threads; g++) t->unit(t, g, s);
}

long ssmsa_query_stride(void) { return NQ; }

/* Runs kernel 0 (forward) or 1 (backward) over every window; t->scratch holds
 * ssmsa_scratch(heads) values for each of t->threads threads. */
int ssmsa(int kernel, Job *t, void (*gomp_parallel)(void (*)(void *), void *, unsigned, unsigned)) {
    static void (*const units[])(const Job *, long, REAL *) = {forward, backward};
    if (kernel < 0 || kernel > 1) return -1;
    t->unit = units[kernel];
    if (!gomp_parallel || !t->thread_num || !t->num_threads || t->threads < 1) t->threads = 1;
    if (t->threads > t->G) t->threads = t->G;
    if (t->threads > 1) gomp_parallel(run, t, (unsigned)t->threads, 0);
    else t->thread_num = 0, t->num_threads = 0, run(t);
    return 0;
}
"""

# Let the compiler reorder sums (vectorised dot products): round-off-level changes only. Unlike
# -ffast-math, these do not switch the process's floating-point mode.
_FLAGS = ("-fno-math-errno", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math")
_FORWARD, _BACKWARD = range(2)
_VL = 8  # the kernels' vector length (VL): the maps' query axis is padded to a multiple
_POINTERS = ("x", "wdw", "bdw", "bmix", "mix", "rowA", "colA", "out", "dout", "dx", "part",
             "bpart", "mpart", "scratch")
_pytorch_ops_depth = 0  # open pytorch_ops() contexts, in any thread


class _Job(ctypes.Structure):
    _fields_ = ([(name, ctypes.c_void_p) for name in _POINTERS]
                + [(name, ctypes.c_long) for name in ("B", "H", "W", "ps", "heads", "G", "threads")]
                + [("scale", ctypes.c_double), ("thread_num", ctypes.c_void_p),
                   ("num_threads", ctypes.c_void_p), ("unit", ctypes.c_void_p)])


def _setup(library: ctypes.CDLL) -> None:
    library.ssmsa.restype = ctypes.c_int
    library.ssmsa.argtypes = [ctypes.c_int, ctypes.POINTER(_Job), ctypes.c_void_p]
    library.ssmsa_scratch.restype = ctypes.c_long
    library.ssmsa_scratch.argtypes = [ctypes.c_long]
    library.ssmsa_query_stride.restype, library.ssmsa_query_stride.argtypes = ctypes.c_long, []


# The dtype the kernels compute in (and of the maps and parameters they read), for each dtype of
# the activations they take: bfloat16 activations are read into float32 and rounded back.
_COMPUTE = {torch.float32: torch.float32, torch.float64: torch.float64,
            torch.bfloat16: torch.float32}


def _compute(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in for activations of ``dtype``."""
    if dtype not in _COMPUTE:
        raise TypeError(f"ssmsa: no kernels for {dtype} activations (float32, float64 or "
                        "bfloat16)")
    return _COMPUTE[dtype]


def _library(dtype: torch.dtype, window: int, head_dim: int) -> Optional[ctypes.CDLL]:
    """The kernels for activations of ``dtype``, window side and head dimension (compiled on
    first use; the two sizes are compile-time constants), or None without a C compiler."""
    compute = _compute(dtype)
    defines = {"REAL": {torch.float32: "float", torch.float64: "double"}[compute],
               "REAL_IS_FLOAT": int(compute == torch.float32),
               "IO_IS_BF16": int(dtype == torch.bfloat16), "WS": window, "D": head_dim}
    return ckernel.load("ssmsa", _SOURCE, defines, _setup, _FLAGS)


@torch.compiler.assume_constant_result
def _kernels_ready(dtype: torch.dtype, window: int, head_dim: int) -> bool:
    """Whether the kernels for ``dtype``, window and head dimension are compiled (compiling them
    on first use); a constant to ``torch.compile``."""
    return _library(dtype, window, head_dim) is not None


@contextlib.contextmanager
def pytorch_ops() -> Iterator[None]:
    """Within this context (process-wide: in every thread, while any such context is open;
    contexts nest) ``ss_msa`` runs its PyTorch ops everywhere, to compare or debug, or to count
    FLOPs op by op. ``torch.compile`` guards on it: a function compiled outside the context is
    recompiled inside it."""
    global _pytorch_ops_depth
    with _depth_lock:
        _pytorch_ops_depth += 1
    try:
        yield
    finally:
        with _depth_lock:
            _pytorch_ops_depth -= 1


_depth_lock = threading.Lock()


def _kernel_dtype(x: torch.Tensor, af: nn.Module) -> Optional[torch.dtype]:
    """The dtype of the activations the kernels take for ``x`` and the AF module's parameters:
    under CPU autocast to bfloat16, bfloat16 (float32 or bfloat16 activations and parameters;
    float32 activations are cast, as autocast casts them for the PyTorch ops' products);
    outside autocast, ``x``'s if float32/float64 and the parameters have it; None otherwise
    (autocast to another dtype, other dtypes)."""
    params = [p.dtype for p in af.parameters()]
    if torch.is_autocast_enabled("cpu"):
        usable = (torch.get_autocast_dtype("cpu") == torch.bfloat16
                  and all(t in (torch.float32, torch.bfloat16) for t in (x.dtype, *params)))
        return torch.bfloat16 if usable else None
    usable = x.dtype in (torch.float32, torch.float64) and all(t == x.dtype for t in params)
    return x.dtype if usable else None


def fused_available(x: torch.Tensor, window: int, heads: int, af: nn.Module) -> bool:
    """Whether ``separable_attention`` takes ``x`` ``(B, H, W, 2*heads*d)`` and the AF module:
    on CPU, float32/float64 (the parameters too) or under autocast to bfloat16, stage maps that
    need no window padding, a head dimension of whole vectors of 8, a C compiler; not in graphs
    recorded for other machines (``torch.export``, ``torch.jit.trace``), which keep standard ops
    only, and not within ``pytorch_ops()``."""
    if (_pytorch_ops_depth or heads <= 0 or x.device.type != "cpu"
            or any(p.device.type != "cpu" for p in af.parameters())
            or recording()):
        return False
    dtype = _kernel_dtype(x, af)
    return (dtype is not None
            and x.shape[1] % window == 0 and x.shape[2] % window == 0
            and x.shape[3] % (2 * heads * _VL) == 0  # head dimension: whole vectors
            and _kernels_ready(dtype, window, x.shape[3] // (2 * heads)))


def _run(kernel: int, x: torch.Tensor, window: int, heads: int, scale: float,
         **buffers: torch.Tensor) -> None:
    """Runs one of the kernels on ``x`` ``(B, H, W, 2*heads*d)`` (pixels at any stride) with the
    named tensors (contiguous) as its other arguments: ``out``, ``dout`` and ``dx`` in ``x``'s
    dtype, the others in the dtype the kernels compute in."""
    b, h, w, channels = x.shape
    compute = _compute(x.dtype)
    for name, tensor in buffers.items():
        expected = x.dtype if name in ("out", "dout", "dx") else compute
        if tensor.dtype != expected:  # the kernels would misread it
            raise TypeError(f"ssmsa: {name} is {tensor.dtype}, expected {expected} for "
                            f"{x.dtype} activations")
    library = _library(x.dtype, window, channels // (2 * heads))
    gomp_parallel, thread_num, num_threads = ckernel.openmp_pool()
    threads = torch.get_num_threads()
    scratch = x.new_empty(threads, library.ssmsa_scratch(heads), dtype=compute)
    job = _Job(x=x.data_ptr(), scratch=scratch.data_ptr(), B=b, H=h, W=w, ps=x.stride(2),
               heads=heads, G=b * (h // window) * (w // window), threads=threads, scale=scale,
               thread_num=thread_num, num_threads=num_threads,
               **{name: tensor.data_ptr() for name, tensor in buffers.items()})
    if library.ssmsa(kernel, ctypes.byref(job), gomp_parallel):
        raise RuntimeError(f"ssmsa: unknown kernel {kernel}")


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(B, H, W, C)``, copied unless its pixels are rows of contiguous channels at one
    stride (what the kernels read)."""
    b, h, w, _ = x.shape
    if x.stride(3) != 1 or x.stride(1) != w * x.stride(2) or x.stride(0) != h * x.stride(1):
        return x.contiguous()
    return x


def _sizes(shape, window: int, heads: int) -> tuple[int, int, int, int]:
    """For an input of ``shape`` ``(B, H, W, 2*heads*d)``: windows of all images, positions per
    window, its padding to whole vectors, head dimension."""
    b, h, w, channels = shape
    n = window * window
    return b * (h // window) * (w // window), n, -(-n // _VL) * _VL, channels // (2 * heads)


def _parameters(heads: int, dw_weight: torch.Tensor, dw_bias: torch.Tensor,
                pw_weight: torch.Tensor, pw_bias: torch.Tensor) -> dict[str, torch.Tensor]:
    """The AF parameters as the kernels read them: 3x3 weights ``(heads, 9)``, the 1x1's
    ``(heads, heads)``, biases."""
    return dict(wdw=dw_weight.reshape(heads, 9).contiguous(), bdw=dw_bias.contiguous(),
                mix=pw_weight.reshape(heads, heads).contiguous(), bmix=pw_bias.contiguous())


def _attention_maps(x: torch.Tensor, groups: int, size: int, heads: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Room for the row and column attention the training forward keeps for its backward:
    ``(heads, groups, size)`` each, in the dtype the kernels compute in for ``x``."""
    return tuple(x.new_empty(heads, groups, size, dtype=_compute(x.dtype)) for _ in range(2))


@torch.library.custom_op("mgssaf::separable_attention", mutates_args=(), device_types="cpu")
def _forward(x: torch.Tensor, window: int, heads: int, scale: float, dw_weight: torch.Tensor,
             dw_bias: torch.Tensor, pw_weight: torch.Tensor, pw_bias: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SS-MSA + AF on ``(B, H, W, 2*heads*d)`` -> ``(B, H, W, heads, d)`` (see the module doc),
    with what the backward recomputes the maps from: the row and column attention
    ``(heads, G, N*w)`` (3-D: Inductor gives 4-D tensors of graphs with convolutions a
    channels-last order, and would copy them into it and back around the ops)."""
    x = _pixels(x)
    b, h, w, _ = x.shape
    groups, n, _, d = _sizes(x.shape, window, heads)
    rows, cols = _attention_maps(x, groups, n * window, heads)
    out = x.new_empty(b, h, w, heads, d)
    _run(_FORWARD, x, window, heads, scale, rowA=rows, colA=cols, out=out,
         **_parameters(heads, dw_weight, dw_bias, pw_weight, pw_bias))
    return out, rows, cols


@_forward.register_fake
def _(x, window, heads, scale, dw_weight, dw_bias, pw_weight, pw_bias):
    b, h, w, _ = x.shape
    groups, n, _, d = _sizes(x.shape, window, heads)
    rows, cols = _attention_maps(x, groups, n * window, heads)
    return x.new_empty(b, h, w, heads, d), rows, cols


@torch.library.custom_op("mgssaf::separable_attention_inference", mutates_args=(),
                         device_types="cpu")
def _inference(x: torch.Tensor, window: int, heads: int, scale: float, dw_weight: torch.Tensor,
               dw_bias: torch.Tensor, pw_weight: torch.Tensor,
               pw_bias: torch.Tensor) -> torch.Tensor:
    """``mgssaf::separable_attention``'s output alone, for inference (the same kernel, which
    then keeps the row and column attention in cache too)."""
    x = _pixels(x)
    b, h, w, channels = x.shape
    out = x.new_empty(b, h, w, heads, channels // (2 * heads))
    _run(_FORWARD, x, window, heads, scale, out=out,
         **_parameters(heads, dw_weight, dw_bias, pw_weight, pw_bias))
    return out


@_inference.register_fake
def _(x, window, heads, scale, dw_weight, dw_bias, pw_weight, pw_bias):
    b, h, w, channels = x.shape
    return x.new_empty(b, h, w, heads, channels // (2 * heads))


@torch.library.custom_op("mgssaf::separable_attention_backward", mutates_args=(),
                         device_types="cpu")
def _backward(grad_out: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
              dw_weight: torch.Tensor, dw_bias: torch.Tensor, pw_weight: torch.Tensor,
              pw_bias: torch.Tensor, window: int, heads: int, scale: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``mgssaf::separable_attention``'s output with respect to x and the AF
    parameters (dw weight and bias, pw weight and bias), each in its parameter's strides (as
    DDP's gradient buckets expect); the kernel recomputes the maps from ``rows`` and ``cols``."""
    x = _pixels(x)
    groups, compute = _sizes(x.shape, window, heads)[0], _compute(x.dtype)
    grad_x = x.new_empty(x.shape)
    grad_dw = x.new_empty(heads, groups, 10, dtype=compute)  # per window: 9 weights, the bias
    grad_pw_bias = x.new_empty(heads, groups, dtype=compute)  # per window
    grad_mix = x.new_empty(groups, heads, heads, dtype=compute)  # per window
    _run(_BACKWARD, x, window, heads, scale, dout=grad_out.contiguous(), rowA=rows, colA=cols,
         dx=grad_x, part=grad_dw, bpart=grad_pw_bias, mpart=grad_mix,
         **_parameters(heads, dw_weight, dw_bias, pw_weight, pw_bias))
    grad_dw = grad_dw.sum(1)
    return (grad_x, torch.empty_like(dw_weight).copy_(grad_dw[:, :9].reshape(dw_weight.shape)),
            grad_dw[:, 9].contiguous(),
            torch.empty_like(pw_weight).copy_(grad_mix.sum(0).view(pw_weight.shape)),
            grad_pw_bias.sum(1))


@_backward.register_fake
def _(grad_out, x, rows, cols, dw_weight, dw_bias, pw_weight, pw_bias, window, heads, scale):
    return (x.new_empty(x.shape), torch.empty_like(dw_weight), dw_weight.new_empty(heads),
            torch.empty_like(pw_weight), pw_weight.new_empty(heads))


def _setup_context(ctx, inputs, output) -> None:
    x, window, heads, scale, dw_weight, dw_bias, pw_weight, pw_bias = inputs
    _, rows, cols = output
    ctx.save_for_backward(x, rows, cols, dw_weight, dw_bias, pw_weight, pw_bias)
    ctx.window, ctx.heads, ctx.scale = window, heads, scale
    # The attention maps are the backward's, not results: no gradient flows into them, and
    # autograd is not to fill zero gradients for them
    ctx.mark_non_differentiable(rows, cols)
    ctx.set_materialize_grads(False)


def _gradients(ctx, grad_out, *unused):
    """Autograd formula of ``mgssaf::separable_attention`` (the attention maps it returns for
    the backward are not differentiable; once differentiable)."""
    grads = _backward(grad_out, *ctx.saved_tensors, ctx.window, ctx.heads, ctx.scale)
    grad_x, grad_dw_weight, grad_dw_bias, grad_pw_weight, grad_pw_bias = grads
    return (grad_x, None, None, None, grad_dw_weight, grad_dw_bias, grad_pw_weight,
            grad_pw_bias)


_forward.register_autograd(_gradients, setup_context=_setup_context)


def _vmap_rule(op, outputs: int):
    """``torch.func.vmap`` of a kernel op with ``outputs`` outputs: a batch of maps with shared
    parameters is one call on the batch of all their images; otherwise one call per entry."""

    def rule(info, in_dims, x, window, heads, scale, dw_weight, dw_bias, pw_weight, pw_bias):
        x_dim, param_dims = in_dims[0], in_dims[4:]
        params = (dw_weight, dw_bias, pw_weight, pw_bias)
        if x_dim is not None and all(dim is None for dim in param_dims):
            xs = x.movedim(x_dim, 0)
            v, b = xs.shape[:2]
            results = op(xs.reshape(v * b, *xs.shape[2:]), window, heads, scale, *params)
            if outputs == 1:
                return results.view(v, b, *results.shape[1:]), 0
            out, *maps = results  # maps: (heads, v * windows, ...)
            maps = [m.view(m.shape[0], v, m.shape[1] // v, *m.shape[2:]) for m in maps]
            return (out.view(v, b, *out.shape[1:]), *maps), (0,) + (1,) * len(maps)

        def entry(t: torch.Tensor, dim, i: int) -> torch.Tensor:
            return t if dim is None else t.select(dim, i)

        results = [op(entry(x, x_dim, i), window, heads, scale,
                      *(entry(t, dim, i) for t, dim in zip(params, param_dims)))
                   for i in range(info.batch_size)]
        if outputs == 1:
            return torch.stack(results), 0
        return tuple(torch.stack(r) for r in zip(*results)), (0,) * outputs

    return rule


torch.library.register_vmap("mgssaf::separable_attention", _vmap_rule(_forward, 3))
torch.library.register_vmap("mgssaf::separable_attention_inference", _vmap_rule(_inference, 1))


@register_flop_formula([torch.ops.mgssaf.separable_attention,
                        torch.ops.mgssaf.separable_attention_inference])
def _(x_shape, window, heads, *args, out_shape=None, **kwargs) -> int:
    """FLOPs (2 per multiply-add) of the kernels' products: row and column scores, the AF's
    3x3 convolution and 1x1 over heads, and the weights times the values."""
    groups, n, _, d = _sizes(x_shape, window, heads)
    return 2 * heads * groups * (2 * n * window * d + 9 * n * n + heads * n * n + n * n * d)


@register_flop_formula(torch.ops.mgssaf.separable_attention_backward)
def _(grad_out_shape, x_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of the backward: twice each product of the forward, and the maps' recomputation
    (AF's 3x3 convolution and 1x1 over heads)."""
    window, heads = args[-3], args[-2]
    groups, n, _, d = _sizes(x_shape, window, heads)
    return (4 * heads * groups * (2 * n * window * d + 9 * n * n + heads * n * n + n * n * d)
            + 2 * heads * groups * (9 * n * n + heads * n * n))


def separable_attention(x: torch.Tensor, window: int, heads: int, scale: float,
                        af: nn.Module) -> torch.Tensor:
    """SS-MSA + AF of the local heads: ``(B, H, W, 2*heads*d)`` (q then k, head-major) ->
    ``(B, H, W, heads, d)``; ``af`` is the ``AttentionFusion`` module (dw3x3, GELU, 1x1). Only
    where ``fused_available`` holds."""
    if not fused_available(x, window, heads, af):
        raise ValueError(f"separable_attention: no fused kernel for a {tuple(x.shape)} "
                         f"{x.dtype} map on {x.device} with {heads} heads and window {window} "
                         "(see fused_available)")
    dw, _, pw = af
    params = (dw.weight, dw.bias, pw.weight, pw.bias)
    training = wants_grad(x, *params)
    if torch.is_autocast_enabled("cpu"):
        # Autocast to bfloat16: the kernels read the bfloat16 activations (float32 ones are
        # cast, as autocast casts them for the PyTorch ops' products) into float32, compute in
        # float32 with the AF parameters in float32, and write the output and the activations'
        # gradient in bfloat16, as the PyTorch ops give them under autocast.
        x, params = x.to(torch.bfloat16), tuple(p.float() for p in params)
    if training:
        return _forward(x, window, heads, scale, *params)[0]
    return _inference(x, window, heads, scale, *params)
