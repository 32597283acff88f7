/* case.c -- see case.h. */
#include "case.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int case_error(lora_case *c, const char *format, ...)
{
    if (c->error[0])
        return -1;
    va_list args;
    va_start(args, format);
    vsnprintf(c->error, sizeof c->error, format, args);
    va_end(args);
    return -1;
}

void *case_alloc(lora_case *c, size_t count, size_t size)
{
    if (c->n_allocations == MAX_ALLOCATIONS) {
        fprintf(stderr, "internal error: more than %d arrays in case %s\n", MAX_ALLOCATIONS, c->name);
        exit(2);
    }
    void *memory = calloc(count ? count : 1, size);
    if (!memory) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    c->allocations[c->n_allocations++] = memory;
    return memory;
}

const st_tensor *case_optional(lora_case *c, const char *name, int rank)
{
    const st_tensor *t = st_find(&c->file, name);
    if (t && rank >= 0 && t->rank != rank) {
        case_error(c, "tensor %s has %d axes, expected %d", name, t->rank, rank);
        return NULL;
    }
    return t;
}

const st_tensor *case_tensor(lora_case *c, const char *name, int rank)
{
    const st_tensor *t = case_optional(c, name, rank);
    if (!t && !c->error[0])
        case_error(c, "tensor %s missing from %s", name, c->name);
    return t;
}

double *case_values(lora_case *c, const st_tensor *t)
{
    if (!dtype_is_float(t->type)) {
        case_error(c, "tensor %s is %s, expected a float type", t->name, dtype_name(t->type));
        return NULL;
    }
    double *out = case_alloc(c, t->count, sizeof *out);
    for (size_t k = 0; k < t->count; k++)
        out[k] = dtype_value(t->type, t->data, k);
    return out;
}

long *case_integers(lora_case *c, const st_tensor *t)
{
    if (t->type != DT_I64) {
        case_error(c, "tensor %s is %s, expected int64", t->name, dtype_name(t->type));
        return NULL;
    }
    long *out = case_alloc(c, t->count, sizeof *out);
    for (size_t k = 0; k < t->count; k++)
        out[k] = (long)dtype_int64(t->data, k);
    return out;
}

static const json *param(lora_case *c, const char *name, json_type type)
{
    const json *v = json_get(c->params, name);
    if (!v)
        case_error(c, "params.%s missing", name);
    else if (v->type != type) {
        case_error(c, "params.%s is a %s, expected a %s", name, json_type_name(v->type), json_type_name(type));
        return NULL;
    }
    return v;
}

int case_number(lora_case *c, const char *name, double *value)
{
    const json *v = param(c, name, JSON_NUMBER);
    if (!v)
        return -1;
    *value = v->number;
    return 0;
}

int case_integer(lora_case *c, const char *name, long *value)
{
    const json *v = param(c, name, JSON_NUMBER);
    if (!v)
        return -1;
    if (!v->is_integer)
        return case_error(c, "params.%s is %g, expected an integer", name, v->number);
    *value = (long)v->integer;
    return 0;
}

int case_bool(lora_case *c, const char *name, int *value)
{
    const json *v = param(c, name, JSON_BOOL);
    if (!v)
        return -1;
    *value = v->boolean;
    return 0;
}

const char *case_string(lora_case *c, const char *name)
{
    const json *v = param(c, name, JSON_STRING);
    return v ? v->string : NULL;
}

double *case_result(lora_case *c, const char *name, dtype type, int rank, const long *shape)
{
    if (c->n_results == MAX_RESULTS || rank > ST_MAX_RANK) {
        fprintf(stderr, "internal error: too many results or axes in case %s\n", c->name);
        exit(2);
    }
    result *r = &c->results[c->n_results++];
    r->name = name;
    r->type = type;
    r->rank = rank;
    size_t count = 1;
    for (int k = 0; k < rank; k++) {
        r->shape[k] = shape[k];
        count *= (size_t)shape[k];
    }
    r->values = case_alloc(c, count, sizeof *r->values);
    return r->values;
}

void case_free(lora_case *c)
{
    for (int k = 0; k < c->n_allocations; k++)
        free(c->allocations[k]);
    st_free(&c->file);
}
