/* kinds.c -- from a case to this program's kernels and back (see docs/vectors-format.md,
 * "The kinds"). Everything the spec states about a kind's tensors is checked here before use:
 * a case that does not match it fails with the reason, it is never guessed at. */
#include "kinds.h"

#include <stdio.h>
#include <string.h>

#include "broken.h"
#include "kernels.h"

#define CHECK(condition, ...) do { if (!(condition)) return case_error(c, __VA_ARGS__); } while (0)

static void shape_of(const st_tensor *t, long *shape)
{
    for (int k = 0; k < t->rank; k++)
        shape[k] = (long)t->shape[k];
}

/* Does tensor t have exactly the shape given? */
static int has_shape(const st_tensor *t, int rank, const long *shape)
{
    if (t->rank != rank)
        return 0;
    for (int k = 0; k < rank; k++)
        if (t->shape[k] != shape[k])
            return 0;
    return 1;
}

/* A float tensor of the case's dtype and of the given shape, as doubles. */
static const double *input(lora_case *c, const char *name, int rank, const long *shape, int optional)
{
    const st_tensor *t = optional ? case_optional(c, name, -1) : case_tensor(c, name, -1);
    if (!t)
        return NULL;
    if (t->type != c->type) {
        case_error(c, "tensor %s is %s, the case is %s", name, dtype_name(t->type), dtype_name(c->type));
        return NULL;
    }
    if (!has_shape(t, rank, shape)) {
        case_error(c, "tensor %s does not have the shape the spec gives it", name);
        return NULL;
    }
    return case_values(c, t);
}

/* (rows, cols) row-major -> (cols, rows) */
static double *transposed(lora_case *c, const double *a, long rows, long cols)
{
    double *out = case_alloc(c, (size_t)(rows * cols), sizeof *out);
    for (long i = 0; i < rows; i++)
        for (long j = 0; j < cols; j++)
            out[j * rows + i] = a[i * cols + j];
    return out;
}

static void transpose_into(double *dst, const double *a, long rows, long cols)
{
    for (long i = 0; i < rows; i++)
        for (long j = 0; j < cols; j++)
            dst[j * rows + i] = a[i * cols + j];
}

/* ---- lora_linear and dora_linear ---- */

typedef struct {
    lora_problem p;
    int fan_in_fan_out, on[64];
    long x_rank, x_shape[ST_MAX_RANK], W_shape[2], A_shape[2], B_shape[2];
} linear_case;

/* Read what lora_linear and dora_linear share: x, W, A, B, bias, dropout_mask, dy and
 * alpha, r, use_rslora, fan_in_fan_out; enable_lora when `fused_allowed`. */
