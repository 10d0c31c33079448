/* The ACME manager (server/acmemgr.h), on the control thread: one job per site line whose
 * names use ACME. A job sleeps on its timer until the certificate is due (a third of its life
 * left) or its backoff ends, takes the storage lock for its id, runs an order and stores the
 * result; the control thread then rebuilds and publishes the certificate snapshot.
 *
 * Storage (kv table), beside what server/acmeshare.h keeps (locks, tokens, live processes):
 *   acme-account-key:<CA>|<email>  the ES256 account key (PEM)
 *   acme-backoff:<id>              "<failures> <next attempt unix>"
 *   acme-error:<id>                the last failure, as logged
 *   acme-challenge:<id>            the challenge type that last worked
 *   acme-order:<id>                "<CA directory> <order URL>" of the order under way, so
 *                                  that a process killed mid-order is followed by one that
 *                                  continues it rather than placing a second order
 *   dns01-record:*, dns01-state:*  DNS-01 records made and their state (server/dns01.h)
 *   acme-ari:<id>                  the last renewal window fetched, shared by the instances
 *
 * ARI (RFC 9773): for a stored certificate the job asks the CA's renewalInfo for a suggested
 * window (every 6 h or as Retry-After says) and renews at a fixed point inside it; the
 * renewal order then names the certificate it replaces. */
#include "acmemgr.h"
#include "acmeshare.h"
#include "dns01.h"
#include "moat/certs.h"
#include "moat/config.h"
#include "moat/httpclient.h"
#include "moat/log.h"
#include "moat/storage.h"

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#define LOCK_RETRY_MS     2000
#define STORE_RETRY_MS    10000
#define HTTP_TIMEOUT_MS   30000
#define ARI_RETRY_DEFAULT 3600

typedef struct job job_t;

struct moat_acmemgr {
    uv_loop_t *loop;
    moat_storage_t *st;
    char *email, *ca_url;
    moat_httpc_t *http; /* NULL when requests go through opts.request */
    int (*request)(void *, const char *, const char *, const char *, const char *, moat_httpc_cb,
                   void *);
    void *request_data;
    void (*republish)(void *);
    void *republish_data;
    uint64_t orders, failures; /* since the start, for moat_acmemgr_stats */
    job_t *jobs;
    struct after *afters;
    moat_acmeshare_t *share; /* locks, peers and tokens shared with other processes */
    uv_timer_t *share_timer;
    moat_dns01_t *dns; /* DNS-01 records (server/dns01.c) */
};

struct job {
    moat_acmemgr_t *m;
    job_t *next;
    char *id;
    char **names;
    size_t nnames;
    char *email, *preferred, *eab_kid, *eab_hmac;
    /* dns=: DNS-01 with this provider (then always DNS-01, never a fallback). */
    int dns;
    char *dns_server, *dns_tsig, *dns_token_file, *dns_resolver, *dns_api;
    uint64_t dns_wait_ms;
    char **cas;
    size_t ncas, ca_i;
    uv_timer_t timer;
    moat_acme_order_t *order;
    moat_acme_chal_t chal;
    int fallback_tried, force, seen, renewal;
    int in_backoff; /* the last order failed, and no other has started since */
    int64_t known_not_after;
    uint64_t t_start;
    /* ARI state for the stored certificate ari_cert_id, from CA index ari_ca. */
    moat_acme_ari_fetch_t *ari_fetch;
    char *ari_cert_id;
    int ari_supported;
    size_t ari_ca;
    int64_t ari_start, ari_end, ari_next;
};

/* --- io for orders ------------------------------------------------------------------------- */

struct after {
    uv_timer_t t;
    void (*cb)(void *);
    void *arg;
    struct after *prev, *next;
    moat_acmemgr_t *m;
};

static void after_closed(uv_handle_t *h)
{
    free(h->data);
}

static void after_unlink(struct after *a)
{
    if (a->prev)
        a->prev->next = a->next;
    else
        a->m->afters = a->next;
    if (a->next)
        a->next->prev = a->prev;
}

static void after_fire(uv_timer_t *t)
{
    struct after *a = t->data;
    after_unlink(a);
    uv_close((uv_handle_t *)&a->t, after_closed);
    a->cb(a->arg);
}

static void io_after(void *data, uint64_t ms, void (*cb)(void *), void *arg)
{
    moat_acmemgr_t *m = data;
    struct after *a = moat_xcalloc(1, sizeof *a);
    a->cb = cb;
    a->arg = arg;
    a->m = m;
    a->next = m->afters;
    if (m->afters)
        m->afters->prev = a;
    m->afters = a;
    uv_timer_init(m->loop, &a->t);
    a->t.data = a;
    uv_timer_start(&a->t, after_fire, ms, 0);
}

static void io_challenge(void *data, moat_acme_chal_t type, const char *name, const char *token,
                         const char *key_auth)
{
    moat_acmemgr_t *m = data;
    if (type == MOAT_ACME_DNS01) {
        /* Published through io_dns01_publish; only the withdrawal comes this way. */
        if (key_auth == NULL)
            moat_dns01_remove(m->dns, name, token);
        return;
    }
    moat_acmeshare_publish(m->share, type, name, token, key_auth);
}

