/* Fuzz what the ACME client reads from a CA. The input is a script of CA responses that drives
 * the real order state machine (acme/client.c) through a fake moat_acme_io_t, so every JSON
 * object the client parses is reached the way a CA would reach it: the directory, the nonce,
 * the account, the order, authorizations and their challenges, finalize and order polls,
 * problem documents with subproblems (badNonce resends, a refused "replaces"), Retry-After
 * and Link headers, and the certificate download with a preferred chain. A script can also
 * drive an ARI renewalInfo fetch instead of an order. Each body is also handed straight to
 * moat_acme_ari_parse, moat_acme_parse_rfc3339, moat_acme_parse_retry_after and
 * moat_b64url_decode.
 *
 * Format (text, so seeds stay readable):
 *
 *   first line      option letters: a tls-alpn-01, p preferred chain "Fuzz Root", r replaces,
 *                   e external account binding, w propagation wait, m email, 2 two names,
 *                   d dns-01 (f: its publication fails),
 *                   i an ARI fetch instead of an order
 *   then responses  separated by a line "%%", each: a status line ("200", or "ERR" for a
 *                   transport error), header lines "Name: value", an empty line, the body
 *
 * Checked: `done` runs at most once and never after a cancel; every challenge answer published
 * is withdrawn by the end; a success carries a PEM chain and a key, a failure a sentence. When
 * the script runs out while a request waits, the order is cancelled and the request fails, so
 * nothing leaks either way. */
#include "moat/acme.h"
#include "moat/log.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define MAX_EVENTS 4096
#define QCAP       16

typedef struct {
    int is_timer;
    void (*timer_cb)(void *);
    moat_httpc_cb cb;
    void *arg;
} event_t;

typedef struct {
    const char *p, *end; /* the rest of the script */
    event_t q[QCAP];
    size_t qhead, qtail;
    int published, withdrawn;
    int done, cancelled, ari;
    int wait;
    int dns_fail;
    moat_acme_dns01_cb dns_cb; /* the dns-01 publication under way */
    void *dns_arg;
    char *buf; /* the current response, NUL-separated pieces */
} fz_t;

static EVP_PKEY *account;
static int verbose; /* MOAT_FUZZ_VERBOSE=1: print how each script ended (to check seeds) */

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    verbose = getenv("MOAT_FUZZ_VERBOSE") != NULL;
    moat_log_min_level = verbose ? MOAT_LOG_DEBUG : MOAT_LOG_ERROR;
    account = moat_acme_key_new();
    return account ? 0 : -1;
}

static void push(fz_t *f, event_t e)
{
    /* The client has at most one request or timer outstanding; a deeper queue is a bug. */
    if (f->qtail - f->qhead >= QCAP)
        abort();
    f->q[f->qtail++ % QCAP] = e;
}

static int fz_request(void *data, const char *method, const char *url, const char *ctype,
                      const char *body, moat_httpc_cb cb, void *cb_data)
{
    fz_t *f = data;
    if (method == NULL || url == NULL || (body != NULL && ctype == NULL))
        abort();
    push(f, (event_t){0, NULL, cb, cb_data});
    return 0;
}

static void fz_after(void *data, uint64_t ms, void (*cb)(void *arg), void *arg)
{
    fz_t *f = data;
    (void)ms;
    push(f, (event_t){1, cb, NULL, arg});
}

static void fz_challenge(void *data, moat_acme_chal_t type, const char *name, const char *token,
                         const char *key_auth)
{
    fz_t *f = data;
    (void)type;
    if (name == NULL || token == NULL)
        abort();
    if (key_auth)
        f->published++;
    else
        f->withdrawn++;
}

static void fz_dns_fire(void *arg)
{
    fz_t *f = arg;
    f->dns_cb(f->dns_arg, f->dns_fail ? MOAT_EIO : 0, f->dns_fail ? "publication failed" : NULL);
}

/* DNS-01: counted like a published answer (the client withdraws it through fz_challenge);
 * the end of the publication is reported from the queue, like a timer. */
