/* kernels_body.h -- the math, written once over `real` (float or double) and included twice by
 * kernels.c, which defines real, K(name) (the name with its _f32 / _f64 suffix) and SQRT.
 * Every operation below is done in `real`: in a float32 case, float32 arithmetic throughout.
 * Sums run in index order; the tolerance rule holds for any order.
 *
 * Letters: N rows of x, I = d_in, O = d_out, r the rank, q = rows per block of a fused W. */

/* ---- conversions between the double arrays of main.c and real arrays ---- */

static real *K(in)(const double *v, long count)       /* exact: the values are stored as real */
{
    real *out = zeros((size_t)count, sizeof *out);
    for (long k = 0; k < count; k++)
        out[k] = (real)v[k];
    return out;
}

static void K(out)(double *dst, const real *v, long count)
{
    for (long k = 0; k < count; k++)
        dst[k] = (double)v[k];
}

/* ---- LoRA (Hu et al. 2021): y = x W^T + b + s (x A^T) B^T, s = alpha / r ---- */

static real K(lora_scale)(double alpha, long r, int use_rslora)
{
    real a = (real)alpha;
    if (BROKEN("scale"))
        return a;
    if (use_rslora && !BROKEN("rslora"))
        return a / SQRT((real)r);                 /* rsLoRA (Kalajdzievski 2023): alpha / sqrt(r) */
    return a / (real)r;                           /* LoRA Section 4.1: scale Delta W x by alpha / r */
}

/* y (N, O) = x W^T + bias + s ((x * mask) A^T) B^T, block by block for a fused W */
static void K(lora_forward)(const lora_problem *p, real s, const real *x, const real *W,
                            const real *bias, const real *xd, const real *A, const real *B, real *y)
{
    long N = p->N, I = p->d_in, O = p->d_out, r = p->r, q = O / p->n_blocks;
    real *u = zeros((size_t)r, sizeof *u);
    for (long n = 0; n < N; n++) {
        for (long o = 0; o < O; o++) {
            real acc = 0;
            for (long i = 0; i < I; i++)
                acc += x[n * I + i] * W[o * I + i];
            y[n * O + o] = bias ? acc + bias[o] : acc;
        }
        for (long g = 0, k = 0; g < p->n_blocks; g++) {
            if (!p->on[g])
                continue;
            const real *Ak = A + k * r * I, *Bk = B + k * q * r;   /* (r, I), (q, r) */
            for (long j = 0; j < r; j++) {        /* u = xd A_k^T (r,) */
                real acc = 0;
                for (long i = 0; i < I; i++)
                    acc += xd[n * I + i] * Ak[j * I + i];
                u[j] = acc;
            }
            for (long o = 0; o < q; o++) {        /* y[g block] += s (u B_k^T) */
                real acc = 0;
                for (long j = 0; j < r; j++)
                    acc += u[j] * Bk[o * r + j];
                y[n * O + g * q + o] += s * acc;
            }
            k++;
        }
    }
    free(u);
}

/* W_merged (O, I) = W + s B A, block by block */
static void K(lora_merge)(const lora_problem *p, real s, const real *W, const real *A,
                          const real *B, real *Wm)
{
    long I = p->d_in, O = p->d_out, r = p->r, q = O / p->n_blocks;
    memcpy(Wm, W, (size_t)(O * I) * sizeof *Wm);
    for (long g = 0, k = 0; g < p->n_blocks; g++) {
        if (!p->on[g])
            continue;
        const real *Ak = A + k * r * I, *Bk = B + k * q * r;
        for (long o = 0; o < q; o++)
            for (long i = 0; i < I; i++) {
                real acc = 0;
                for (long j = 0; j < r; j++)
                    acc += Bk[o * r + j] * Ak[j * I + i];
                Wm[(g * q + o) * I + i] += s * acc;
            }
        k++;
    }
}

/* Gradients of L = sum(y * dy). With t = dy_g B_k (N, r) and u = xd A_k^T (N, r) per block:
 *   dx  = dy W + (s sum_k t A_k) * mask        (the adapter sees x * mask)
 *   dA_k = s t^T xd                             (r, I)
 *   dB_k = s dy_g^T u                           (q, r) */