static int read_linear(lora_case *c, linear_case *l, int fused_allowed)
{
    lora_problem *p = &l->p;
    const st_tensor *x = case_tensor(c, "x", -1), *W = case_tensor(c, "W", 2);
    if (!x || !W)
        return -1;
    CHECK(x->rank >= 1, "x must have at least one axis");
    l->x_rank = x->rank;
    shape_of(x, l->x_shape);
    shape_of(W, l->W_shape);
    if (case_number(c, "alpha", &p->alpha) || case_integer(c, "r", &p->r) ||
        case_bool(c, "use_rslora", &p->use_rslora) || case_bool(c, "fan_in_fan_out", &l->fan_in_fan_out))
        return -1;
    CHECK(p->r >= 1, "params.r is %ld, expected a positive rank", p->r);
    p->d_in = l->x_shape[x->rank - 1];
    p->N = (long)(x->count / (size_t)(p->d_in ? p->d_in : 1));
    /* W is (d_out, d_in); (d_in, d_out) under fan_in_fan_out, GPT-2's Conv1D layout */
    p->d_out = l->fan_in_fan_out ? l->W_shape[1] : l->W_shape[0];
    CHECK((l->fan_in_fan_out ? l->W_shape[0] : l->W_shape[1]) == p->d_in,
          "W's input axis is %ld, x's last axis %ld", l->fan_in_fan_out ? l->W_shape[0] : l->W_shape[1], p->d_in);
    /* enable_lora: null for one adapter on all of W, or one boolean per block of W's rows */
    const json *enable = json_get(c->params, "enable_lora");
    long n_on = 1;
    p->n_blocks = 1;
    l->on[0] = 1;
    if (enable && enable->type != JSON_NULL) {
        CHECK(fused_allowed, "params.enable_lora is set on a kind with no fused projections");
        CHECK(enable->type == JSON_ARRAY && enable->count >= 1 && enable->count <= 64,
              "params.enable_lora is not a list of 1 to 64 booleans");
        p->n_blocks = (long)enable->count;
        n_on = 0;
        for (size_t k = 0; k < enable->count; k++) {
            CHECK(enable->items[k].type == JSON_BOOL, "params.enable_lora holds a non-boolean");
            l->on[k] = enable->items[k].boolean;
            n_on += l->on[k];
        }
        CHECK(p->d_out % p->n_blocks == 0, "d_out = %ld is not a multiple of len(enable_lora) = %ld",
              p->d_out, p->n_blocks);
    }
    p->on = l->on;
    long q = p->d_out / p->n_blocks;
    l->A_shape[0] = n_on * p->r, l->A_shape[1] = p->d_in;
    l->B_shape[0] = n_on * q, l->B_shape[1] = p->r;
    long y_shape[ST_MAX_RANK];
    memcpy(y_shape, l->x_shape, sizeof y_shape);
    y_shape[x->rank - 1] = p->d_out;
    long d_out = p->d_out;
    const double *W_stored = input(c, "W", 2, l->W_shape, 0);
    p->x = input(c, "x", (int)l->x_rank, l->x_shape, 0);
    p->A = input(c, "A", 2, l->A_shape, 0);
    p->B = input(c, "B", 2, l->B_shape, 0);
    p->dy = input(c, "dy", (int)l->x_rank, y_shape, 0);
    p->bias = input(c, "bias", 1, &d_out, 1);
    p->mask = input(c, "dropout_mask", (int)l->x_rank, l->x_shape, 1);
    if (!W_stored || !p->x || !p->A || !p->B || !p->dy || c->error[0])
        return -1;
    p->W = l->fan_in_fan_out ? transposed(c, W_stored, p->d_in, p->d_out) : W_stored;
    if (BROKEN("layout"))                         /* A's bytes read as (d_in, n_on r) */
        p->A = transposed(c, p->A, p->d_in, n_on * p->r);
    return 0;
}

/* Record the outputs every linear kind shares; W_merged goes back to W's stored layout. */
static void linear_results(lora_case *c, linear_case *l, double **y, double **W_merged,
                           double **dx, double **dA, double **dB)
{
    long y_shape[ST_MAX_RANK];
    memcpy(y_shape, l->x_shape, sizeof y_shape);
    y_shape[l->x_rank - 1] = l->p.d_out;
    *y = case_result(c, "y", c->type, (int)l->x_rank, y_shape);
    *W_merged = case_result(c, "W_merged", c->type, 2, l->W_shape);
    *dx = case_result(c, "dx", c->type, (int)l->x_rank, l->x_shape);
    *dA = case_result(c, "dA", c->type, 2, l->A_shape);
    *dB = case_result(c, "dB", c->type, 2, l->B_shape);
}

/* The kernels return W_merged as (d_out, d_in): back to W's stored layout under fan_in_fan_out. */
static void merged_to_stored(lora_case *c, const linear_case *l, double *W_merged)
{
    if (!l->fan_in_fan_out)
        return;
    long count = l->p.d_out * l->p.d_in;
    double *math = case_alloc(c, (size_t)count, sizeof *math);
    memcpy(math, W_merged, (size_t)count * sizeof *math);
    transpose_into(W_merged, math, l->p.d_out, l->p.d_in);
}