static int owner_gone(void *data, const char *owner)
{
    moat_acmemgr_t *m = data;
    return moat_acmeshare_owner_gone(m->share, owner);
}

/* The job whose order is answering for name (an identifier: example.com also stands for
 * *.example.com). */
static job_t *job_for_name(moat_acmemgr_t *m, const char *name)
{
    for (job_t *j = m->jobs; j; j = j->next) {
        if (j->order == NULL || j->dns == MOAT_DNS_NONE)
            continue;
        for (size_t k = 0; k < j->nnames; k++) {
            const char *n = j->names[k];
            if (strcasecmp(n, name) == 0 || (n[0] == '*' && strcasecmp(n + 2, name) == 0))
                return j;
        }
    }
    return NULL;
}

static void io_dns01_publish(void *data, const char *name, const char *value, moat_acme_dns01_cb cb,
                             void *arg)
{
    moat_acmemgr_t *m = data;
    job_t *j = job_for_name(m, name);
    moat_dns01_cfg_t c = {.provider = MOAT_DNS_NONE};
    if (j != NULL)
        c = (moat_dns01_cfg_t){.provider = j->dns,
                               .server = j->dns_server,
                               .tsig = j->dns_tsig,
                               .token_file = j->dns_token_file,
                               .resolver = j->dns_resolver,
                               .api = j->dns_api,
                               .wait_ms = j->dns_wait_ms};
    moat_dns01_add(m->dns, &c, name, value, cb, arg);
}

static uint64_t io_propagation_ms(void *data)
{
    moat_acmemgr_t *m = data;
    /* Count the peers now, not at the last poll: instances started together on one shared
     * store may have registered since, and an order that does not wait for them is validated
     * against a peer that has not yet seen the token. */
    moat_acmeshare_refresh(m->share);
    /* On a shared database a peer starting right now is not counted yet, but may be the one
     * the CA's validator reaches: always give the token time to get there. */
    return moat_acmeshare_peers(m->share) > 0 || m->st->shared ? MOAT_ACMESHARE_PROPAGATION_MS : 0;
}

static void on_share_timer(uv_timer_t *t)
{
    moat_acmeshare_refresh(t->data);
}

static void share_timer_closed(uv_handle_t *h)
{
    free(h);
}

static int io_request(void *data, const char *method, const char *url, const char *ctype,
                      const char *body, moat_httpc_cb cb, void *cb_data)
{
    moat_acmemgr_t *m = data;
    if (m->request)
        return m->request(m->request_data, method, url, ctype, body, cb, cb_data);
    return moat_httpc_request(m->http, method, url, ctype, body, body ? strlen(body) : 0, cb,
                              cb_data);
}

/* --- storage helpers ----------------------------------------------------------------------- */

static int kv_get_i64(moat_storage_t *st, const char *key, int64_t *a, int64_t *b)
{
    char *v = NULL;
    if (st->ops->kv_get(st, key, &v) != 0)
        return -1;
    long long x = 0, y = 0;
    int n = sscanf(v, "%lld %lld", &x, &y);
    free(v);
    *a = x;
    *b = y;
    return n == 2 ? 0 : -1;
}

static void kv_key(char *out, size_t cap, const char *prefix, const char *id)
{
    snprintf(out, cap, "%s:%s", prefix, id);
}

static void fmt_time(int64_t t, char *out, size_t cap)
{
    time_t tt = (time_t)t;
    struct tm tm;
    gmtime_r(&tt, &tm);
    strftime(out, cap, "%Y-%m-%d %H:%M:%S UTC", &tm);
}

/* --- jobs ---------------------------------------------------------------------------------- */

static void job_check(job_t *j);

static void on_job_timer(uv_timer_t *t)
{
    job_t *j = t->data;
    if (j->order != NULL) {
        /* Heartbeat while the order runs: keep the lock from looking stale. */
        moat_acmeshare_lock_take(j->m->share, j->id);
        uv_timer_start(&j->timer, on_job_timer, moat_acmeshare_heartbeat_ms(j->m->share), 0);
        return;
    }
    job_check(j);
}

static void job_at(job_t *j, int64_t when)
{
    int64_t now = (int64_t)time(NULL);
    int64_t d = when > now ? when - now : 0;
    if (d > 86400)
        d = 86400; /* look again at least daily (the clock may jump) */
    uv_timer_start(&j->timer, on_job_timer, (uint64_t)d * 1000, 0);
}

static const char *chal_name(moat_acme_chal_t c)
{
    return moat_acme_chal_name(c);
}