static void K(lora_backward)(const lora_problem *p, real s, const real *W, const real *mask,
                             const real *xd, const real *A, const real *B, const real *dy,
                             real *dx, real *dA, real *dB)
{
    long N = p->N, I = p->d_in, O = p->d_out, r = p->r, q = O / p->n_blocks;
    long n_on = 0;
    for (long g = 0; g < p->n_blocks; g++)
        n_on += p->on[g] != 0;
    real *t = zeros((size_t)(N * n_on * r), sizeof *t);      /* (N, n_on r): dy_g B_k per block */
    real *u = zeros((size_t)(N * n_on * r), sizeof *u);      /* (N, n_on r): xd A_k^T per block */
    for (long g = 0, k = 0; g < p->n_blocks; g++) {
        if (!p->on[g])
            continue;
        const real *Ak = A + k * r * I, *Bk = B + k * q * r;
        for (long n = 0; n < N; n++)
            for (long j = 0; j < r; j++) {
                real tt = 0, uu = 0;
                for (long o = 0; o < q; o++)
                    tt += dy[n * O + g * q + o] * Bk[o * r + j];
                for (long i = 0; i < I; i++)
                    uu += xd[n * I + i] * Ak[j * I + i];
                t[(n * n_on + k) * r + j] = tt;
                u[(n * n_on + k) * r + j] = uu;
            }
        k++;
    }
    for (long n = 0; n < N; n++)
        for (long i = 0; i < I; i++) {
            real base = 0, acc = 0;
            for (long o = 0; o < O; o++)
                base += dy[n * O + o] * W[o * I + i];
            for (long kj = 0; kj < n_on * r; kj++)       /* sum over blocks k and ranks j */
                acc += t[n * n_on * r + kj] * A[kj * I + i];
            real adapter = s * acc;
            dx[n * I + i] = base + (mask ? adapter * mask[n * I + i] : adapter);
        }
    for (long kj = 0; kj < n_on * r; kj++)               /* dA = s t^T xd */
        for (long i = 0; i < I; i++) {
            real acc = 0;
            for (long n = 0; n < N; n++)
                acc += t[n * n_on * r + kj] * xd[n * I + i];
            dA[kj * I + i] = s * acc;
        }
    for (long g = 0, k = 0; g < p->n_blocks; g++) {      /* dB_k = s dy_g^T u_k */
        if (!p->on[g])
            continue;
        for (long o = 0; o < q; o++)
            for (long j = 0; j < r; j++) {
                real acc = 0;
                for (long n = 0; n < N; n++)
                    acc += dy[n * O + g * q + o] * u[(n * n_on + k) * r + j];
                dB[(k * q + o) * r + j] = s * acc;
            }
        k++;
    }
    free(t);
    free(u);
}

/* x * mask, or a copy of x where there is no mask */
static real *K(masked)(const real *x, const real *mask, long count)
{
    real *xd = zeros((size_t)count, sizeof *xd);
    for (long k = 0; k < count; k++)
        xd[k] = mask ? x[k] * mask[k] : x[k];
    return xd;
}

void K(run_lora)(const lora_problem *p, lora_outputs *out)
{
    long N = p->N, I = p->d_in, O = p->d_out, r = p->r, q = O / p->n_blocks, n_on = 0;
    for (long g = 0; g < p->n_blocks; g++)
        n_on += p->on[g] != 0;
    real s = K(lora_scale)(p->alpha, r, p->use_rslora);
    real *x = K(in)(p->x, N * I), *W = K(in)(p->W, O * I), *dy = K(in)(p->dy, N * O);
    real *A = K(in)(p->A, n_on * r * I), *B = K(in)(p->B, n_on * q * r);
    real *bias = p->bias ? K(in)(p->bias, O) : NULL, *mask = p->mask ? K(in)(p->mask, N * I) : NULL;
    real *xd = K(masked)(x, mask, N * I);
    real *y = zeros((size_t)(N * O), sizeof *y), *Wm = zeros((size_t)(O * I), sizeof *Wm);
    real *dx = zeros((size_t)(N * I), sizeof *dx), *dA = zeros((size_t)(n_on * r * I), sizeof *dA);
    real *dB = zeros((size_t)(n_on * q * r), sizeof *dB);
    K(lora_forward)(p, s, x, W, bias, xd, A, B, y);
    K(lora_merge)(p, s, W, A, B, Wm);
    K(lora_backward)(p, s, W, mask, xd, A, B, dy, dx, dA, dB);
    K(out)(out->y, y, N * O);
    K(out)(out->W_merged, Wm, O * I);
    K(out)(out->dx, dx, N * I);
    K(out)(out->dA, dA, n_on * r * I);
    K(out)(out->dB, dB, n_on * q * r);
    free(x); free(W); free(dy); free(A); free(B); free(bias); free(mask); free(xd);
    free(y); free(Wm); free(dx); free(dA); free(dB);
}