/* A `layout`-broken reader writes a gradient of A in the layout it read A in. */
static void gradient_of_A_to_stored(lora_case *c, const linear_case *l, double *dA)
{
    if (!BROKEN("layout"))
        return;
    long count = l->A_shape[0] * l->A_shape[1];
    double *mine = case_alloc(c, (size_t)count, sizeof *mine);
    memcpy(mine, dA, (size_t)count * sizeof *mine);
    transpose_into(dA, mine, l->A_shape[0], l->A_shape[1]);
}

static int run_lora_linear(lora_case *c)
{
    linear_case l;
    memset(&l, 0, sizeof l);
    if (read_linear(c, &l, 1))
        return -1;
    lora_outputs out;
    linear_results(c, &l, &out.y, &out.W_merged, &out.dx, &out.dA, &out.dB);
    (c->type == DT_F32 ? run_lora_f32 : run_lora_f64)(&l.p, &out);
    merged_to_stored(c, &l, out.W_merged);
    gradient_of_A_to_stored(c, &l, out.dA);
    return 0;
}

static int run_dora_linear(lora_case *c)
{
    linear_case l;
    memset(&l, 0, sizeof l);
    if (read_linear(c, &l, 0))
        return -1;
    long d_out = l.p.d_out;
    l.p.m = input(c, "m", 1, &d_out, 0);
    if (!l.p.m)
        return -1;
    dora_outputs out;
    linear_results(c, &l, &out.y, &out.W_merged, &out.dx, &out.dA, &out.dB);
    out.m_init = case_result(c, "m_init", c->type, 1, &d_out);
    out.dm = case_result(c, "dm", c->type, 1, &d_out);
    out.dA_exact = case_result(c, "dA_exact", c->type, 2, l.A_shape);
    out.dB_exact = case_result(c, "dB_exact", c->type, 2, l.B_shape);
    (c->type == DT_F32 ? run_dora_f32 : run_dora_f64)(&l.p, &out);
    merged_to_stored(c, &l, out.W_merged);
    gradient_of_A_to_stored(c, &l, out.dA);
    gradient_of_A_to_stored(c, &l, out.dA_exact);
    return 0;
}

/* ---- adapter_set and mixed_batch: several adapters on one weight ---- */

#define MAX_ADAPTERS 32

typedef struct {
    multi_problem p;
    int fan_in_fan_out;             /* W stored (d_in, d_out); p.W is then its transpose */
    const double *W_stored;
    long n_adapters, x_rank, x_shape[ST_MAX_RANK], W_shape[2];
    adapter adapters[MAX_ADAPTERS];
    const char *names[MAX_ADAPTERS];
} multi_case;

/* x, W (d_out, d_in), or (d_in, d_out) when m->fan_in_fan_out is set, bias, and each adapter of
 * params.adapters: A.<name> (r, d_in), B.<name> (d_out, r) in both layouts of W. */
