/* main.c -- check lora-ref's golden vectors (format version 2) with this program's own LoRA,
 * DoRA and serving kernels. Written from docs/vectors-format.md alone; needs only libc and libm.
 *
 *   lora-conformance VECTORS_DIR        (the directory `lora-ref vectors VECTORS_DIR` wrote)
 *
 * Prints one line per case output (PASS or FAIL, the worst entry's |yours - expected| / bound,
 * that error and that bound), a SKIP line per case of a kind or dtype not implemented here, and
 * a summary per kind. Exit status: 0 all checked outputs pass, 1 some fail, 2 the vectors could
 * not be read (or a bad build). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broken.h"
#include "case.h"
#include "kinds.h"
#include "sha256.h"

#define MAX_KINDS 32

typedef struct {
    const char *kind;
    int cases, outputs, failed, skipped;
    double worst;                   /* the largest error / bound among the passing outputs */
} tally;

static tally tallies[MAX_KINDS];
static int n_tallies;

static tally *tally_for(const char *kind)
{
    for (int k = 0; k < n_tallies; k++)
        if (strcmp(tallies[k].kind, kind) == 0)
            return &tallies[k];
    if (n_tallies == MAX_KINDS) {
        fprintf(stderr, "more than %d kinds in the manifest\n", MAX_KINDS);
        exit(2);
    }
    tallies[n_tallies].kind = kind;
    return &tallies[n_tallies++];
}

static char *read_text(const char *path, size_t *length)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t capacity = 1 << 16, n = 0;
    char *text = malloc(capacity);
    while (text) {
        n += fread(text + n, 1, capacity - n, f);
        if (n < capacity)
            break;
        char *grown = realloc(text, capacity *= 2);
        if (!grown)
            free(text);
        text = grown;
    }
    fclose(f);
    *length = n;
    return text;
}

/* A copy of text fit to print: bytes outside printable ASCII (from a damaged file) become '?'. */
static const char *printable(const char *text, char *out, size_t size)
{
    size_t n = 0;
    for (; text[n] && n + 1 < size; n++)
        out[n] = text[n] >= 0x20 && text[n] < 0x7F ? text[n] : '?';
    out[n] = '\0';
    return out;
}

static void report(const char *verdict, const lora_case *c, const char *output, const char *detail)
{
    char kind[64], name[128], out[64], said[512];
    printf("%-4s  %-12s  %-30s  %-9s  %s\n", verdict, printable(c->kind, kind, sizeof kind),
           printable(c->name, name, sizeof name), printable(output, out, sizeof out),
           printable(detail, said, sizeof said));
}

static const result *find_result(const lora_case *c, const char *name)
{
    for (int k = 0; k < c->n_results; k++)
        if (strcmp(c->results[k].name, name) == 0)
            return &c->results[k];
    return NULL;
}

