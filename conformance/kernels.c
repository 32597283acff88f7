/* kernels.c -- kernels_body.h compiled twice: real = float, then real = double. */
#include "kernels.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "broken.h"

static void *zeros(size_t count, size_t size)
{
    void *memory = calloc(count ? count : 1, size);
    if (!memory) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return memory;
}

#define real float
#define K(name) name##_f32
#define SQRT sqrtf
#include "kernels_body.h"
#undef real
#undef K
#undef SQRT

#define real double
#define K(name) name##_f64
#define SQRT sqrt
#include "kernels_body.h"