static EVP_PKEY *account_key(moat_acmemgr_t *m, const char *ca, const char *email)
{
    char key[1024], *pem = NULL;
    snprintf(key, sizeof key, "acme-account-key:%s|%s", ca, email ? email : "");
    EVP_PKEY *k = NULL;
    if (m->st->ops->kv_get(m->st, key, &pem) == 0) {
        k = moat_acme_key_from_pem(pem);
        free(pem);
        if (k)
            return k;
        MOAT_WARN("acme: the stored account key for %s cannot be read; making a new one", ca);
    }
    k = moat_acme_key_new();
    pem = k ? moat_acme_key_pem(k) : NULL;
    if (pem == NULL || m->st->ops->kv_put(m->st, key, pem) != 0) {
        MOAT_ERROR("acme: cannot store a new account key: %s", moat_storage_last_error(m->st));
        EVP_PKEY_free(k);
        k = NULL;
    }
    moat_secret_free(pem);
    return k;
}

static void on_order_done(void *data, moat_acme_result_t *res);
static void on_ari_done(void *data, moat_acme_ari_result_t *res);

static moat_acme_io_t job_io(moat_acmemgr_t *m)
{
    return (moat_acme_io_t){.data = m,
                            .request = io_request,
                            .after = io_after,
                            .challenge = io_challenge,
                            .dns01_publish = io_dns01_publish,
                            .propagation_ms = io_propagation_ms};
}

/* When to renew rec: inside the CA's ARI window when it gave one for this very certificate,
 * else when a third of its life is left. */
static int64_t job_renew_at(job_t *j, const moat_cert_record_t *rec)
{
    if (j->ari_supported && j->ari_start > 0)
        return moat_acme_renew_at(rec->not_before, rec->not_after, j->ari_start, j->ari_end,
                                  moat_acme_ari_jitter(j->ari_cert_id));
    return moat_acme_renew_at(rec->not_before, rec->not_after, 0, 0, 0);
}

/* Keep the ARI state about the stored certificate; a new certificate starts it afresh.
 * Returns 1 when a renewalInfo fetch was started (job_check runs again when it ends). */
/* ARI windows are shared through the store (kv "acme-ari:<id>" = "<cert id> <CA index>
 * <supported> <start> <end> <next fetch>"), so instances sharing it ask the CA once per poll
 * between them instead of once each. */
static void ari_store(job_t *j)
{
    char key[600], val[700];
    kv_key(key, sizeof key, "acme-ari", j->id);
    snprintf(val, sizeof val, "%.500s %zu %d %lld %lld %lld", j->ari_cert_id, j->ari_ca,
             j->ari_supported, (long long)j->ari_start, (long long)j->ari_end,
             (long long)j->ari_next);
    if (j->m->st->ops->kv_put(j->m->st, key, val) != 0)
        MOAT_DEBUG("acme: %s: cannot share the renewal window: %s", j->id + 5,
                   moat_storage_last_error(j->m->st));
}

/* Adopt a window another instance fetched for this certificate from this CA, if it is not due
 * for a new look yet: 1 adopted (no fetch needed), 0 not. */
static int ari_adopt(job_t *j, int64_t now)
{
    char key[600], *v = NULL, cid[512];
    kv_key(key, sizeof key, "acme-ari", j->id);
    if (j->m->st->ops->kv_get(j->m->st, key, &v) != 0)
        return 0;
    size_t ca = 0;
    int supported = 0;
    long long start = 0, end = 0, next = 0;
    int ok =
        sscanf(v, "%511s %zu %d %lld %lld %lld", cid, &ca, &supported, &start, &end, &next) == 6 &&
        strcmp(cid, j->ari_cert_id) == 0 && ca == j->ca_i % j->ncas && next > now;
    free(v);
    if (!ok)
        return 0;
    if (supported && (start != j->ari_start || end != j->ari_end))
        MOAT_DEBUG("acme: %s: using the renewal window another instance fetched", j->id + 5);
    j->ari_ca = ca;
    j->ari_supported = supported;
    j->ari_start = start;
    j->ari_end = end;
    j->ari_next = next;
    return 1;
}

static int job_ari(job_t *j, const moat_cert_record_t *rec, int64_t now)
{
    char *cid = moat_acme_ari_cert_id_pem(rec->cert_pem);
    if (cid == NULL || j->ari_cert_id == NULL || strcmp(cid, j->ari_cert_id) != 0) {
        free(j->ari_cert_id);
        j->ari_cert_id = cid;
        j->ari_supported = 0;
        j->ari_start = j->ari_end = j->ari_next = 0;
    } else {
        free(cid);
    }
    if (j->ari_cert_id == NULL || j->force || now < j->ari_next || j->ari_fetch != NULL)
        return 0;
    if (ari_adopt(j, now))
        return 0;
    moat_acme_io_t io = job_io(j->m);
    j->ari_ca = j->ca_i % j->ncas;
    j->ari_fetch = moat_acme_ari_fetch(&io, j->cas[j->ari_ca], j->ari_cert_id, on_ari_done, j);
    return 1;
}

/* The CA accepted the order (or a resumed one goes on): remember it across a restart. */
static void on_order_placed(void *data, const char *order_url)
{
    job_t *j = data;
    char key[600], *val = NULL;
    kv_key(key, sizeof key, "acme-order", j->id);
    if (asprintf(&val, "%s %s", j->cas[j->ca_i % j->ncas], order_url) < 0)
        return;
    if (j->m->st->ops->kv_put(j->m->st, key, val) != 0)
        MOAT_WARN("acme: %s: cannot note the order under way (%s); after a restart a new order "
                  "would be placed",
                  j->id + 5, moat_storage_last_error(j->m->st));
    free(val);
}