static void fz_dns01(void *data, const char *name, const char *value, moat_acme_dns01_cb cb,
                     void *arg)
{
    fz_t *f = data;
    if (name == NULL || value == NULL || strlen(value) != 43)
        abort();
    f->published++;
    f->dns_cb = cb;
    f->dns_arg = arg;
    push(f, (event_t){1, fz_dns_fire, NULL, f});
}

static uint64_t fz_propagation(void *data)
{
    return ((fz_t *)data)->wait ? 5 : 0;
}

static void on_done(void *data, moat_acme_result_t *res)
{
    fz_t *f = data;
    if (f->done++ || f->cancelled)
        abort();
    if (verbose)
        fprintf(stderr, "order: rc %d, %s\n", res->rc, res->error ? res->error : "issued");
    if (res->rc == 0 && (res->chain_pem == NULL || res->key_pem == NULL ||
                         strstr(res->chain_pem, "-----BEGIN CERTIFICATE-----") == NULL))
        abort();
    if (res->rc != 0 && res->error == NULL)
        abort();
}

static void on_ari_done(void *data, moat_acme_ari_result_t *res)
{
    fz_t *f = data;
    if (f->done++ || f->cancelled)
        abort();
    if (verbose)
        fprintf(stderr, "ari: rc %d, supported %d, window %lld..%lld, %s\n", res->rc,
                res->supported, (long long)res->ari.start, (long long)res->ari.end,
                res->error ? res->error : "");
    if (res->rc == 0 && res->supported && res->ari.end < res->ari.start)
        abort();
    if (res->rc != 0 && res->error == NULL)
        abort();
}

/* The parsers that take a CA's text directly, on one body. */
static void parse_direct(const char *body, size_t len)
{
    moat_acme_ari_t ari;
    if (moat_acme_ari_parse(body, len, &ari) == 0 && ari.end < ari.start)
        abort();
    moat_acme_ari_clear(&ari);
    moat_acme_parse_rfc3339(body);
    moat_acme_parse_retry_after(body, 1700000000);
    uint8_t *out = malloc(len * 3 / 4 + 3);
    long n = moat_b64url_decode(body, len, out);
    if (n > (long)(len * 3 / 4 + 3))
        abort();
    free(out);
}

