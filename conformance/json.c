/* json.c -- a recursive-descent JSON reader; see json.h. Grammar: RFC 8259. */
#include "json.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_DEPTH 64                  /* manifest.json nests 5 deep; refuse pathological input */

typedef struct {
    const char *text;
    size_t length, pos;
    char *error;
    size_t error_size;
    int failed;
} parser;

static void fail(parser *p, const char *format, ...)
{
    if (p->failed)
        return;                       /* keep the first, innermost message */
    p->failed = 1;
    char message[200];
    va_list args;
    va_start(args, format);
    vsnprintf(message, sizeof message, format, args);
    va_end(args);
    snprintf(p->error, p->error_size, "JSON: %s at byte %zu", message, p->pos);
}

static void *xmalloc(size_t size)
{
    void *memory = malloc(size ? size : 1);
    if (!memory) {
        fprintf(stderr, "out of memory\n");
        exit(2);
    }
    return memory;
}

static void skip_space(parser *p)
{
    while (p->pos < p->length) {
        char c = p->text[p->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
            break;
        p->pos++;
    }
}

static int peek(parser *p) { return p->pos < p->length ? (unsigned char)p->text[p->pos] : -1; }

static int literal(parser *p, const char *word)
{
    size_t n = strlen(word);
    if (p->length - p->pos < n || memcmp(p->text + p->pos, word, n) != 0) {
        fail(p, "expected '%s'", word);
        return 0;
    }
    p->pos += n;
    return 1;
}

static int hex4(parser *p, unsigned *out)
{
    if (p->length - p->pos < 4) {
        fail(p, "short \\u escape");
        return 0;
    }
    unsigned v = 0;
    for (int k = 0; k < 4; k++) {
        char c = p->text[p->pos++];
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else {
            fail(p, "bad hex digit in \\u escape");
            return 0;
        }
    }
    *out = v;
    return 1;
}

/* Append code point c to out as UTF-8 (out has room: a \u escape is 6 bytes of input). */
static size_t put_utf8(char *out, unsigned c)
{
    if (c < 0x80) { out[0] = (char)c; return 1; }
    if (c < 0x800) { out[0] = (char)(0xC0 | c >> 6); out[1] = (char)(0x80 | (c & 0x3F)); return 2; }
    if (c < 0x10000) {
        out[0] = (char)(0xE0 | c >> 12); out[1] = (char)(0x80 | (c >> 6 & 0x3F));
        out[2] = (char)(0x80 | (c & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | c >> 18); out[1] = (char)(0x80 | (c >> 12 & 0x3F));
    out[2] = (char)(0x80 | (c >> 6 & 0x3F)); out[3] = (char)(0x80 | (c & 0x3F));
    return 4;
}

/* A string, the opening quote at p->pos. Returns a malloc'd NUL-terminated copy. */
static char *parse_string(parser *p)
{
    p->pos++;                                     /* the opening '"' */
    size_t start = p->pos, end = start;
    while (end < p->length && p->text[end] != '"')
        end += p->text[end] == '\\' ? 2 : 1;      /* the decoded string is never longer */
    if (end >= p->length) {
        fail(p, "unterminated string");
        return NULL;
    }
    char *out = xmalloc(end - start + 1);
    size_t n = 0;
    while (p->text[p->pos] != '"') {
        unsigned char c = (unsigned char)p->text[p->pos++];
        if (c < 0x20) {
            fail(p, "control character in string");
            free(out);
            return NULL;
        }
        if (c != '\\') {
            out[n++] = (char)c;
            continue;
        }
        char e = p->text[p->pos++];
        switch (e) {
        case '"': out[n++] = '"'; break;
        case '\\': out[n++] = '\\'; break;
        case '/': out[n++] = '/'; break;
        case 'b': out[n++] = '\b'; break;
        case 'f': out[n++] = '\f'; break;
        case 'n': out[n++] = '\n'; break;
        case 'r': out[n++] = '\r'; break;
        case 't': out[n++] = '\t'; break;
        case 'u': {
            unsigned c1, c2;
            if (!hex4(p, &c1))
                break;
            if (c1 >= 0xD800 && c1 < 0xDC00) {  /* a surrogate pair: \uD8xx\uDCxx */
                if (p->length - p->pos < 6 || p->text[p->pos] != '\\' || p->text[p->pos + 1] != 'u') {
                    fail(p, "lone high surrogate in \\u escape");
                    break;
                }
                p->pos += 2;
                if (!hex4(p, &c2))
                    break;
                if (c2 < 0xDC00 || c2 >= 0xE000) {
                    fail(p, "bad low surrogate in \\u escape");
                    break;
                }
                c1 = 0x10000 + ((c1 - 0xD800) << 10) + (c2 - 0xDC00);
            } else if (c1 >= 0xDC00 && c1 < 0xE000) {
                fail(p, "lone low surrogate in \\u escape");
                break;
            } else if (c1 == 0) {
                fail(p, "\\u0000 in a string is not supported");
                break;
            }
            n += put_utf8(out + n, c1);
            break;
        }
        default:
            fail(p, "bad escape '\\%c'", e);
        }
        if (p->failed) {
            free(out);
            return NULL;
        }
    }
    p->pos++;                                     /* the closing '"' */
    out[n] = '\0';
    return out;
}

static int digits(parser *p)
{
    size_t start = p->pos;
    while (p->pos < p->length && p->text[p->pos] >= '0' && p->text[p->pos] <= '9')
        p->pos++;
    return p->pos > start;
}

/* A number: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? */
static void parse_number(parser *p, json *out)
{
    size_t start = p->pos;
    int integer = 1;
    if (peek(p) == '-')
        p->pos++;
    if (peek(p) == '0')
        p->pos++;
    else if (!digits(p)) {
        fail(p, "bad number");
        return;
    }
    if (peek(p) == '.') {
        integer = 0;
        p->pos++;
        if (!digits(p)) {
            fail(p, "bad number: no digit after '.'");
            return;
        }
    }
    if (peek(p) == 'e' || peek(p) == 'E') {
        integer = 0;
        p->pos++;
        if (peek(p) == '+' || peek(p) == '-')
            p->pos++;
        if (!digits(p)) {
            fail(p, "bad number: no digit in exponent");
            return;
        }
    }
    char buffer[64];
    size_t n = p->pos - start;
    if (n >= sizeof buffer) {
        fail(p, "number longer than %zu characters", sizeof buffer - 1);
        return;
    }
    memcpy(buffer, p->text + start, n);
    buffer[n] = '\0';
    out->type = JSON_NUMBER;
    out->number = strtod(buffer, NULL);           /* correctly rounded in glibc */
    if (integer) {
        errno = 0;
        long long v = strtoll(buffer, NULL, 10);
        if (errno == 0) {
            out->is_integer = 1;
            out->integer = v;
        }
    }
}

static void parse_value(parser *p, json *out, int depth);

static void parse_array(parser *p, json *out, int depth)
{
    size_t capacity = 4;
    out->type = JSON_ARRAY;
    out->items = xmalloc(capacity * sizeof *out->items);
    p->pos++;                                     /* '[' */
    skip_space(p);
    if (peek(p) == ']') {
        p->pos++;
        return;
    }
    for (;;) {
        if (out->count == capacity) {
            capacity *= 2;
            json *grown = realloc(out->items, capacity * sizeof *out->items);
            if (!grown) { fprintf(stderr, "out of memory\n"); exit(2); }
            out->items = grown;
        }
        memset(&out->items[out->count], 0, sizeof *out->items);
        parse_value(p, &out->items[out->count++], depth + 1);
        if (p->failed)
            return;
        skip_space(p);
        if (peek(p) == ',') { p->pos++; continue; }
        if (peek(p) == ']') { p->pos++; return; }
        fail(p, "expected ',' or ']' in array");
        return;
    }
}

static void parse_object(parser *p, json *out, int depth)
{
    size_t capacity = 4;
    out->type = JSON_OBJECT;
    out->items = xmalloc(capacity * sizeof *out->items);
    out->keys = xmalloc(capacity * sizeof *out->keys);
    p->pos++;                                     /* '{' */
    skip_space(p);
    if (peek(p) == '}') {
        p->pos++;
        return;
    }
    for (;;) {
        skip_space(p);
        if (peek(p) != '"') {
            fail(p, "expected a string key in object");
            return;
        }
        char *key = parse_string(p);
        if (!key)
            return;
        for (size_t k = 0; k < out->count; k++)
            if (strcmp(out->keys[k], key) == 0) {
                fail(p, "duplicate key \"%s\"", key);
                free(key);
                return;
            }
        if (out->count == capacity) {
            capacity *= 2;
            json *items = realloc(out->items, capacity * sizeof *out->items);
            char **keys = realloc(out->keys, capacity * sizeof *out->keys);
            if (!items || !keys) { fprintf(stderr, "out of memory\n"); exit(2); }
            out->items = items;
            out->keys = keys;
        }
        out->keys[out->count] = key;
        memset(&out->items[out->count], 0, sizeof *out->items);
        out->count++;
        skip_space(p);
        if (peek(p) != ':') {
            fail(p, "expected ':' after key \"%s\"", key);
            return;
        }
        p->pos++;
        parse_value(p, &out->items[out->count - 1], depth + 1);
        if (p->failed)
            return;
        skip_space(p);
        if (peek(p) == ',') { p->pos++; continue; }
        if (peek(p) == '}') { p->pos++; return; }
        fail(p, "expected ',' or '}' in object");
        return;
    }
}

static void parse_value(parser *p, json *out, int depth)
{
    if (depth > MAX_DEPTH) {
        fail(p, "nested more than %d deep", MAX_DEPTH);
        return;
    }
    skip_space(p);
    int c = peek(p);
    switch (c) {
    case '{': parse_object(p, out, depth); break;
    case '[': parse_array(p, out, depth); break;
    case '"':
        out->string = parse_string(p);
        if (out->string)
            out->type = JSON_STRING;
        break;
    case 't': if (literal(p, "true")) { out->type = JSON_BOOL; out->boolean = 1; } break;
    case 'f': if (literal(p, "false")) { out->type = JSON_BOOL; out->boolean = 0; } break;
    case 'n': if (literal(p, "null")) out->type = JSON_NULL; break;
    case -1: fail(p, "unexpected end of text"); break;
    default:
        if (c == '-' || (c >= '0' && c <= '9'))
            parse_number(p, out);
        else
            fail(p, "unexpected character '%c'", c);
    }
}

static void free_children(json *value)
{
    for (size_t k = 0; k < value->count; k++) {
        free_children(&value->items[k]);
        if (value->keys)
            free(value->keys[k]);
    }
    free(value->items);
    free(value->keys);
    free(value->string);
}

json *json_parse(const char *text, size_t length, char *error, size_t error_size)
{
    parser p = {text, length, 0, error, error_size, 0};
    json *root = xmalloc(sizeof *root);
    memset(root, 0, sizeof *root);
    parse_value(&p, root, 0);
    skip_space(&p);
    if (!p.failed && p.pos != length)
        fail(&p, "text after the JSON value");
    if (p.failed) {
        json_free(root);
        return NULL;
    }
    return root;
}

void json_free(json *value)
{
    if (!value)
        return;
    free_children(value);
    free(value);
}

const json *json_get(const json *object, const char *key)
{
    if (!object || object->type != JSON_OBJECT)
        return NULL;
    for (size_t k = 0; k < object->count; k++)
        if (strcmp(object->keys[k], key) == 0)
            return &object->items[k];
    return NULL;
}

const json *json_get_type(const json *object, const char *key, json_type type)
{
    const json *value = json_get(object, key);
    return value && value->type == type ? value : NULL;
}

const char *json_get_string(const json *object, const char *key)
{
    const json *value = json_get_type(object, key, JSON_STRING);
    return value ? value->string : NULL;
}

const char *json_type_name(json_type type)
{
    static const char *names[] = {"null", "boolean", "number", "string", "array", "object"};
    return names[type];
}