/* The URL of the order an earlier process left under way for this job on CA ca, or NULL. */
static char *unfinished_order(job_t *j, const char *ca)
{
    char key[600], *val = NULL, *url = NULL;
    kv_key(key, sizeof key, "acme-order", j->id);
    if (j->m->st->ops->kv_get(j->m->st, key, &val) != 0)
        return NULL;
    size_t n = strlen(ca);
    if (strncmp(val, ca, n) == 0 && val[n] == ' ' && val[n + 1] != '\0')
        url = moat_xstrdup(val + n + 1);
    free(val);
    return url;
}

static void job_start_order(job_t *j)
{
    moat_acmemgr_t *m = j->m;
    if (j->dns != MOAT_DNS_NONE)
        moat_dns01_cleanup(m->dns, owner_gone, m);
    const char *ca = j->cas[j->ca_i % j->ncas];
    EVP_PKEY *k = account_key(m, ca, j->email);
    if (k == NULL) {
        job_at(j, (int64_t)time(NULL) + MOAT_ACME_BACKOFF_MIN);
        return;
    }
    moat_acme_io_t io = job_io(m);
    /* "replaces" only towards the CA whose renewalInfo knows the certificate. */
    int replaces =
        j->renewal && j->ari_supported && j->ari_cert_id && j->ari_ca == j->ca_i % j->ncas;
    moat_acme_order_opts_t o = {
        .directory_url = ca,
        .names = (const char *const *)j->names,
        .nnames = j->nnames,
        .account_key = k,
        .email = j->email,
        .eab_kid = j->eab_kid,
        .eab_hmac = j->eab_hmac,
        .preferred_chain = j->preferred,
        .challenge = j->chal,
        .replaces = replaces ? j->ari_cert_id : NULL,
        .placed = on_order_placed,
    };
    char *resume = unfinished_order(j, ca);
    o.resume_url = resume;
    MOAT_INFO("acme: %s a certificate for %s from %s (%s)", j->renewal ? "renewing" : "requesting",
              j->id + 5, ca, chal_name(j->chal));
    j->t_start = uv_now(m->loop);
    uv_update_time(m->loop);
    j->t_start = uv_now(m->loop);
    m->orders++;
    j->in_backoff = 0;
    j->order = moat_acme_order_start(&io, &o, on_order_done, j);
    free(resume);
    EVP_PKEY_free(k);
    uv_timer_start(&j->timer, on_job_timer, moat_acmeshare_heartbeat_ms(m->share), 0);
}

static void job_check(job_t *j)
{
    moat_acmemgr_t *m = j->m;
    moat_storage_t *st = m->st;
    if (j->order != NULL || j->ari_fetch != NULL)
        return;
    int64_t now = (int64_t)time(NULL);
    moat_cert_record_t rec;
    int grc = st->ops->get_cert(st, j->id, &rec);
    if (grc != 0 && grc != MOAT_ENOT_FOUND) {
        /* The store does not answer (a shared database away, a damaged file): what is served
         * stays; no order is placed that could not be stored. Storage logs the outage once. */
        MOAT_DEBUG("acme: %s: cannot read the store (%s); looking again in %d s", j->id + 5,
                   moat_storage_last_error(st), STORE_RETRY_MS / 1000);
        uv_timer_start(&j->timer, on_job_timer, STORE_RETRY_MS, 0);
        return;
    }
    int have = grc == 0;
    int64_t renew = 0;
    j->renewal = have;
    if (have && job_ari(j, &rec, now)) {
        moat_cert_record_clear(&rec);
        return;
    }
    if (have) {
        renew = job_renew_at(j, &rec);
        if (rec.not_after != j->known_not_after) {
            /* Another process sharing the store got a new certificate: serve it. */
            j->known_not_after = rec.not_after;
            if (m->republish)
                m->republish(m->republish_data);
        }
        moat_cert_record_clear(&rec);
        if (now < renew && !j->force) {
            job_at(j, j->ari_next > 0 && j->ari_next < renew ? j->ari_next : renew);
            return;
        }
    }
    char key[600];
    int64_t failures = 0, next = 0;
    kv_key(key, sizeof key, "acme-backoff", j->id);
    if (!j->force && kv_get_i64(st, key, &failures, &next) == 0 && next > now) {
        char when[64];
        fmt_time(next, when, sizeof when);
        MOAT_INFO("acme: %s: waiting after %lld failure(s); next attempt at %s", j->id + 5,
                  (long long)failures, when);
        job_at(j, next);
        return;
    }
    int lr = moat_acmeshare_lock_take(m->share, j->id);
    if (lr <= 0) {
        if (lr == 0)
            MOAT_INFO("acme: %s: another moat process is issuing it; looking again shortly",
                      j->id + 5);
        else
            MOAT_ERROR("acme: %s: cannot take the issuing lock: %s", j->id + 5,
                       moat_storage_last_error(st));
        uv_timer_start(&j->timer, on_job_timer, LOCK_RETRY_MS, 0);
        return;
    }
    /* Between our look and the lock another process may have finished: look again. */
    if (st->ops->get_cert(st, j->id, &rec) == 0) {
        int fresh = now < job_renew_at(j, &rec);
        int64_t na = rec.not_after;
        moat_cert_record_clear(&rec);
        if (fresh && !j->force) {
            moat_acmeshare_lock_release(m->share, j->id);
            if (na != j->known_not_after) {
                j->known_not_after = na;
                if (m->republish)
                    m->republish(m->republish_data);
            }
            job_check(j);
            return;
        }
    }
    j->force = 0;
    j->fallback_tried = 0;
    char *pref = NULL;
    kv_key(key, sizeof key, "acme-challenge", j->id);
    if (st->ops->kv_get(st, key, &pref) == 0) {
        j->chal = strcmp(pref, "tls-alpn-01") == 0 ? MOAT_ACME_TLSALPN01 : MOAT_ACME_HTTP01;
        free(pref);
    }
    if (j->dns != MOAT_DNS_NONE)
        j->chal = MOAT_ACME_DNS01;
    job_start_order(j);
}