/* Check one output against the manifest's rule; print its line; 1 if it passes. */
static int check_output(lora_case *c, const char *name, const json *spec, tally *t)
{
    char detail[300];
    const result *mine = find_result(c, name);
    const char *rule = json_get_string(spec, "rule"), *want = json_get_string(spec, "dtype");
    const char *expected_name = json_get_string(spec, "expected");
    const json *shape = json_get_type(spec, "shape", JSON_ARRAY);
    if (!mine) {
        report("SKIP", c, name, "(an output this program does not compute)");
        return 1;
    }
    t->outputs++;
    if (!rule || !want || !expected_name || !shape) {
        report("FAIL", c, name, "the manifest's output lacks rule, dtype, expected or shape");
        return 0;
    }
    /* my shape == the manifest's shape == the expected tensor's shape */
    const st_tensor *expected = st_find(&c->file, expected_name);
    int same = expected && shape->count == (size_t)mine->rank && expected->rank == mine->rank;
    for (int k = 0; same && k < mine->rank; k++)
        same = shape->items[k].is_integer && shape->items[k].integer == mine->shape[k] &&
               expected->shape[k] == mine->shape[k];
    if (!same) {
        report("FAIL", c, name, expected ? "shape differs between this program, the manifest and the file"
                                         : "expected tensor missing from the file");
        return 0;
    }
    if (strcmp(want, "any") != 0 && strcmp(want, dtype_name(mine->type)) != 0) {
        snprintf(detail, sizeof detail, "computed in %s, the output's dtype is %s", dtype_name(mine->type), want);
        report("FAIL", c, name, detail);
        return 0;
    }
    size_t count = expected->count;
    if (strcmp(rule, "exact") == 0) {
        /* same dtype (checked above) and the same bits: both values are exact in double, so
         * compare value and sign (-0.0 is not +0.0) */
        size_t bad = 0;
        for (size_t k = 0; k < count; k++) {
            double e = dtype_value(expected->type, expected->data, k), v = mine->values[k];
            if (!(e == v && signbit(e) == signbit(v)) && !(isnan(e) && isnan(v)))
                bad++;
        }
        snprintf(detail, sizeof detail, "exact: %zu of %zu entries differ", bad, count);
        report(bad ? "FAIL" : "PASS", c, name, detail);
        return bad == 0;
    }
    if (strcmp(rule, "tolerance") != 0) {
        snprintf(detail, sizeof detail, "unknown rule \"%s\"", rule);
        report("FAIL", c, name, detail);
        return 0;
    }
    /* tolerance: |yours[i] - expected[i]| <= rtol * magnitude[i] for every i, in float64 */
    const char *magnitude_name = json_get_string(spec, "magnitude");
    const json *rtol = json_get_type(spec, "rtol", JSON_NUMBER);
    const st_tensor *magnitude = magnitude_name ? st_find(&c->file, magnitude_name) : NULL;
    if (!rtol || !magnitude || magnitude->count != count || expected->type != DT_F64 ||
        magnitude->type != DT_F64) {
        report("FAIL", c, name, "no float64 expected/magnitude tensors of the output's size, or no rtol");
        return 0;
    }
    int pass = 1;
    double worst = -1, worst_error = 0, worst_bound = 0;
    size_t worst_at = 0;
    for (size_t k = 0; k < count; k++) {
        double e = dtype_value(DT_F64, expected->data, k), m = dtype_value(DT_F64, magnitude->data, k);
        double error = fabs(mine->values[k] - e), bound = rtol->number * m;
        pass &= error <= bound;                   /* false for NaN; infinity fails the bound */
        double ratio = isnan(error) ? INFINITY : bound > 0 ? error / bound : error == 0 ? 0 : INFINITY;
        if (ratio > worst)
            worst = ratio, worst_error = error, worst_bound = bound, worst_at = k;
    }
    snprintf(detail, sizeof detail, "err/bound %-8.3g (err %.3g, bound %.3g, entry %zu of %zu)",
             worst, worst_error, worst_bound, worst_at, count);
    report(pass ? "PASS" : "FAIL", c, name, detail);
    if (pass && worst > t->worst)
        t->worst = worst;
    return pass;
}

/* Load a case's file and check it matches its manifest entry (sha256, inputs' dtypes and shapes). */
static int load_case(lora_case *c, const char *dir, const json *entry)
{
    const char *file = json_get_string(entry, "file"), *digest = json_get_string(entry, "sha256");
    if (!file || !digest)
        return case_error(c, "the manifest's case lacks file or sha256");
    if (strchr(file, '/') || strchr(file, '\\') || strcmp(file, "..") == 0)
        return case_error(c, "file name \"%s\" is not a plain name in the directory", file);
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, file);
    if (st_read(path, &c->file, c->error, sizeof c->error))
        return -1;
    char hex[65];
    sha256_hex(c->file.blob, c->file.size, hex);
    if (strcmp(hex, digest) != 0)
        return case_error(c, "%s: sha256 %s, the manifest says %s", file, hex, digest);
    for (size_t k = 0; k < c->inputs->count; k++) {  /* the manifest's inputs are the file's */
        const char *name = c->inputs->keys[k];
        const json *in = &c->inputs->items[k], *shape = json_get_type(in, "shape", JSON_ARRAY);
        const char *type = json_get_string(in, "dtype");
        const st_tensor *t = st_find(&c->file, name);
        if (!t || !shape || !type)
            return case_error(c, "input %s: missing from the file, or no dtype/shape in the manifest", name);
        int same = strcmp(type, dtype_name(t->type)) == 0 && shape->count == (size_t)t->rank;
        for (int d = 0; same && d < t->rank; d++)
            same = shape->items[d].is_integer && shape->items[d].integer == t->shape[d];
        if (!same)
            return case_error(c, "input %s: the file's dtype or shape differs from the manifest's", name);
    }
    return 0;
}

