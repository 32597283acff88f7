/* safetensors.h -- read a .safetensors file: an 8-byte little-endian header length N, N bytes of
 * JSON header, then the data buffer; each header entry is
 * name -> {"dtype": CODE, "shape": [...], "data_offsets": [begin, end]} into that buffer. */
#ifndef CONFORMANCE_SAFETENSORS_H
#define CONFORMANCE_SAFETENSORS_H

#include <stddef.h>

#include "dtype.h"

#define ST_MAX_RANK 8

typedef struct {
    char *name;
    dtype type;
    int rank;
    long long shape[ST_MAX_RANK];
    size_t count;                   /* product of shape (1 for a scalar, shape []) */
    const unsigned char *data;      /* count * dtype_size(type) bytes inside the file's blob */
} st_tensor;

typedef struct {
    unsigned char *blob;            /* the whole file */
    size_t size;
    size_t n_tensors;
    st_tensor *tensors;
} st_file;

/* Read and validate `path`. Returns 0, or -1 with a message in `error`. */
int st_read(const char *path, st_file *file, char *error, size_t error_size);
void st_free(st_file *file);
const st_tensor *st_find(const st_file *file, const char *name);
/* The tensor's entries as doubles (exact for every float type), malloc'd. */
double *st_doubles(const st_tensor *tensor);

#endif