static void on_ari_done(void *data, moat_acme_ari_result_t *res)
{
    job_t *j = data;
    j->ari_fetch = NULL;
    int64_t now = (int64_t)time(NULL);
    if (res->rc == 0 && res->supported) {
        if (res->ari.start != j->ari_start || res->ari.end != j->ari_end) {
            char a[64], b[64];
            fmt_time(res->ari.start, a, sizeof a);
            fmt_time(res->ari.end, b, sizeof b);
            MOAT_INFO("acme: %s: the CA suggests renewing between %s and %s%s%s", j->id + 5, a, b,
                      res->ari.explanation_url ? "; why: " : "",
                      res->ari.explanation_url ? res->ari.explanation_url : "");
        }
        j->ari_supported = 1;
        j->ari_start = res->ari.start;
        j->ari_end = res->ari.end;
        j->ari_next = now + moat_acme_ari_poll_delay(res->retry_after);
        ari_store(j);
    } else if (res->rc == 0) {
        /* No renewalInfo in the directory: the default schedule; look again in 6 h in case
         * the CA starts offering it. */
        j->ari_supported = 0;
        j->ari_next = now + MOAT_ACME_ARI_POLL_DEFAULT;
        ari_store(j);
    } else {
        /* Keep any window we had; renewal never waits on ARI. */
        MOAT_WARN("acme: %s: renewal information unavailable (%s); using %s", j->id + 5,
                  res->error ? res->error : moat_strerror(res->rc),
                  j->ari_supported ? "the last suggested window" : "the default schedule");
        j->ari_next = now + moat_acme_ari_poll_delay(res->retry_after > 0 ? res->retry_after
                                                                          : ARI_RETRY_DEFAULT);
    }
    job_check(j);
}

static int parse_leaf(const char *pem, int64_t *nb, int64_t *na, char *issuer, size_t cap)
{
    BIO *bio = BIO_new_mem_buf(pem, -1);
    X509 *x = bio ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;
    BIO_free(bio);
    ERR_clear_error();
    if (x == NULL)
        return MOAT_EPARSE;
    int days, secs;
    ASN1_TIME *epoch = ASN1_TIME_set(NULL, 0);
    *nb = ASN1_TIME_diff(&days, &secs, epoch, X509_get0_notBefore(x)) ? (int64_t)days * 86400 + secs
                                                                      : 0;
    *na = ASN1_TIME_diff(&days, &secs, epoch, X509_get0_notAfter(x)) ? (int64_t)days * 86400 + secs
                                                                     : 0;
    ASN1_TIME_free(epoch);
    issuer[0] = '\0';
    X509_NAME_get_text_by_NID(X509_get_issuer_name(x), NID_commonName, issuer, (int)cap);
    X509_free(x);
    return 0;
}

