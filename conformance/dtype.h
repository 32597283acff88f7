/* dtype.h -- the element types of the vectors: names, sizes, decoding little-endian bytes, and
 * rounding a value to a narrower float type (round to nearest, ties to even). */
#ifndef CONFORMANCE_DTYPE_H
#define CONFORMANCE_DTYPE_H

#include <stddef.h>

typedef enum { DT_F64, DT_F32, DT_F16, DT_BF16, DT_I64, DT_U8, DT_COUNT } dtype;

int dtype_from_code(const char *code);   /* safetensors code "F64" -> DT_F64; -1 if unknown */
int dtype_from_name(const char *name);   /* manifest name "float64" -> DT_F64; -1 if unknown */
const char *dtype_name(dtype type);      /* DT_F64 -> "float64" */
size_t dtype_size(dtype type);           /* bytes per entry */
int dtype_is_float(dtype type);

/* Entry k of little-endian data of this type, converted to double. Exact for every type here
 * (an int64 beyond 2^53 is not: callers that need integers use dtype_int64). */
double dtype_value(dtype type, const unsigned char *data, size_t k);
long long dtype_int64(const unsigned char *data, size_t k);

/* The float16 / bfloat16 / float32 value nearest to v (ties to even; overflow to infinity). */
double round_to(dtype type, double v);

#endif