/* ---- DoRA (Liu et al. 2024) ----
 *   V = W + s B A                    (O, I)   the adapted direction
 *   C = ||V||_row                    (O,)     one norm per output row, over the input axis
 *   f = m / C                        (O,)     Eq. (5): W' = m V / ||V||_c
 *   y = f * (xd V^T) + (x - xd) W^T + bias    (dropout on the adapted path only, as PEFT) */
void K(run_dora)(const lora_problem *p, dora_outputs *out)
{
    long N = p->N, I = p->d_in, O = p->d_out, r = p->r;
    real s = K(lora_scale)(p->alpha, r, p->use_rslora);
    real *x = K(in)(p->x, N * I), *W = K(in)(p->W, O * I), *dy = K(in)(p->dy, N * O);
    real *A = K(in)(p->A, r * I), *B = K(in)(p->B, O * r), *m = K(in)(p->m, O);
    real *bias = p->bias ? K(in)(p->bias, O) : NULL, *mask = p->mask ? K(in)(p->mask, N * I) : NULL;
    real *xd = K(masked)(x, mask, N * I);
    real *V = zeros((size_t)(O * I), sizeof *V), *C = zeros((size_t)O, sizeof *C);
    real *f = zeros((size_t)O, sizeof *f), *P = zeros((size_t)(N * O), sizeof *P);
    static const int one_block = 1;
    lora_problem plain = *p;
    plain.n_blocks = 1;
    plain.on = &one_block;
    K(lora_merge)(&plain, s, W, A, B, V);         /* V = W + s B A */
    for (long o = 0; o < O; o++) {
        real acc = 0;
        if (BROKEN("dora_axis") && O == I)        /* the wrong axis: column o of V */
            for (long i = 0; i < O; i++)
                acc += V[i * I + o] * V[i * I + o];
        else
            for (long i = 0; i < I; i++)
                acc += V[o * I + i] * V[o * I + i];
        C[o] = SQRT(acc);
        f[o] = m[o] / C[o];
        out->m_init[o] = (double)C[o];            /* m's initial value is ||W + s B A||_row */
        for (long i = 0; i < I; i++)
            out->W_merged[o * I + i] = (double)(f[o] * V[o * I + i]);
    }
    for (long n = 0; n < N; n++)
        for (long o = 0; o < O; o++) {
            real acc = 0, rest = 0;
            for (long i = 0; i < I; i++)
                acc += xd[n * I + i] * V[o * I + i];
            P[n * O + o] = acc;                   /* P = xd V^T */
            real v = f[o] * acc;
            if (mask) {                           /* (x - xd) W^T: the base sees x, not x * mask */
                for (long i = 0; i < I; i++)
                    rest += (x[n * I + i] - xd[n * I + i]) * W[o * I + i];
                v += rest;
            }
            out->y[n * O + o] = (double)(bias ? v + bias[o] : v);
        }
    /* Gradients of L = sum(y * dy), C held constant (Section 4.3; PEFT detaches the norm):
     *   g  = dy * f                              (N, O)
     *   dx = mask * (g V) + (1 - mask) * (dy W)  (N, I)
     *   dV = g^T xd                              (O, I);  dA = s B^T dV,  dB = s dV A^T
     *   dm = sum_n dy * P / C                    (O,)
     * and through C as well (Eq. 6): dL/dC = -(m / C^2) sum_n dy P = -f dm, dC/dV = V / C, so
     *   dV_exact = dV + (-f dm / C) * V          (row by row);  dA_exact = s B^T dV_exact, ... */
    real *dV = zeros((size_t)(O * I), sizeof *dV), *dVe = zeros((size_t)(O * I), sizeof *dVe);
    for (long n = 0; n < N; n++)
        for (long i = 0; i < I; i++) {
            real acc = 0, base = 0;
            for (long o = 0; o < O; o++)
                acc += dy[n * O + o] * f[o] * V[o * I + i];
            if (mask) {
                for (long o = 0; o < O; o++)
                    base += dy[n * O + o] * W[o * I + i];
                acc = mask[n * I + i] * acc + (1 - mask[n * I + i]) * base;
            }
            out->dx[n * I + i] = (double)acc;
        }
    for (long o = 0; o < O; o++) {
        real acc = 0;
        for (long n = 0; n < N; n++)
            acc += dy[n * O + o] * P[n * O + o];
        real dm = acc / C[o];
        out->dm[o] = (double)dm;
        real dC = -f[o] * dm;
        for (long i = 0; i < I; i++) {
            real g = 0;
            for (long n = 0; n < N; n++)
                g += dy[n * O + o] * f[o] * xd[n * I + i];
            dV[o * I + i] = g;
            dVe[o * I + i] = BROKEN("dora_exact") ? g : g + dC / C[o] * V[o * I + i];
        }
    }
    const real *grads[2] = {dV, dVe};
    double *dAs[2] = {out->dA, out->dA_exact}, *dBs[2] = {out->dB, out->dB_exact};
    for (int e = 0; e < 2; e++) {
        for (long j = 0; j < r; j++)
            for (long i = 0; i < I; i++) {        /* dA = s B^T dV */
                real acc = 0;
                for (long o = 0; o < O; o++)
                    acc += B[o * r + j] * grads[e][o * I + i];
                dAs[e][j * I + i] = (double)(s * acc);
            }
        for (long o = 0; o < O; o++)
            for (long j = 0; j < r; j++) {        /* dB = s dV A^T */
                real acc = 0;
                for (long i = 0; i < I; i++)
                    acc += grads[e][o * I + i] * A[j * I + i];
                dBs[e][o * r + j] = (double)(s * acc);
            }
    }
    free(x); free(W); free(dy); free(A); free(B); free(m); free(bias); free(mask); free(xd);
    free(V); free(C); free(f); free(P); free(dV); free(dVe);
}