static int store_cert(job_t *j, moat_acme_result_t *res)
{
    moat_acmemgr_t *m = j->m;
    moat_storage_t *st = m->st;
    int64_t nb, na;
    char issuer[256];
    if (parse_leaf(res->chain_pem, &nb, &na, issuer, sizeof issuer) != 0) {
        MOAT_ERROR("acme: %s: the CA's certificate cannot be parsed", j->id + 5);
        return MOAT_EPARSE;
    }
    moat_cert_record_t rec = {
        .id = j->id,
        .names = j->id + 5,
        .issuer = issuer,
        .source = (char *)"acme",
        .not_before = nb,
        .not_after = na,
        .cert_pem = res->chain_pem,
        .key_pem = res->key_pem,
    };
    char key[600], detail[512];
    snprintf(detail, sizeof detail, "%s via %s", issuer, chal_name(res->challenge));
    /* Fenced: written only while this process's issuing lock still holds, and never over a
     * newer certificate (MOAT_EPERM / MOAT_EEXISTS: another process's write stands). */
    int rc = st->ops->begin(st);
    if (rc == 0)
        rc = st->ops->put_cert_fenced(st, &rec, j->id, moat_acmeshare_lock_token(m->share, j->id));
    if (rc == 0)
        rc = st->ops->add_event(st, j->renewal ? "renewed" : "issued", j->id + 5, detail);
    kv_key(key, sizeof key, "acme-backoff", j->id);
    if (rc == 0)
        rc = st->ops->kv_put(st, key, NULL);
    kv_key(key, sizeof key, "acme-error", j->id);
    if (rc == 0)
        rc = st->ops->kv_put(st, key, NULL);
    kv_key(key, sizeof key, "acme-challenge", j->id);
    if (rc == 0)
        rc = st->ops->kv_put(st, key, chal_name(res->challenge));
    kv_key(key, sizeof key, "acme-order", j->id);
    if (rc == 0)
        rc = st->ops->kv_put(st, key, NULL);
    if (rc == 0)
        rc = st->ops->commit(st);
    if (rc != 0) {
        char why[sizeof st->last_error];
        snprintf(why, sizeof why, "%s", moat_storage_last_error(st));
        st->ops->rollback(st);
        if (rc == MOAT_EPERM || rc == MOAT_EEXISTS)
            MOAT_WARN("acme: %s: the certificate just issued is not stored: %s", j->id + 5, why);
        else
            MOAT_ERROR("acme: %s: cannot store the certificate: %s", j->id + 5, why);
        return rc;
    }
    char until[64];
    fmt_time(na, until, sizeof until);
    uv_update_time(m->loop);
    MOAT_INFO("acme: %s a certificate for %s from \"%s\" via %s in %.3f s, valid until %s",
              j->renewal ? "renewed" : "issued", j->id + 5, issuer, chal_name(res->challenge),
              (double)(uv_now(m->loop) - j->t_start) / 1000.0, until);
    j->known_not_after = na;
    return 0;
}

static void on_order_done(void *data, moat_acme_result_t *res)
{
    job_t *j = data;
    moat_acmemgr_t *m = j->m;
    j->order = NULL;
    int stored = res->rc == 0 ? store_cert(j, res) : -1;
    if (stored != 0) { /* the order is over either way; the next attempt places a new one */
        char key[600];
        kv_key(key, sizeof key, "acme-order", j->id);
        m->st->ops->kv_put(m->st, key, NULL);
    }
    if (res->rc == 0 && (stored == 0 || stored == MOAT_EPERM || stored == MOAT_EEXISTS)) {
        /* Stored, or another process's certificate stands (fenced out): either way serve
         * what the store holds now. Not a failure of the CA: no backoff. */
        moat_acmeshare_lock_release(m->share, j->id);
        if (m->republish)
            m->republish(m->republish_data);
        job_check(j);
        return;
    }
    if (res->rc != 0 && res->challenge_failed && !j->fallback_tried && j->chal != MOAT_ACME_DNS01) {
        /* The other challenge may work where this one cannot (port 80 blocked, a TLS
         * terminator in front): try it at once rather than after a backoff. */
        j->fallback_tried = 1;
        MOAT_WARN("acme: %s: %s; trying %s instead", j->id + 5, res->error, chal_name(!j->chal));
        j->chal = (moat_acme_chal_t)!j->chal;
        job_start_order(j);
        return;
    }
    char key[600], val[64];
    int64_t failures = 0, next = 0, now = (int64_t)time(NULL);
    m->failures++;
    j->in_backoff = 1;
    kv_key(key, sizeof key, "acme-backoff", j->id);
    kv_get_i64(m->st, key, &failures, &next);
    failures++;
    int64_t delay = moat_acme_backoff((int)failures, res->retry_after, res->rate_limited);
    next = now + delay;
    snprintf(val, sizeof val, "%lld %lld", (long long)failures, (long long)next);
    m->st->ops->kv_put(m->st, key, val);
    const char *why = res->error ? res->error : moat_strerror(res->rc);
    kv_key(key, sizeof key, "acme-error", j->id);
    m->st->ops->kv_put(m->st, key, why);
    m->st->ops->add_event(m->st, "acme-failed", j->id + 5, why);
    moat_acmeshare_lock_release(m->share, j->id);
    char when[64];
    fmt_time(next, when, sizeof when);
    MOAT_ERROR("acme: %s: %s; attempt %lld failed, next attempt in %lld s at %s%s", j->id + 5, why,
               (long long)failures, (long long)delay, when, j->ncas > 1 ? " with the next CA" : "");
    j->ca_i++;
    job_at(j, next);
}

static char *dup_or_null(const char *s)
{
    return s && *s ? moat_xstrdup(s) : NULL;
}