static int read_multi(lora_case *c, multi_case *m)
{
    multi_problem *p = &m->p;
    const st_tensor *x = case_tensor(c, "x", -1), *W = case_tensor(c, "W", 2);
    const json *list = json_get_type(c->params, "adapters", JSON_ARRAY);
    if (!x || !W)
        return -1;
    CHECK(x->rank >= 1, "x must have at least one axis");
    CHECK(list && list->count >= 1 && list->count <= MAX_ADAPTERS, "params.adapters is not a list of 1 to %d adapters",
          MAX_ADAPTERS);
    m->x_rank = x->rank;
    shape_of(x, m->x_shape);
    shape_of(W, m->W_shape);
    p->d_out = m->W_shape[m->fan_in_fan_out ? 1 : 0], p->d_in = m->W_shape[m->fan_in_fan_out ? 0 : 1];
    CHECK(m->x_shape[x->rank - 1] == p->d_in, "x's last axis is %ld, W's input axis %ld",
          m->x_shape[x->rank - 1], p->d_in);
    p->N = (long)(x->count / (size_t)(p->d_in ? p->d_in : 1));
    long d_out = p->d_out;
    p->x = input(c, "x", (int)m->x_rank, m->x_shape, 0);
    m->W_stored = input(c, "W", 2, m->W_shape, 0);
    p->bias = input(c, "bias", 1, &d_out, 1);
    if (!p->x || !m->W_stored || c->error[0])
        return -1;
    p->W = m->fan_in_fan_out ? transposed(c, m->W_stored, p->d_in, p->d_out) : m->W_stored;   /* (d_out, d_in) */
    m->n_adapters = (long)list->count;
    for (long k = 0; k < m->n_adapters; k++) {
        const json *entry = &list->items[k];
        const char *name = json_get_string(entry, "name");
        const json *alpha = json_get_type(entry, "alpha", JSON_NUMBER), *r = json_get_type(entry, "r", JSON_NUMBER);
        const json *rs = json_get_type(entry, "use_rslora", JSON_BOOL);
        CHECK(name && alpha && r && r->is_integer && r->integer >= 1 && rs,
              "params.adapters[%ld] lacks name, alpha, a positive integer r or use_rslora", k);
        adapter *a = &m->adapters[k];
        m->names[k] = name;
        a->alpha = alpha->number, a->r = (long)r->integer, a->use_rslora = rs->boolean;
        char tensor[300];
        long A_shape[2] = {a->r, p->d_in}, B_shape[2] = {p->d_out, a->r};
        snprintf(tensor, sizeof tensor, "A.%s", name);
        a->A = input(c, tensor, 2, A_shape, 0);
        snprintf(tensor, sizeof tensor, "B.%s", name);
        a->B = input(c, tensor, 2, B_shape, 0);
        if (!a->A || !a->B)
            return -1;
        if (BROKEN("layout"))
            a->A = transposed(c, a->A, p->d_in, a->r);
    }
    p->adapters = m->adapters;
    return 0;
}

/* The adapter called `name`, or -1 with an error. */
static long adapter_number(lora_case *c, const multi_case *m, const json *name)
{
    if (name->type == JSON_STRING)
        for (long k = 0; k < m->n_adapters; k++)
            if (strcmp(m->names[k], name->string) == 0)
                return k;
    return case_error(c, "a name in params does not name an adapter of params.adapters");
}

/* A params list of adapter names -> their numbers. */
static long *adapter_numbers(lora_case *c, const multi_case *m, const char *param, long *count)
{
    const json *names = json_get_type(c->params, param, JSON_ARRAY);
    if (!names) {
        case_error(c, "params.%s is not a list of adapter names", param);
        return NULL;
    }
    long *numbers = case_alloc(c, names->count, sizeof *numbers);
    for (size_t k = 0; k < names->count; k++)
        if ((numbers[k] = adapter_number(c, m, &names->items[k])) < 0)
            return NULL;
    *count = (long)names->count;
    return numbers;
}