/* ---- several adapters on one weight ---- */

/* y = x W^T + bias + sum over row n's adapters a of s_a ((x A_a^T) B_a^T);
 * W_merged = W + sum over the merged adapters of s_a B_a A_a (NULL: not wanted). */
void K(run_multi)(const multi_problem *p, double *y_out, double *W_merged)
{
    long N = p->N, I = p->d_in, O = p->d_out;
    real *x = K(in)(p->x, N * I), *W = K(in)(p->W, O * I), *bias = p->bias ? K(in)(p->bias, O) : NULL;
    real *y = zeros((size_t)(N * O), sizeof *y);
    static const int one_block = 1;
    for (long n = 0; n < N; n++)
        for (long o = 0; o < O; o++) {
            real acc = 0;
            for (long i = 0; i < I; i++)
                acc += x[n * I + i] * W[o * I + i];
            y[n * O + o] = bias ? acc + bias[o] : acc;
        }
    for (long n = 0; n < N; n++)
        for (long e = 0; e < p->count[n]; e++) {
            const adapter *a = &p->adapters[p->list[n][e]];
            real s = K(lora_scale)(a->alpha, a->r, a->use_rslora);
            real *A = K(in)(a->A, a->r * I), *B = K(in)(a->B, O * a->r), *u = zeros((size_t)a->r, sizeof *u);
            for (long j = 0; j < a->r; j++) {     /* u = x[n] A_a^T (r,) */
                real acc = 0;
                for (long i = 0; i < I; i++)
                    acc += x[n * I + i] * A[j * I + i];
                u[j] = acc;
            }
            for (long o = 0; o < O; o++) {        /* y[n] += s_a (u B_a^T) */
                real acc = 0;
                for (long j = 0; j < a->r; j++)
                    acc += u[j] * B[o * a->r + j];
                y[n * O + o] += s * acc;
            }
            free(A);
            free(B);
            free(u);
        }
    K(out)(y_out, y, N * O);
    if (W_merged) {
        real *Wm = zeros((size_t)(O * I), sizeof *Wm), *next = zeros((size_t)(O * I), sizeof *next);
        memcpy(Wm, W, (size_t)(O * I) * sizeof *Wm);
        for (long e = 0; e < p->n_merged; e++) {  /* Wm = Wm + s_a B_a A_a, one adapter at a time */
            const adapter *a = &p->adapters[p->merged[e]];
            lora_problem one = {.N = 0, .d_in = I, .d_out = O, .r = a->r, .n_blocks = 1, .on = &one_block};
            real *A = K(in)(a->A, a->r * I), *B = K(in)(a->B, O * a->r);
            K(lora_merge)(&one, K(lora_scale)(a->alpha, a->r, a->use_rslora), Wm, A, B, next);
            memcpy(Wm, next, (size_t)(O * I) * sizeof *Wm);
            free(A);
            free(B);
        }
        K(out)(W_merged, Wm, O * I);
        free(Wm);
        free(next);
    }
    free(x); free(W); free(bias); free(y);
}

