/* kinds.h -- the case kinds this program checks: each reads a case's tensors and params, runs
 * this program's own kernels (kernels.h) and records the outputs (case_result). */
#ifndef CONFORMANCE_KINDS_H
#define CONFORMANCE_KINDS_H

#include "case.h"

/* NULL if this program checks the kind in the case's dtype, else why it skips it. */
const char *kind_skip_reason(const char *kind, dtype type);
/* Run a case of a checked kind: 0, or -1 with the reason in c->error. */
int kind_run(lora_case *c);

#endif