static int run_adapter_set(lora_case *c)
{
    multi_case m;
    memset(&m, 0, sizeof m);
    if (case_bool(c, "fan_in_fan_out", &m.fan_in_fan_out))
        return -1;
    if (read_multi(c, &m))
        return -1;
    long n_active;
    const long *active = adapter_numbers(c, &m, "active", &n_active);
    m.p.merged = adapter_numbers(c, &m, "merged", &m.p.n_merged);
    if (!active || !m.p.merged)
        return -1;
    const long **list = case_alloc(c, (size_t)m.p.N, sizeof *list);
    long *count = case_alloc(c, (size_t)m.p.N, sizeof *count);
    for (long n = 0; n < m.p.N; n++)                  /* every row: the active adapters */
        list[n] = active, count[n] = n_active;
    m.p.list = list, m.p.count = count;
    long y_shape[ST_MAX_RANK];
    memcpy(y_shape, m.x_shape, sizeof y_shape);
    y_shape[m.x_rank - 1] = m.p.d_out;
    double *y = case_result(c, "y", c->type, (int)m.x_rank, y_shape);
    double *W_merged = case_result(c, "W_merged", c->type, 2, m.W_shape);
    void (*run)(const multi_problem *, double *, double *) = c->type == DT_F32 ? run_multi_f32 : run_multi_f64;
    run(&m.p, y, W_merged);                           /* W_merged as (d_out, d_in) */
    if (!m.fan_in_fan_out)
        return 0;
    if (BROKEN("merge_transpose") && m.p.d_in == m.p.d_out) {
        /* the deltas added untransposed to the stored (d_in, d_out) W: W + D, not W + D^T */
        multi_problem wrong = m.p;
        wrong.W = m.W_stored;
        run(&wrong, case_alloc(c, (size_t)(m.p.N * m.p.d_out), sizeof(double)), W_merged);
        return 0;
    }
    size_t entries = (size_t)(m.p.d_out * m.p.d_in);  /* back to W's stored layout: W + D^T */
    double *math = case_alloc(c, entries, sizeof *math);
    memcpy(math, W_merged, entries * sizeof *math);
    transpose_into(W_merged, math, m.p.d_out, m.p.d_in);
    return 0;
}

static int run_mixed_batch(lora_case *c)
{
    multi_case m;
    memset(&m, 0, sizeof m);
    if (read_multi(c, &m))
        return -1;
    const json *names = json_get_type(c->params, "names", JSON_ARRAY);
    CHECK(names && (long)names->count == m.x_shape[0], "params.names is not one name per sample (x's first axis)");
    long rows = m.p.N / m.x_shape[0];                 /* rows of x per sample */
    const long **list = case_alloc(c, (size_t)m.p.N, sizeof *list);
    long *count = case_alloc(c, (size_t)m.p.N, sizeof *count);
    long *number = case_alloc(c, names->count, sizeof *number);
    for (long q = 0; q < m.x_shape[0]; q++) {
        const json *name = &names->items[q];
        int base = name->type == JSON_STRING && strcmp(name->string, "__base__") == 0;
        if (!base && (number[q] = adapter_number(c, &m, name)) < 0)
            return -1;
        for (long n = q * rows; n < (q + 1) * rows; n++)
            list[n] = &number[q], count[n] = base ? 0 : 1;
    }
    m.p.list = list, m.p.count = count;
    long y_shape[ST_MAX_RANK];
    memcpy(y_shape, m.x_shape, sizeof y_shape);
    y_shape[m.x_rank - 1] = m.p.d_out;
    double *y = case_result(c, "y", c->type, (int)m.x_rank, y_shape);
    (c->type == DT_F32 ? run_multi_f32 : run_multi_f64)(&m.p, y, NULL);
    return 0;
}

/* ---- lora_shrink and lora_expand ---- */

/* Each token's slot: BGMV reads `indices`; SGMV gives sequence q the tokens
 * [seg_starts[q], seg_starts[q] + seg_lengths[q]) and the slot seg_indices[q] (tokens in no
 * sequence get no adapter). -1 means no adapter. */
