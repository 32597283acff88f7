/* json.h -- a small JSON reader (RFC 8259): enough for manifest.json and safetensors headers.
 *
 * json_parse() turns text into a tree of json values; objects keep their keys in file order.
 * Numbers are kept as a double and, when the text is an integer (no '.', 'e' or 'E') that fits,
 * also as an exact long long, so shapes and byte offsets are never rounded.
 */
#ifndef CONFORMANCE_JSON_H
#define CONFORMANCE_JSON_H

#include <stddef.h>

typedef enum { JSON_NULL, JSON_BOOL, JSON_NUMBER, JSON_STRING, JSON_ARRAY, JSON_OBJECT } json_type;

typedef struct json {
    json_type type;
    int boolean;             /* JSON_BOOL */
    double number;           /* JSON_NUMBER */
    int is_integer;          /* JSON_NUMBER written as an integer that fits a long long */
    long long integer;       /*   ... its exact value */
    char *string;            /* JSON_STRING: UTF-8, NUL-terminated (an embedded \u0000 is refused) */
    size_t count;            /* JSON_ARRAY, JSON_OBJECT: number of items */
    struct json *items;      /*   ... the items */
    char **keys;             /* JSON_OBJECT: keys[i] names items[i] */
} json;

/* Parse `length` bytes of `text`. On success returns a tree to free with json_free(); on failure
 * returns NULL and writes a message naming the byte offset into `error` (size `error_size`). */
json *json_parse(const char *text, size_t length, char *error, size_t error_size);
void json_free(json *value);

/* Lookups. Each returns NULL when the value is absent or of another type. */
const json *json_get(const json *object, const char *key);           /* any type */
const json *json_get_type(const json *object, const char *key, json_type type);
const char *json_get_string(const json *object, const char *key);
const char *json_type_name(json_type type);

#endif