static void job_clear_settings(job_t *j)
{
    free(j->email);
    free(j->preferred);
    free(j->eab_kid);
    moat_secret_free(j->eab_hmac);
    for (size_t i = 0; i < j->ncas; i++)
        free(j->cas[i]);
    free(j->cas);
    j->email = j->preferred = j->eab_kid = j->eab_hmac = NULL;
    free(j->dns_server);
    free(j->dns_tsig);
    free(j->dns_token_file);
    free(j->dns_resolver);
    free(j->dns_api);
    j->dns_server = j->dns_tsig = j->dns_token_file = j->dns_resolver = j->dns_api = NULL;
    j->cas = NULL;
    j->ncas = 0;
}

static int same_cas(const job_t *j, const moat_site_t *s, const char *default_ca)
{
    size_t n = s->ncas ? s->ncas : 1;
    if (n != j->ncas)
        return 0;
    for (size_t k = 0; k < n; k++)
        if (strcmp(j->cas[k], s->ncas ? s->cas[k] : default_ca) != 0)
            return 0;
    return 1;
}

/* Take the site's ACME settings (contact, CAs, chain preference, EAB): every order the job
 * places from now on uses them; an order in flight finishes with the ones it started with. */
static void job_take_settings(job_t *j, const moat_site_t *s)
{
    moat_acmemgr_t *m = j->m;
    int cas_changed = !same_cas(j, s, m->ca_url);
    job_clear_settings(j);
    j->email = dup_or_null(s->email ? s->email : m->email);
    j->preferred = dup_or_null(s->preferred_chain);
    j->eab_kid = dup_or_null(s->eab_kid);
    j->eab_hmac = dup_or_null(s->eab_hmac);
    j->dns = s->dns;
    j->dns_server = dup_or_null(s->dns_server);
    j->dns_tsig = dup_or_null(s->dns_tsig);
    j->dns_token_file = dup_or_null(s->dns_token_file);
    j->dns_resolver = dup_or_null(s->dns_resolver);
    j->dns_api = dup_or_null(s->dns_api);
    j->dns_wait_ms = s->dns_wait_ms;
    if (j->dns != MOAT_DNS_NONE)
        j->chal = MOAT_ACME_DNS01;
    else if (j->chal == MOAT_ACME_DNS01)
        j->chal = MOAT_ACME_HTTP01;
    j->ncas = s->ncas ? s->ncas : 1;
    j->cas = moat_xcalloc(j->ncas, sizeof *j->cas);
    for (size_t k = 0; k < j->ncas; k++)
        j->cas[k] = moat_xstrdup(s->ncas ? s->cas[k] : m->ca_url);
    if (!cas_changed)
        return;
    /* Another CA list: start from its first CA, and forget renewal information that came
     * from a CA that may no longer be in it (the next check asks the new one). */
    j->ca_i = 0;
    j->ari_supported = 0;
    j->ari_start = j->ari_end = j->ari_next = 0;
    if (j->ari_fetch != NULL) {
        /* Its answer would be about the old CA, and job_check waits for it: look again now. */
        moat_acme_ari_fetch_cancel(j->ari_fetch);
        j->ari_fetch = NULL;
        if (j->order == NULL)
            uv_timer_start(&j->timer, on_job_timer, 0, 0);
    }
}

static void job_closed(uv_handle_t *h)
{
    job_t *j = h->data;
    for (size_t i = 0; i < j->nnames; i++)
        free(j->names[i]);
    free(j->names);
    job_clear_settings(j);
    free(j->id);
    free(j->ari_cert_id);
    free(j);
}

static void job_free(job_t *j)
{
    moat_acme_ari_fetch_cancel(j->ari_fetch);
    j->ari_fetch = NULL;
    if (j->order) {
        moat_acme_order_cancel(j->order);
        j->order = NULL;
        moat_acmeshare_lock_release(j->m->share, j->id);
    }
    uv_close((uv_handle_t *)&j->timer, job_closed);
}

void moat_acmemgr_update(moat_acmemgr_t *m, const moat_config_t *cfg)
{
    for (job_t *j = m->jobs; j; j = j->next)
        j->seen = 0;
    for (size_t i = 0; i < cfg->nsites; i++) {
        const moat_site_t *s = &cfg->sites[i];
        const char **names;
        size_t n = moat_certs_site_acme_names(s, &names);
        if (n == 0) {
            free(names);
            continue;
        }
        char *id = moat_certs_acme_id(names, n);
        job_t *j;
        for (j = m->jobs; j && strcmp(j->id, id) != 0; j = j->next)
            ;
        if (j != NULL) {
            /* Same names: keep the job (and any order in flight); take new settings. Two
             * lines with the same names (other ports) share one job: the first one's. */
            if (!j->seen)
                job_take_settings(j, s);
            j->seen = 1;
            free(id);
            free(names);
            continue;
        }
        j = moat_xcalloc(1, sizeof *j);
        j->m = m;
        j->id = id;
        j->seen = 1;
        j->names = moat_xcalloc(n, sizeof *j->names);
        for (size_t k = 0; k < n; k++)
            j->names[k] = moat_xstrdup(names[k]);
        j->nnames = n;
        free(names);
        job_take_settings(j, s);
        /* known_not_after stays 0: the first check republishes when a certificate is stored,
         * in case another process stored it after our snapshot was built. */
        uv_timer_init(m->loop, &j->timer);
        j->timer.data = j;
        j->next = m->jobs;
        m->jobs = j;
        /* Start from the loop, after the listeners are up, so validation can reach us. */
        uv_timer_start(&j->timer, on_job_timer, 0, 0);
    }
    for (job_t **pp = &m->jobs; *pp;) {
        job_t *j = *pp;
        if (!j->seen) {
            *pp = j->next;
            MOAT_INFO("acme: %s is no longer in the site file", j->id + 5);
            job_free(j);
        } else {
            pp = &j->next;
        }
    }
}

