/* What the plain-HTTP listener answers itself for a host that has no plain-HTTP site: ACME
 * HTTP-01 challenge tokens, and the permanent redirect to the site's HTTPS address. */
#ifndef MOAT_REDIRECT_H
#define MOAT_REDIRECT_H

#include "front.h"

/* Answer req if it is an ACME HTTP-01 request or its host has an HTTPS site: returns 1 when
 * answered (through moat_front_answer), 0 when the core goes on (a 404 follows). */
int moat_redirect_answer(moat_front_t *f, const moat_front_req_t *req);

#endif
