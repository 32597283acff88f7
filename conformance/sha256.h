/* sha256.h -- SHA-256 (FIPS 180-4), to check each case file against the manifest's digest. */
#ifndef CONFORMANCE_SHA256_H
#define CONFORMANCE_SHA256_H

#include <stddef.h>

/* Write the digest of data[0:length] as 64 lowercase hex digits and a NUL into hex[65]. */
void sha256_hex(const unsigned char *data, size_t length, char hex[65]);

#endif