void moat_acmemgr_stats(const moat_acmemgr_t *m, uint64_t *orders, uint64_t *failures,
                        unsigned *backoff)
{
    *orders = m ? m->orders : 0;
    *failures = m ? m->failures : 0;
    *backoff = 0;
    for (const job_t *j = m ? m->jobs : NULL; j != NULL; j = j->next)
        *backoff += j->in_backoff != 0;
}

void moat_acmemgr_renew(moat_acmemgr_t *m, const char *name, int force)
{
    int any = 0;
    for (job_t *j = m->jobs; j; j = j->next) {
        int match = name == NULL;
        for (size_t k = 0; !match && k < j->nnames; k++)
            match = strcasecmp(j->names[k], name) == 0;
        if (!match)
            continue;
        any = 1;
        if (j->order) {
            MOAT_INFO("acme: %s: an order is already in progress", j->id + 5);
            continue;
        }
        MOAT_INFO("acme: %s: renewal asked for%s", j->id + 5, force ? " (forced)" : "");
        j->force = force;
        uv_timer_start(&j->timer, on_job_timer, 0, 0);
    }
    if (!any)
        MOAT_WARN("acme: renew: no ACME certificate covers %s", name ? name : "any name");
}

void moat_acmemgr_renew_request(moat_acmemgr_t *m, const char *data_dir)
{
    char path[4096], name[300] = "", mode[32] = "";
    snprintf(path, sizeof path, "%s/%s", data_dir, MOAT_ACME_RENEW_REQUEST);
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        MOAT_WARN("renew: %s: %s", path, strerror(errno));
        return;
    }
    int ok = fscanf(f, "%299s %31s", name, mode) == 2;
    fclose(f);
    unlink(path);
    if (!ok) {
        MOAT_WARN("renew: %s is malformed", path);
        return;
    }
    moat_acmemgr_renew(m, strcmp(name, "*") == 0 ? NULL : name, strcmp(mode, "force") == 0);
}

moat_acmemgr_t *moat_acmemgr_new(uv_loop_t *loop, moat_storage_t *st, const moat_acmemgr_opts_t *o,
                                 void (*republish)(void *), void *data, char *err, size_t errlen)
{
    const char *ca = o->ca_url    ? o->ca_url
                     : o->staging ? MOAT_ACME_LE_STAGING
                                  : MOAT_ACME_LE_PRODUCTION;
    moat_httpc_t *h = NULL;
    if (o->request == NULL &&
        (h = moat_httpc_new(loop, o->ca_root, HTTP_TIMEOUT_MS, err, errlen)) == NULL)
        return NULL;
    moat_acmemgr_t *m = moat_xcalloc(1, sizeof *m);
    m->loop = loop;
    m->st = st;
    m->http = h;
    m->request = o->request;
    m->request_data = o->request_data;
    m->email = dup_or_null(o->email);
    m->ca_url = moat_xstrdup(ca);
    m->republish = republish;
    m->republish_data = data;
    m->share = moat_acmeshare_new(st);
    m->share_timer = moat_xcalloc(1, sizeof *m->share_timer);
    uv_timer_init(loop, m->share_timer);
    m->share_timer->data = m->share;
    uv_timer_start(m->share_timer, on_share_timer, MOAT_ACMESHARE_POLL_MS, MOAT_ACMESHARE_POLL_MS);
    m->dns = moat_dns01_new(loop, st, moat_acmeshare_owner(m->share));
    /* DNS-01 records a stopped process left (killed mid-order): delete them now. Records of
     * live processes sharing the store are theirs; job_start_order looks again. */
    moat_dns01_cleanup(m->dns, owner_gone, m);
    return m;
}

void moat_acmemgr_free(moat_acmemgr_t *m)
{
    if (m == NULL)
        return;
    while (m->jobs) {
        job_t *j = m->jobs;
        m->jobs = j->next;
        job_free(j);
    }
    /* Cancelled orders free themselves once their pending timers and requests report back:
     * fire the timers now and let the HTTP client abort its requests. */
    while (m->afters) {
        struct after *a = m->afters;
        uv_timer_stop(&a->t);
        after_unlink(a);
        uv_close((uv_handle_t *)&a->t, after_closed);
        a->cb(a->arg);
    }
    moat_dns01_free(m->dns);
    if (m->http)
        moat_httpc_free(m->http);
    uv_close((uv_handle_t *)m->share_timer, share_timer_closed);
    moat_acmeshare_free(m->share);
    free(m->email);
    free(m->ca_url);
    free(m);
}
