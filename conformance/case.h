/* case.h -- one case of the vectors while it is checked: its manifest entry, its file, the
 * outputs this program computed for it, and the helpers the kinds use to read it. */
#ifndef CONFORMANCE_CASE_H
#define CONFORMANCE_CASE_H

#include "dtype.h"
#include "json.h"
#include "safetensors.h"

#define MAX_RESULTS 16
#define MAX_ALLOCATIONS 64

typedef struct {
    const char *name;               /* an output name of the manifest: "y", "dA", ... */
    double *values;
    int rank;
    long long shape[ST_MAX_RANK];
    dtype type;                     /* the dtype it was computed in */
} result;

typedef struct {
    const char *name, *kind;
    dtype type;                     /* the case's storage dtype */
    const json *params, *inputs, *outputs;
    st_file file;
    char error[400];                /* why the case could not be run */
    int n_results;
    result results[MAX_RESULTS];
    int n_allocations;
    void *allocations[MAX_ALLOCATIONS];
} lora_case;

/* Each returns NULL / -1 on a problem, with the reason in c->error (the first one kept). */
int case_error(lora_case *c, const char *format, ...);
const st_tensor *case_tensor(lora_case *c, const char *name, int rank);   /* rank -1: any */
const st_tensor *case_optional(lora_case *c, const char *name, int rank); /* NULL, no error, if absent */
double *case_values(lora_case *c, const st_tensor *t);                     /* exact doubles */
long *case_integers(lora_case *c, const st_tensor *t);                     /* an int64 tensor */
int case_number(lora_case *c, const char *param, double *value);
int case_integer(lora_case *c, const char *param, long *value);
int case_bool(lora_case *c, const char *param, int *value);
const char *case_string(lora_case *c, const char *param);
void *case_alloc(lora_case *c, size_t count, size_t size);                 /* zeroed, freed with the case */
/* Record an output this program computed, of shape[0:rank]; returns its zeroed values. */
double *case_result(lora_case *c, const char *name, dtype type, int rank, const long *shape);
void case_free(lora_case *c);

#endif