/* ---- serving: the shrink and expand kernels (docs/serving.md V1, V2) ---- */

/* The slot token t reads, or -1 for none. */
static long K(slot)(const serving_problem *p, long t)
{
    long i = p->slot[t];
    if (i < 0 && BROKEN("minus_one"))
        i += p->n;                                /* -1 -> the last slot, as Python indexes */
    return i;
}

/* h[s, t, :] = scale * (A_stack[s, i] x[t]), i = slot of t; 0 where i = -1   (V1) */
void K(run_shrink)(const serving_problem *p, double *h)
{
    long T = p->T, I = p->d_in, n = p->n, R = p->R;
    real *x = K(in)(p->x, T * I), *A = K(in)(p->A_stack, p->n_slices * n * R * I);
    real scale = (real)p->scale;
    for (long s = 0; s < p->n_slices; s++)
        for (long t = 0; t < T; t++) {
            long i = K(slot)(p, t);
            for (long k = 0; k < R; k++) {
                real acc = 0;
                if (i >= 0) {
                    const real *row = A + ((s * n + i) * R + k) * I;
                    for (long j = 0; j < I; j++)
                        acc += x[t * I + j] * row[j];
                    acc *= scale;
                }
                h[(s * T + t) * R + k] = (double)acc;
            }
        }
    free(x);
    free(A);
}

/* Round a value of the accumulation type to the storage type S (exact back in real). */
#define TO_S(v) ((real)round_to(p->storage, (double)(v)))

/* y'[t, off + o] = fl_S(y[t, off + o] + fl_S(sum_k fl_S(h[s, t, k]) B_s[i, o, k]))   (V2);
 * tokens with no adapter and columns in no slice keep y bit for bit. */
void K(run_expand)(const serving_problem *p, double *y_out)
{
    long T = p->T, O = p->d_out, R = p->R, packed = 0;
    real *y = K(in)(p->y, T * O), *h = K(in)(p->h, p->n_slices * T * R);
    for (long s = 0; s < p->n_slices; s++) {
        long offset = BROKEN("slice_offset") ? packed : p->offset[s], width = p->width[s];
        packed += width;
        real *B = K(in)(p->B_stack[s], p->n * width * R);    /* (n, width, R) */
        for (long t = 0; t < T; t++) {
            long i = K(slot)(p, t);
            if (i < 0)
                continue;
            for (long o = 0; o < width; o++) {
                real acc = 0;
                for (long k = 0; k < R; k++)
                    acc += TO_S(h[(s * T + t) * R + k]) * B[(i * width + o) * R + k];
                real *target = &y[t * O + offset + o];
                *target = TO_S(*target + TO_S(acc));
            }
        }
        free(B);
    }
    K(out)(y_out, y, T * O);
    free(y);
    free(h);
}

#undef TO_S