/* Cut the next response off the script into r (pointers into f->buf). 0, or -1 at the end. */
static int next_response(fz_t *f, moat_httpc_response_t *r)
{
    if (f->p >= f->end)
        return -1;
    const char *start = f->p, *stop = f->end, *sep = NULL;
    for (const char *s = start; s + 3 <= f->end; s++) {
        if (s[0] == '%' && s[1] == '%' && (s == start || s[-1] == '\n') &&
            (s + 2 == f->end || s[2] == '\n')) {
            sep = s;
            break;
        }
    }
    if (sep != NULL) {
        stop = sep;
        f->p = sep + 2 < f->end ? sep + 3 : f->end;
    } else {
        f->p = f->end;
    }
    size_t len = (size_t)(stop - start);
    free(f->buf);
    f->buf = malloc(len + 1);
    memcpy(f->buf, start, len);
    f->buf[len] = '\0';

    memset(r, 0, sizeof *r);
    char *line = f->buf, *bufend = f->buf + len;
    char *nl = memchr(line, '\n', len);
    if (nl)
        *nl = '\0';
    if (strncmp(line, "ERR", 3) == 0)
        r->err = MOAT_EUPSTREAM;
    else
        r->status = atoi(line);
    line = nl ? nl + 1 : bufend;
    /* Header lines up to the first empty line; the rest is the body. */
    while (line < bufend) {
        nl = memchr(line, '\n', (size_t)(bufend - line));
        char *eol = nl ? nl : bufend;
        if (eol > line && eol[-1] == '\r')
            eol[-1] = '\0';
        *eol = '\0';
        char *next = nl ? nl + 1 : bufend;
        if (*line == '\0') {
            line = next;
            break;
        }
        char *colon = strchr(line, ':');
        if (colon && r->nheaders < MOAT_HTTPC_MAX_HEADERS) {
            *colon = '\0';
            char *v = colon + 1;
            while (*v == ' ')
                v++;
            r->names[r->nheaders] = line;
            r->values[r->nheaders++] = v;
        }
        line = next;
    }
    if (line > bufend)
        line = bufend;
    r->body = line;
    r->body_len = (size_t)(bufend - line);
    if (r->err != 0) {
        r->status = 0;
        r->nheaders = 0;
        r->body = NULL;
        r->body_len = 0;
    } else {
        parse_direct(r->body, r->body_len);
        for (size_t i = 0; i < r->nheaders; i++)
            moat_acme_parse_retry_after(r->values[i], 1700000000);
    }
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    fz_t f = {0};
    const char *in = (const char *)data, *end = in + size;
    const char *nl = memchr(in, '\n', size);
    const char *opts_end = nl ? nl : end;
    char opts[64] = "";
    size_t ol = MOAT_MIN((size_t)(opts_end - in), sizeof opts - 1);
    memcpy(opts, in, ol);
    opts[ol] = '\0';
    f.p = nl ? nl + 1 : end;
    f.end = end;
    f.wait = strchr(opts, 'w') != NULL;
    f.ari = strchr(opts, 'i') != NULL;

    f.dns_fail = strchr(opts, 'f') != NULL;
    moat_acme_io_t io = {&f, fz_request, fz_after, fz_challenge, fz_propagation, fz_dns01};
    const char *names[] = {"a.example.com", "b.example.com"};
    moat_acme_order_opts_t o = {
        .directory_url = "https://ca.test/dir",
        .names = names,
        .nnames = strchr(opts, '2') ? 2 : 1,
        .account_key = account,
        .email = strchr(opts, 'm') ? "admin@example.com" : NULL,
        .eab_kid = strchr(opts, 'e') ? "kid-1" : NULL,
        .eab_hmac = strchr(opts, 'e') ? "c2VjcmV0LWtleS1mb3ItZWFi" : NULL,
        .preferred_chain = strchr(opts, 'p') ? "Fuzz Root" : NULL,
        .challenge = strchr(opts, 'd')   ? MOAT_ACME_DNS01
                     : strchr(opts, 'a') ? MOAT_ACME_TLSALPN01
                                         : MOAT_ACME_HTTP01,
        .replaces = strchr(opts, 'r') ? "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE" : NULL,
    };
    moat_acme_order_t *order = NULL;
    moat_acme_ari_fetch_t *fetch = NULL;
    if (f.ari)
        fetch = moat_acme_ari_fetch(&io, o.directory_url, o.replaces ? o.replaces : "id.01",
                                    on_ari_done, &f);
    else
        order = moat_acme_order_start(&io, &o, on_done, &f);

    /* Bounded twice: past MAX_EVENTS the script counts as spent, and once cancelled each
     * outstanding request or timer ends without queueing another. */
    for (int n = 0; n < 2 * MAX_EVENTS && f.qhead < f.qtail; n++) {
        event_t e = f.q[f.qhead++ % QCAP];
        if (e.is_timer) {
            e.timer_cb(e.arg);
            continue;
        }
        moat_httpc_response_t r;
        if (f.cancelled || n >= MAX_EVENTS || next_response(&f, &r) != 0) {
            /* The script ran out: stop what is still running, then fail the request. */
            if (!f.done && !f.cancelled) {
                f.cancelled = 1;
                if (verbose)
                    fprintf(stderr, "script ended: cancelled\n");
                if (order)
                    moat_acme_order_cancel(order);
                else
                    moat_acme_ari_fetch_cancel(fetch);
            }
            memset(&r, 0, sizeof r);
            r.err = MOAT_ECLOSED;
        }
        e.cb(e.arg, &r);
    }
    /* Anything still queued here would leak: the client kept asking after a cancel. */
    if (f.qhead < f.qtail)
        abort();
    if (!f.done && !f.cancelled)
        abort(); /* the queue drained without an end */
    if (!f.ari && f.published != f.withdrawn)
        abort();
    free(f.buf);
    return 0;
}
