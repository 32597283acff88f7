/* safetensors.c -- see safetensors.h. Every size and offset is checked before it is used. */
#include "safetensors.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "json.h"

static int fail(char *error, size_t error_size, const char *what, const char *name)
{
    snprintf(error, error_size, "%s%s%s", what, name ? ": " : "", name ? name : "");
    return -1;
}

static int read_whole(const char *path, unsigned char **blob, size_t *size)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return -1;
    size_t capacity = 1 << 16, n = 0;
    unsigned char *buffer = malloc(capacity);
    for (;;) {
        if (!buffer) {
            fclose(f);
            return -1;
        }
        n += fread(buffer + n, 1, capacity - n, f);
        if (n < capacity)
            break;
        capacity *= 2;
        unsigned char *grown = realloc(buffer, capacity);
        if (!grown)
            free(buffer);
        buffer = grown;
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(buffer);
        return -1;
    }
    *blob = buffer;
    *size = n;
    return 0;
}

/* One header entry -> tensor; 0 or -1 with a message. */
static int parse_entry(const char *name, const json *entry, const unsigned char *buffer,
                       size_t buffer_size, st_tensor *t, char *error, size_t error_size)
{
    const char *code = json_get_string(entry, "dtype");
    const json *shape = json_get_type(entry, "shape", JSON_ARRAY);
    const json *offsets = json_get_type(entry, "data_offsets", JSON_ARRAY);
    if (!code || !shape || !offsets)
        return fail(error, error_size, "header entry lacks dtype, shape or data_offsets", name);
    int type = dtype_from_code(code);
    if (type < 0) {
        snprintf(error, error_size, "tensor %s: unknown dtype code \"%s\"", name, code);
        return -1;
    }
    if (shape->count > ST_MAX_RANK)
        return fail(error, error_size, "tensor has more than 8 axes", name);
    t->type = (dtype)type;
    t->rank = (int)shape->count;
    t->count = 1;
    for (int k = 0; k < t->rank; k++) {
        const json *d = &shape->items[k];
        if (d->type != JSON_NUMBER || !d->is_integer || d->integer < 0 ||
            (unsigned long long)d->integer > buffer_size)
            return fail(error, error_size, "shape entry is not an integer in [0, file size]", name);
        t->shape[k] = d->integer;
        t->count *= (size_t)d->integer;           /* each factor <= buffer size ... */
        if (t->count > buffer_size)               /* ... and so is the running product */
            return fail(error, error_size, "shape larger than the file", name);
    }
    if (offsets->count != 2)
        return fail(error, error_size, "data_offsets is not [begin, end]", name);
    const json *b = &offsets->items[0], *e = &offsets->items[1];
    if (b->type != JSON_NUMBER || e->type != JSON_NUMBER || !b->is_integer || !e->is_integer ||
        b->integer < 0 || e->integer < b->integer || (unsigned long long)e->integer > buffer_size)
        return fail(error, error_size, "data_offsets outside the data buffer", name);
    if ((size_t)(e->integer - b->integer) != t->count * dtype_size(t->type)) {
        snprintf(error, error_size, "tensor %s: data_offsets span %lld bytes, shape and dtype need %zu",
                 name, e->integer - b->integer, t->count * dtype_size(t->type));
        return -1;
    }
    t->data = buffer + b->integer;
    return 0;
}

int st_read(const char *path, st_file *file, char *error, size_t error_size)
{
    memset(file, 0, sizeof *file);
    if (read_whole(path, &file->blob, &file->size) != 0)
        return fail(error, error_size, "cannot read file", path);
    if (file->size < 8)
        return fail(error, error_size, "file shorter than the 8-byte header length", path);
    unsigned long long n = 0;
    for (int k = 7; k >= 0; k--)
        n = n << 8 | file->blob[k];               /* little-endian u64 */
    if (n > file->size - 8)
        return fail(error, error_size, "header length runs past the end of the file", path);
    char json_error[200];
    json *header = json_parse((const char *)file->blob + 8, (size_t)n, json_error, sizeof json_error);
    if (!header)
        return fail(error, error_size, "header is not JSON", json_error);
    if (header->type != JSON_OBJECT) {
        json_free(header);
        return fail(error, error_size, "header is not a JSON object", path);
    }
    const unsigned char *buffer = file->blob + 8 + n;
    size_t buffer_size = file->size - 8 - (size_t)n;
    file->tensors = calloc(header->count ? header->count : 1, sizeof *file->tensors);
    for (size_t k = 0; k < header->count; k++) {
        if (strcmp(header->keys[k], "__metadata__") == 0)
            continue;                             /* strings about the file; not needed here */
        st_tensor *t = &file->tensors[file->n_tensors];
        if (parse_entry(header->keys[k], &header->items[k], buffer, buffer_size, t, error, error_size)) {
            json_free(header);
            return -1;
        }
        t->name = malloc(strlen(header->keys[k]) + 1);
        strcpy(t->name, header->keys[k]);
        file->n_tensors++;
    }
    json_free(header);
    return 0;
}

void st_free(st_file *file)
{
    for (size_t k = 0; k < file->n_tensors; k++)
        free(file->tensors[k].name);
    free(file->tensors);
    free(file->blob);
    memset(file, 0, sizeof *file);
}

const st_tensor *st_find(const st_file *file, const char *name)
{
    for (size_t k = 0; k < file->n_tensors; k++)
        if (strcmp(file->tensors[k].name, name) == 0)
            return &file->tensors[k];
    return NULL;
}

double *st_doubles(const st_tensor *tensor)
{
    double *out = malloc((tensor->count ? tensor->count : 1) * sizeof *out);
    if (!out) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    for (size_t k = 0; k < tensor->count; k++)
        out[k] = dtype_value(tensor->type, tensor->data, k);
    return out;
}
