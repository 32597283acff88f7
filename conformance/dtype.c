/* dtype.c -- see dtype.h. Bytes are assembled by hand, so the host's byte order does not matter. */
#include "dtype.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

static const struct { const char *code, *name; size_t size; } TYPES[DT_COUNT] = {
    [DT_F64] = {"F64", "float64", 8}, [DT_F32] = {"F32", "float32", 4},
    [DT_F16] = {"F16", "float16", 2}, [DT_BF16] = {"BF16", "bfloat16", 2},
    [DT_I64] = {"I64", "int64", 8},   [DT_U8] = {"U8", "uint8", 1},
};

int dtype_from_code(const char *code)
{
    for (int t = 0; t < DT_COUNT; t++)
        if (strcmp(code, TYPES[t].code) == 0)
            return t;
    return -1;
}

int dtype_from_name(const char *name)
{
    for (int t = 0; t < DT_COUNT; t++)
        if (strcmp(name, TYPES[t].name) == 0)
            return t;
    return -1;
}

const char *dtype_name(dtype type) { return TYPES[type].name; }
size_t dtype_size(dtype type) { return TYPES[type].size; }
int dtype_is_float(dtype type) { return type == DT_F64 || type == DT_F32 || type == DT_F16 || type == DT_BF16; }

static uint64_t little_endian(const unsigned char *bytes, size_t size)
{
    uint64_t v = 0;
    for (size_t k = size; k-- > 0;)
        v = v << 8 | bytes[k];
    return v;
}

static double from_binary16(uint32_t h)          /* IEEE binary16: 1 sign, 5 exponent, 10 fraction bits */
{
    int exponent = (int)(h >> 10 & 0x1F);
    double fraction = (double)(h & 0x3FF);
    double v;
    if (exponent == 0)
        v = ldexp(fraction, -24);                 /* subnormal: 0.f x 2^-14 */
    else if (exponent == 31)
        v = fraction == 0 ? INFINITY : NAN;
    else
        v = ldexp(1024 + fraction, exponent - 25);    /* 1.f x 2^(e - 15) */
    return h >> 15 ? -v : v;
}

double dtype_value(dtype type, const unsigned char *data, size_t k)
{
    uint64_t bits = little_endian(data + k * TYPES[type].size, TYPES[type].size);
    switch (type) {
    case DT_F64: { double d; memcpy(&d, &bits, 8); return d; }
    case DT_F32: { uint32_t u = (uint32_t)bits; float f; memcpy(&f, &u, 4); return f; }
    case DT_BF16: { uint32_t u = (uint32_t)bits << 16; float f; memcpy(&f, &u, 4); return f; }
    case DT_F16: return from_binary16((uint32_t)bits);
    case DT_I64: return (double)(int64_t)bits;
    case DT_U8: return (double)bits;
    default: return NAN;
    }
}

long long dtype_int64(const unsigned char *data, size_t k)
{
    return (long long)(int64_t)little_endian(data + 8 * k, 8);
}

/* Round v to `bits` significant bits (the implicit one included), with `min_exponent` the exponent
 * of the smallest normal number and `max` the largest finite one. rint() rounds half to even in
 * the default rounding mode; v's bits beyond 53 are never present, so this rounds once. */
static double round_binary(double v, int bits, int min_exponent, double max)
{
    if (v == 0 || !isfinite(v))
        return v;
    int e;
    frexp(v, &e);                                 /* |v| = f 2^e, f in [0.5, 1) */
    int quantum = (e - 1 >= min_exponent ? e - 1 : min_exponent) - (bits - 1);   /* ulp exponent */
    double r = ldexp(rint(ldexp(v, -quantum)), quantum);
    return fabs(r) > max ? copysign(INFINITY, v) : r;
}

double round_to(dtype type, double v)
{
    switch (type) {
    case DT_F32: return (float)v;
    case DT_F16: return round_binary(v, 11, -14, 65504.0);
    case DT_BF16: return round_binary(v, 8, -126, ldexp(255.0, 120));    /* (2 - 2^-7) 2^127 */
    default: return v;
    }
}