int main(int argc, char **argv)
{
    int known = BREAK_NAME[0] == '\0';
    for (size_t k = 0; k < sizeof BREAKS / sizeof BREAKS[0]; k++)
        known |= BROKEN(BREAKS[k][0]);
    if (!known) {
        fprintf(stderr, "built with CONFORMANCE_BREAK=%s, which is not one of:\n", BREAK_NAME);
        for (size_t k = 0; k < sizeof BREAKS / sizeof BREAKS[0]; k++)
            fprintf(stderr, "  %-15s %s\n", BREAKS[k][0], BREAKS[k][1]);
        return 2;
    }
    if (argc != 2) {
        fprintf(stderr, "usage: %s VECTORS_DIR   (a directory written by `lora-ref vectors`)\n", argv[0]);
        return 2;
    }
    if (BREAK_NAME[0])
        printf("BROKEN BUILD (CONFORMANCE_BREAK=%s): checks must fail\n", BREAK_NAME);

    char path[4096], error[300];
    snprintf(path, sizeof path, "%s/manifest.json", argv[1]);
    size_t length;
    char *text = read_text(path, &length);
    if (!text) {
        fprintf(stderr, "cannot read %s\n", path);
        return 2;
    }
    json *manifest = json_parse(text, length, error, sizeof error);
    free(text);
    if (!manifest) {
        fprintf(stderr, "%s: %s\n", path, error);
        return 2;
    }
    const char *format = json_get_string(manifest, "format");
    const json *version = json_get_type(manifest, "format_version", JSON_NUMBER);
    const json *cases = json_get_type(manifest, "cases", JSON_ARRAY);
    if (!format || strcmp(format, "lora-ref-golden-vectors") != 0 || !version || !cases) {
        fprintf(stderr, "%s is not a lora-ref golden vectors manifest\n", path);
        json_free(manifest);
        return 2;
    }
    if (!version->is_integer || version->integer != 2) {
        fprintf(stderr, "%s has format_version %g; this program reads version 2 only\n", path, version->number);
        json_free(manifest);
        return 2;
    }

    int failed = 0, checked_cases = 0, checked_outputs = 0, skipped = 0;
    for (size_t k = 0; k < cases->count; k++) {
        const json *entry = &cases->items[k];
        lora_case c;
        memset(&c, 0, sizeof c);
        c.name = json_get_string(entry, "name");
        c.kind = json_get_string(entry, "kind");
        const char *type = json_get_string(entry, "dtype");
        c.params = json_get_type(entry, "params", JSON_OBJECT);
        c.inputs = json_get_type(entry, "inputs", JSON_OBJECT);
        c.outputs = json_get_type(entry, "outputs", JSON_OBJECT);
        if (!c.name || !c.kind || !type || !c.params || !c.inputs || !c.outputs || dtype_from_name(type) < 0) {
            fprintf(stderr, "%s: case %zu lacks name, kind, a known dtype, params, inputs or outputs\n", path, k);
            json_free(manifest);
            return 2;
        }
        c.type = (dtype)dtype_from_name(type);
        tally *t = tally_for(c.kind);
        const char *skip = kind_skip_reason(c.kind, c.type);
        if (skip) {
            report("SKIP", &c, "(case)", skip);
            t->skipped++;
            skipped++;
            continue;
        }
        t->cases++;
        checked_cases++;
        if (load_case(&c, argv[1], entry) || kind_run(&c)) {
            report("FAIL", &c, "(case)", c.error);
            t->failed++;
            failed++;
        } else {
            for (size_t o = 0; o < c.outputs->count; o++) {
                int before = t->outputs;
                if (!check_output(&c, c.outputs->keys[o], &c.outputs->items[o], t)) {
                    t->failed++;
                    failed++;
                }
                checked_outputs += t->outputs - before;
            }
        }
        case_free(&c);
    }

    printf("\n%-16s %6s %8s %7s %8s  %s\n", "kind", "cases", "outputs", "failed", "skipped", "max err/bound (passing)");
    for (int k = 0; k < n_tallies; k++) {
        tally *t = &tallies[k];
        if (t->cases)
            printf("%-16s %6d %8d %7d %8d  %.3g\n", t->kind, t->cases, t->outputs, t->failed, t->skipped, t->worst);
        else
            printf("%-16s %6d %8d %7d %8d  (not checked here)\n", t->kind, 0, 0, 0, t->skipped);
    }
    printf("conformance: %s: %d cases, %d outputs checked, %d failed; %d cases skipped\n",
           failed ? "FAILED" : "all pass", checked_cases, checked_outputs, failed, skipped);
    json_free(manifest);
    return failed ? 1 : 0;
}
