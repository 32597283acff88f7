/* broken.h -- deliberately wrong builds, to prove that the checks catch wrong implementations.
 *
 *   gcc ... -DCONFORMANCE_BREAK=scale      (or: make BREAK=scale)
 *
 * BROKEN("scale") is then true and the code beside it computes the classic mistake. A normal
 * build defines nothing and every BROKEN(...) is false. The names are listed in BREAKS, with
 * what each does; main() refuses a name not in the list, so a typo cannot build a correct
 * program that "fails to fail". */
#ifndef CONFORMANCE_BROKEN_H
#define CONFORMANCE_BROKEN_H

#include <string.h>

#define CONFORMANCE_STRING_(x) #x
#define CONFORMANCE_STRING(x) CONFORMANCE_STRING_(x)
#ifdef CONFORMANCE_BREAK
#define BREAK_NAME CONFORMANCE_STRING(CONFORMANCE_BREAK)
#else
#define BREAK_NAME ""
#endif

#define BROKEN(what) (strcmp(BREAK_NAME, what) == 0)

static const char *const BREAKS[][2] = {
    {"scale", "LoRA's scale is alpha instead of alpha / r (or alpha / sqrt(r))"},
    {"rslora", "use_rslora ignored: the scale is alpha / r for every adapter"},
    {"layout", "A read transposed: its bytes taken as (d_in, r) row-major instead of (r, d_in)"},
    {"dora_axis", "DoRA's norm taken over the output axis (V's columns) where V is square"},
    {"dora_exact", "DoRA's dA_exact, dB_exact computed with the norm held constant, like dA, dB"},
    {"merge_transpose", "adapter_set's merge under fan_in_fan_out adds the deltas untransposed to the stored "
                        "(d_in, d_out) W (where it is square, so no shape tells)"},
    {"minus_one", "serving index -1 read as the last slot (Python's negative indexing)"},
    {"slice_offset", "expand writes its slices side by side from column 0, ignoring their offsets"},
};

#endif
