/* kernels.h -- this program's own LoRA, DoRA and serving kernels, written from the formulas of
 * docs/vectors-format.md. Each is compiled twice (kernels.c): name_f32 computes in float, with
 * every operation rounded to float32, and name_f64 in double. Inputs and outputs are passed as
 * double arrays (the f32 versions convert the inputs to float, exactly, since the vectors store
 * them in float32, and the outputs back to double, exactly).
 *
 * Layout: every array is row-major. W is (d_out, d_in) here whatever the file stored (main.c
 * transposes a fan_in_fan_out weight once, exactly); A is (r, d_in), B is (d_out, r). */
#ifndef CONFORMANCE_KERNELS_H
#define CONFORMANCE_KERNELS_H

#include "dtype.h"

/* A linear layer with LoRA (or DoRA). x is (N, d_in), N the batch axes flattened. W's rows are
 * n_blocks equal blocks of q = d_out / n_blocks rows, and on[g] says whether block g has an
 * adapter (a fused projection, loralib's MergedLinear); a plain layer has n_blocks = 1, on = {1}.
 * The k-th block that is on uses A[k r:(k+1) r] and B[k q:(k+1) q]. */
typedef struct {
    long N, d_in, d_out, r, n_blocks;
    const int *on;
    double alpha;
    int use_rslora;
    const double *x, *W, *A, *B, *dy;
    const double *bias, *mask;      /* (d_out,), (N, d_in); either may be NULL */
    const double *m;                /* DoRA's magnitude (d_out,) */
} lora_problem;

typedef struct { double *y, *W_merged, *dx, *dA, *dB; } lora_outputs;
typedef struct { double *y, *m_init, *W_merged, *dx, *dA, *dB, *dm, *dA_exact, *dB_exact; } dora_outputs;

/* Several adapters on one linear layer (adapter_set, mixed_batch). Row n of x gets the adapters
 * list[n][0:count[n]] summed in that order: y = x W^T + bias + sum_a s_a (x A_a^T) B_a^T.
 * W_merged = W + sum over merged[0:n_merged] of s_a B_a A_a. */
typedef struct {
    long r;
    double alpha;
    int use_rslora;
    const double *A, *B;            /* (r, d_in), (d_out, r) */
} adapter;

typedef struct {
    long N, d_in, d_out;
    const double *x, *W, *bias;     /* W (d_out, d_in); bias may be NULL */
    const adapter *adapters;
    const long *const *list;        /* N lists of adapter numbers */
    const long *count;              /* N list lengths */
    const long *merged;
    long n_merged;
} multi_problem;

/* Serving: T tokens; slot[t] in [-1, n) is token t's adapter slot, -1 for none. Computed in the
 * accumulation dtype (the f32 or f64 version), with expand's results rounded to `storage`. */
typedef struct {
    long T, d_in, d_out, n_slices, n, R;
    const long *slot;
    dtype storage;
    double scale;                   /* shrink */
    const double *x, *A_stack;      /* shrink: (T, d_in), (n_slices, n, R, d_in) */
    const double *y, *h;            /* expand: (T, d_out), (n_slices, T, R) */
    const double *const *B_stack;   /* expand: n_slices arrays (n, width[s], R) */
    const long *offset, *width;     /* expand: slice s goes to y's columns [offset, offset + width) */
} serving_problem;

#define CONFORMANCE_DECLARE(suffix)                                                           \
    void run_lora_##suffix(const lora_problem *p, lora_outputs *out);                         \
    void run_dora_##suffix(const lora_problem *p, dora_outputs *out);                         \
    void run_multi_##suffix(const multi_problem *p, double *y, double *W_merged);             \
    void run_shrink_##suffix(const serving_problem *p, double *h);                            \
    void run_expand_##suffix(const serving_problem *p, double *y);
CONFORMANCE_DECLARE(f32)
CONFORMANCE_DECLARE(f64)

#endif