static long *token_slots(lora_case *c, long T, long n)
{
    const char *kind = case_string(c, "index_kind");
    const st_tensor *ti = case_tensor(c, "indices", 1);
    if (!kind || !ti)
        return NULL;
    long *indices = case_integers(c, ti);
    if (!indices)
        return NULL;
    if (ti->shape[0] != T) {
        case_error(c, "indices has %lld entries for %ld tokens", ti->shape[0], T);
        return NULL;
    }
    long *slot = case_alloc(c, (size_t)T, sizeof *slot);
    if (strcmp(kind, "bgmv") == 0) {
        memcpy(slot, indices, (size_t)T * sizeof *slot);
    } else if (strcmp(kind, "sgmv") == 0) {
        const st_tensor *ts = case_tensor(c, "seg_starts", 1), *tl = case_tensor(c, "seg_lengths", 1),
                        *tq = case_tensor(c, "seg_indices", 1);
        if (!ts || !tl || !tq)
            return NULL;
        long *starts = case_integers(c, ts), *lengths = case_integers(c, tl), *seg = case_integers(c, tq);
        if (!starts || !lengths || !seg)
            return NULL;
        if (tl->shape[0] != ts->shape[0] || tq->shape[0] != ts->shape[0]) {
            case_error(c, "seg_starts, seg_lengths and seg_indices differ in length");
            return NULL;
        }
        char *covered = case_alloc(c, (size_t)T, 1);
        for (long t = 0; t < T; t++)
            slot[t] = -1;
        for (long q = 0; q < (long)ts->shape[0]; q++) {
            if (starts[q] < 0 || lengths[q] < 0 || starts[q] + lengths[q] > T) {
                case_error(c, "sequence %ld covers tokens outside [0, %ld)", q, T);
                return NULL;
            }
            for (long t = starts[q]; t < starts[q] + lengths[q]; t++) {
                if (covered[t]) {
                    case_error(c, "token %ld is in two sequences", t);
                    return NULL;
                }
                covered[t] = 1;
                slot[t] = seg[q];
            }
        }
        for (long t = 0; t < T; t++)
            if (slot[t] != indices[t]) {
                case_error(c, "token %ld: the segments give slot %ld, indices %ld", t, slot[t], indices[t]);
                return NULL;
            }
    } else {
        case_error(c, "params.index_kind is \"%s\", expected \"bgmv\" or \"sgmv\"", kind);
        return NULL;
    }
    for (long t = 0; t < T; t++)
        if (slot[t] < -1 || slot[t] >= n) {
            case_error(c, "token %ld has slot %ld, outside [-1, %ld)", t, slot[t], n);
            return NULL;
        }
    return slot;
}

/* The accumulation dtype: float32 or float64 (the f32 or f64 kernels). */
static int accumulation(lora_case *c, dtype *acc)
{
    const char *name = case_string(c, "accumulation_dtype");
    if (!name)
        return -1;
    int t = dtype_from_name(name);
    CHECK(t == DT_F32 || t == DT_F64, "params.accumulation_dtype is \"%s\", expected float32 or float64", name);
    *acc = (dtype)t;
    return 0;
}

/* A tensor of a given dtype and shape (for h, stored in the accumulation dtype). */
static const double *input_typed(lora_case *c, const char *name, dtype type, int rank, const long *shape)
{
    dtype saved = c->type;
    c->type = type;
    const double *v = input(c, name, rank, shape, 0);
    c->type = saved;
    return v;
}

static int run_lora_shrink(lora_case *c)
{
    serving_problem p;
    memset(&p, 0, sizeof p);
    dtype acc = DT_F64;
    const st_tensor *x = case_tensor(c, "x", 2), *A = case_tensor(c, "A_stack", 4);
    if (!x || !A || accumulation(c, &acc) || case_number(c, "scale", &p.scale) ||
        case_integer(c, "n_slices", &p.n_slices))
        return -1;
    p.T = (long)x->shape[0], p.d_in = (long)x->shape[1];
    p.n = (long)A->shape[1], p.R = (long)A->shape[2];
    long x_shape[2] = {p.T, p.d_in}, A_shape[4] = {p.n_slices, p.n, p.R, p.d_in};
    p.storage = c->type;
    p.x = input(c, "x", 2, x_shape, 0);
    p.A_stack = input(c, "A_stack", 4, A_shape, 0);
    p.slot = token_slots(c, p.T, p.n);
    if (!p.x || !p.A_stack || !p.slot)
        return -1;
    long h_shape[3] = {p.n_slices, p.T, p.R};
    double *h = case_result(c, "h", acc, 3, h_shape);
    (acc == DT_F32 ? run_shrink_f32 : run_shrink_f64)(&p, h);
    return 0;
}

