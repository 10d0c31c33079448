/* The ACME manager (server/acmemgr.c), on the control thread: which sites need ACME, their
 * orders, backoff, locks and storage. Server-internal: acme/ knows nothing of it; it drives
 * acme/'s order state machine through moat_acme_io_t. */
#ifndef MOAT_ACMEMGR_H
#define MOAT_ACMEMGR_H

#include "moat/acme.h"
#include "moat/config.h"
#include "moat/storage.h"
#include <stddef.h>

typedef struct moat_acmemgr moat_acmemgr_t;
typedef struct uv_loop_s uv_loop_t;

typedef struct {
    const char *email;
    const char *ca_url;  /* default Let's Encrypt production */
    const char *ca_root; /* extra trust anchor PEM file for the directory's HTTPS, or NULL */
    int staging;
    /* Optional: send the CA's requests through this instead of an HTTP client of the
     * manager's own (ca_root is then unused). The contract of moat_acme_io_t.request; tests
     * script a CA this way. */
    int (*request)(void *data, const char *method, const char *url, const char *content_type,
                   const char *body, moat_httpc_cb cb, void *cb_data);
    void *request_data;
} moat_acmemgr_opts_t;

/* The manager: which sites need ACME, their orders, backoff, locks and storage. `republish` is
 * called after a certificate was stored, to rebuild the certificate snapshot. */
moat_acmemgr_t *moat_acmemgr_new(uv_loop_t *loop, moat_storage_t *st, const moat_acmemgr_opts_t *o,
                                 void (*republish)(void *), void *data, char *err, size_t errlen);
/* Take a (new) configuration: start, keep or cancel jobs. A kept job (same names) takes the
 * site's new email, CA list, preferred chain and EAB for its next order; an order in flight
 * finishes with what it started with. cfg is borrowed for the call only. */
void moat_acmemgr_update(moat_acmemgr_t *m, const moat_config_t *cfg);
/* `moat renew`: renew certificates covering name (NULL: all) now; force ignores backoff and
 * freshness. */
void moat_acmemgr_renew(moat_acmemgr_t *m, const char *name, int force);
/* `moat renew` writes DATA/renew.request ("NAME or *" on the first line, "force" or "normal"
 * on the second) and sends SIGUSR1; the control thread then calls this, which reads, removes
 * and acts on the file. */
#define MOAT_ACME_RENEW_REQUEST "renew.request"
void moat_acmemgr_renew_request(moat_acmemgr_t *m, const char *data_dir);
/* Counters for status and metrics: orders started and failed since the start, and jobs
 * whose last order failed and that wait for the next (their backoff). m may be NULL. */
void moat_acmemgr_stats(const moat_acmemgr_t *m, uint64_t *orders, uint64_t *failures,
                        unsigned *backoff);
/* Cancel everything; handles close on the loop, so run it once afterwards. */
void moat_acmemgr_free(moat_acmemgr_t *m);

#endif