static int run_lora_expand(lora_case *c)
{
    serving_problem p;
    memset(&p, 0, sizeof p);
    dtype acc = DT_F64;
    const st_tensor *y = case_tensor(c, "y", 2), *h = case_tensor(c, "h", 3);
    const json *slices = json_get_type(c->params, "slices", JSON_ARRAY);
    if (!y || !h || accumulation(c, &acc) || case_integer(c, "n_slices", &p.n_slices))
        return -1;
    CHECK(slices && (long)slices->count == p.n_slices && p.n_slices <= 64,
          "params.slices is not a list of n_slices = %ld [offset, width] pairs", p.n_slices);
    p.T = (long)y->shape[0], p.d_out = (long)y->shape[1], p.R = (long)h->shape[2];
    p.storage = c->type;
    long *offset = case_alloc(c, (size_t)p.n_slices, sizeof *offset);
    long *width = case_alloc(c, (size_t)p.n_slices, sizeof *width);
    const double **B = case_alloc(c, (size_t)p.n_slices, sizeof *B);
    for (long s = 0; s < p.n_slices; s++) {
        const json *pair = &slices->items[s];
        CHECK(pair->type == JSON_ARRAY && pair->count == 2 && pair->items[0].is_integer && pair->items[1].is_integer,
              "params.slices[%ld] is not [offset, width]", s);
        offset[s] = (long)pair->items[0].integer, width[s] = (long)pair->items[1].integer;
        CHECK(offset[s] >= 0 && width[s] >= 0 && offset[s] + width[s] <= p.d_out,
              "slice %ld = [%ld, %ld] runs outside y's %ld columns", s, offset[s], width[s], p.d_out);
        char name[32];
        snprintf(name, sizeof name, "B_stack.%ld", s);
        const st_tensor *Bs = case_tensor(c, name, 3);
        if (!Bs)
            return -1;
        if (s == 0)
            p.n = (long)Bs->shape[0];
        long B_shape[3] = {p.n, width[s], p.R};
        B[s] = input(c, name, 3, B_shape, 0);
        if (!B[s])
            return -1;
    }
    long y_shape[2] = {p.T, p.d_out}, h_shape[3] = {p.n_slices, p.T, p.R};
    p.y = input(c, "y", 2, y_shape, 0);
    p.h = input_typed(c, "h", acc, 3, h_shape);
    p.slot = token_slots(c, p.T, p.n);
    p.B_stack = B, p.offset = offset, p.width = width;
    if (!p.y || !p.h || !p.slot)
        return -1;
    double *out = case_result(c, "y", c->type, 2, y_shape);
    (acc == DT_F32 ? run_expand_f32 : run_expand_f64)(&p, out);
    return 0;
}

/* ---- the table ---- */

static const struct {
    const char *kind;
    int (*run)(lora_case *);
    int serving;                    /* any storage dtype; computed in the accumulation dtype */
} KINDS[] = {
    {"lora_linear", run_lora_linear, 0},
    {"dora_linear", run_dora_linear, 0},
    {"adapter_set", run_adapter_set, 0},
    {"mixed_batch", run_mixed_batch, 0},
    {"lora_shrink", run_lora_shrink, 1},
    {"lora_expand", run_lora_expand, 1},
};
#define N_KINDS (sizeof KINDS / sizeof KINDS[0])

const char *kind_skip_reason(const char *kind, dtype type)
{
    for (size_t k = 0; k < N_KINDS; k++)
        if (strcmp(kind, KINDS[k].kind) == 0) {
            if (KINDS[k].serving ? dtype_is_float(type) : (type == DT_F32 || type == DT_F64))
                return NULL;
            return "dtype not implemented here";
        }
    return "kind not implemented here";
}

int kind_run(lora_case *c)
{
    for (size_t k = 0; k < N_KINDS; k++)
        if (strcmp(c->kind, KINDS[k].kind) == 0)
            return KINDS[k].run(c);
    return case_error(c, "kind %s not implemented", c->kind);
}
