/* Unit tests for the ACME manager (server/acmemgr.c) on a real uv loop with a real SQLite
 * store in a temporary folder. The CA is scripted behind the manager's request hook (no
 * network): it answers the directory, newNonce and newAccount, and refuses every newOrder,
 * which is enough to see which CA an order went to and what account it asked for. */
#include "acmemgr.h"
#include "moat/ca.h"
#include "moat/config.h"
#include "moat/log.h"
#include "moat/storage.h"
#include "test.h"

#include <jansson.h>
#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <uv.h>

#define SITE_ID "acme:a.example.com"

typedef struct {
    char method[8], url[128];
    char *payload; /* the JWS payload, decoded; NULL for GET/HEAD */
} sent_t;

typedef struct {
    uv_loop_t *loop;
    sent_t sent[64];
    size_t nsent;
    int nonces;
} fake_ca_t;

typedef struct {
    uv_timer_t t;
    moat_httpc_cb cb;
    void *cb_data;
    int status;
    char body[512], ctype[48], loc[128], nonce[32];
} reply_t;

static char *b64url_text(const char *in)
{
    if (in == NULL)
        return NULL;
    size_t n = strlen(in);
    char *out = malloc(n * 3 / 4 + 4);
    long len = moat_b64url_decode(in, n, (uint8_t *)out);
    out[len < 0 ? 0 : len] = '\0';
    return out;
}

static void reply_closed(uv_handle_t *h)
{
    free(h->data);
}

static void reply_fire(uv_timer_t *t)
{
    reply_t *r = t->data;
    moat_httpc_response_t resp = {.status = r->status, .body = r->body};
    resp.body_len = strlen(r->body);
    resp.names[resp.nheaders] = (char *)"Replay-Nonce";
    resp.values[resp.nheaders++] = r->nonce;
    if (r->ctype[0]) {
        resp.names[resp.nheaders] = (char *)"Content-Type";
        resp.values[resp.nheaders++] = r->ctype;
    }
    if (r->loc[0]) {
        resp.names[resp.nheaders] = (char *)"Location";
        resp.values[resp.nheaders++] = r->loc;
    }
    r->cb(r->cb_data, &resp);
    uv_close((uv_handle_t *)&r->t, reply_closed);
}

static int ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* Any CA at https://<host>/dir, answered from the loop (never inside the call). */
static int fake_request(void *data, const char *method, const char *url, const char *ctype,
                        const char *body, moat_httpc_cb cb, void *cb_data)
{
    (void)ctype;
    fake_ca_t *ca = data;
    if (ca->nsent < MOAT_ARRAY_LEN(ca->sent)) {
        sent_t *s = &ca->sent[ca->nsent++];
        snprintf(s->method, sizeof s->method, "%s", method);
        snprintf(s->url, sizeof s->url, "%s", url);
        json_t *jws = body ? json_loads(body, 0, NULL) : NULL;
        s->payload = jws ? b64url_text(json_string_value(json_object_get(jws, "payload"))) : NULL;
        json_decref(jws);
    }
    reply_t *r = calloc(1, sizeof *r);
    r->cb = cb;
    r->cb_data = cb_data;
    snprintf(r->nonce, sizeof r->nonce, "nonce-%d", ++ca->nonces);
    const char *slash = strrchr(url, '/');
    int base = (int)(slash - url);
    if (ends_with(url, "/dir")) {
        r->status = 200;
        snprintf(r->ctype, sizeof r->ctype, "application/json");
        snprintf(r->body, sizeof r->body,
                 "{\"newNonce\":\"%.*s/nonce\",\"newAccount\":\"%.*s/new-acct\","
                 "\"newOrder\":\"%.*s/new-order\",\"renewalInfo\":\"%.*s/renewal-info\"}",
                 base, url, base, url, base, url, base, url);
    } else if (strstr(url, "/renewal-info/") != NULL) {
        r->status = 200;
        snprintf(r->ctype, sizeof r->ctype, "application/json");
        snprintf(r->body, sizeof r->body,
                 "{\"suggestedWindow\":{\"start\":\"2030-01-01T00:00:00Z\","
                 "\"end\":\"2030-01-02T00:00:00Z\"}}");
    } else if (ends_with(url, "/nonce")) {
        r->status = 200;
    } else if (ends_with(url, "/new-acct")) {
        r->status = 201;
        snprintf(r->ctype, sizeof r->ctype, "application/json");
        snprintf(r->body, sizeof r->body, "{\"status\":\"valid\"}");
        snprintf(r->loc, sizeof r->loc, "%.*s/acct/1", base, url);
    } else if (ends_with(url, "/new-order")) {
        r->status = 403;
        snprintf(r->ctype, sizeof r->ctype, "application/problem+json");
        snprintf(r->body, sizeof r->body,
                 "{\"type\":\"urn:ietf:params:acme:error:unauthorized\",\"detail\":\"scripted\"}");
    } else {
        r->status = 404;
    }
    uv_timer_init(ca->loop, &r->t);
    r->t.data = r;
    uv_timer_start(&r->t, reply_fire, 0, 0);
    return 0;
}

static void fake_clear(fake_ca_t *ca)
{
    for (size_t i = 0; i < ca->nsent; i++)
        free(ca->sent[i].payload);
    ca->nsent = 0;
}

/* The request of the n-th order (1-based) to a URL ending in suffix, or NULL. An order starts
 * with its directory GET. */
static const sent_t *order_request(const fake_ca_t *ca, int n, const char *suffix)
{
    int order = 0;
    for (size_t i = 0; i < ca->nsent; i++) {
        if (ends_with(ca->sent[i].url, "/dir"))
            order++;
        if (order == n && ends_with(ca->sent[i].url, suffix))
            return &ca->sent[i];
    }
    return NULL;
}

static int has_kv(moat_storage_t *st, const char *key)
{
    char *v = NULL;
    int rc = st->ops->kv_get(st, key, &v);
    free(v);
    return rc == 0;
}

/* Run the loop until the job has recorded a failed order (its acme-error row), at most ms. */
static int run_until_failed(uv_loop_t *loop, moat_storage_t *st, uint64_t ms)
{
    uv_update_time(loop);
    uint64_t end = uv_now(loop) + ms;
    while (!has_kv(st, "acme-error:" SITE_ID)) {
        if (uv_now(loop) > end)
            return 0;
        uv_run(loop, UV_RUN_ONCE);
    }
    return 1;
}

static moat_config_t *parse(const char *text)
{
    moat_config_t *cfg = NULL;
    moat_config_errors_t errs = {0};
    if (moat_config_parse("Moatfile", text, strlen(text), &cfg, &errs) != 0)
        moat_config_errors_print(&errs, stderr);
    moat_config_errors_free(&errs);
    return cfg;
}

static int rm_cb(const char *p, const struct stat *sb, int type, struct FTW *ftw)
{
    (void)sb;
    (void)type;
    (void)ftw;
    return remove(p);
}

/* A reload that changes a site's email, CA list and external account binding: the job (same
 * names) is kept, and its next order uses the new settings. */
static void test_update_takes_new_settings(void)
{
    char dir[] = "/tmp/moat-acmemgr-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    moat_storage_t *st = NULL;
    char err[512] = "";
    CHECK_INT(moat_storage_open_sqlite(dir, &st, err, sizeof err), 0);
    uv_loop_t loop;
    uv_loop_init(&loop);
    fake_ca_t ca = {.loop = &loop};
    moat_acmemgr_opts_t o = {
        .email = "default@example.com", .request = fake_request, .request_data = &ca};
    moat_acmemgr_t *m = moat_acmemgr_new(&loop, st, &o, NULL, NULL, err, sizeof err);
    CHECK(m != NULL);

    moat_config_t *cfg1 = parse("a.example.com 127.0.0.1:8080 tls=acme email=old@example.com "
                                "ca=https://ca1.test/dir\n");
    moat_acmemgr_update(m, cfg1);
    moat_config_free(cfg1);
    CHECK(run_until_failed(&loop, st, 5000));
    const sent_t *acct = order_request(&ca, 1, "/new-acct");
    CHECK(acct != NULL);
    CHECK_STR(acct ? acct->url : NULL, "https://ca1.test/new-acct");
    CHECK(acct && strstr(acct->payload, "mailto:old@example.com") != NULL);
    CHECK(acct && strstr(acct->payload, "externalAccountBinding") == NULL);
    CHECK(order_request(&ca, 1, "/new-order") != NULL);
    CHECK(order_request(&ca, 2, "/dir") == NULL);

    moat_config_t *cfg2 =
        parse("a.example.com 127.0.0.1:8080 tls=acme email=new@example.com "
              "ca=https://ca2.test/dir eab_kid=kid-1 eab_hmac=c2VjcmV0LWhtYWMta2V5\n");
    moat_acmemgr_update(m, cfg2);
    moat_config_free(cfg2);
    st->ops->kv_put(st, "acme-error:" SITE_ID, NULL);
    /* The first order failed, so the job waits out its backoff: ask for the order now. */
    moat_acmemgr_renew(m, "a.example.com", 1);
    CHECK(run_until_failed(&loop, st, 5000));

    const sent_t *dir2 = order_request(&ca, 2, "/dir");
    CHECK_STR(dir2 ? dir2->url : NULL, "https://ca2.test/dir");
    acct = order_request(&ca, 2, "/new-acct");
    CHECK_STR(acct ? acct->url : NULL, "https://ca2.test/new-acct");
    CHECK(acct && strstr(acct->payload, "mailto:new@example.com") != NULL);
    CHECK(acct && strstr(acct->payload, "externalAccountBinding") != NULL);
    const sent_t *ord = order_request(&ca, 2, "/new-order");
    CHECK_STR(ord ? ord->url : NULL, "https://ca2.test/new-order");
    for (const sent_t *s = dir2; s && s < ca.sent + ca.nsent; s++)
        CHECK(strncmp(s->url, "https://ca2.test/", 17) == 0);
    /* The new CA and email have an account key of their own. */
    CHECK(has_kv(st, "acme-account-key:https://ca1.test/dir|old@example.com"));
    CHECK(has_kv(st, "acme-account-key:https://ca2.test/dir|new@example.com"));

    moat_acmemgr_free(m);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK_INT(uv_loop_close(&loop), 0);
    fake_clear(&ca);
    st->ops->close(st);
    nftw(dir, rm_cb, 8, FTW_DEPTH | FTW_PHYS);
}

/* A site without email= falls back to the manager's default; a reload that removes the site
 * cancels its job, and one that brings it back starts a new one. */
static void test_update_default_email_and_removal(void)
{
    char dir[] = "/tmp/moat-acmemgr-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    moat_storage_t *st = NULL;
    char err[512] = "";
    CHECK_INT(moat_storage_open_sqlite(dir, &st, err, sizeof err), 0);
    uv_loop_t loop;
    uv_loop_init(&loop);
    fake_ca_t ca = {.loop = &loop};
    moat_acmemgr_opts_t o = {.email = "default@example.com",
                             .ca_url = "https://ca3.test/dir",
                             .request = fake_request,
                             .request_data = &ca};
    moat_acmemgr_t *m = moat_acmemgr_new(&loop, st, &o, NULL, NULL, err, sizeof err);
    moat_config_t *with = parse("a.example.com 127.0.0.1:8080 tls=acme\n");
    moat_config_t *without = parse("b.internal 127.0.0.1:8080\n");
    moat_acmemgr_update(m, with);
    CHECK(run_until_failed(&loop, st, 5000));
    const sent_t *acct = order_request(&ca, 1, "/new-acct");
    CHECK_STR(acct ? acct->url : NULL, "https://ca3.test/new-acct");
    CHECK(acct && strstr(acct->payload, "mailto:default@example.com") != NULL);

    moat_acmemgr_update(m, without);
    st->ops->kv_put(st, "acme-error:" SITE_ID, NULL);
    moat_acmemgr_renew(m, NULL, 1); /* no job covers anything now */
    CHECK(!run_until_failed(&loop, st, 1500));
    CHECK(order_request(&ca, 2, "/dir") == NULL);

    moat_acmemgr_update(m, with);
    moat_acmemgr_renew(m, NULL, 1);
    CHECK(run_until_failed(&loop, st, 5000));
    CHECK(order_request(&ca, 2, "/new-order") != NULL);

    moat_config_free(with);
    moat_config_free(without);
    moat_acmemgr_free(m);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK_INT(uv_loop_close(&loop), 0);
    fake_clear(&ca);
    st->ops->close(st);
    nftw(dir, rm_cb, 8, FTW_DEPTH | FTW_PHYS);
}

static size_t count_sent(const fake_ca_t *ca, const char *part)
{
    size_t n = 0;
    for (size_t i = 0; i < ca->nsent; i++)
        n += strstr(ca->sent[i].url, part) != NULL;
    return n;
}

static void run_for(uv_loop_t *loop, uint64_t ms)
{
    uv_timer_t t;
    uv_timer_init(loop, &t);
    uv_timer_start(&t, NULL, ms, 0);
    uv_update_time(loop);
    uint64_t end = uv_now(loop) + ms;
    while (uv_now(loop) < end)
        uv_run(loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&t, NULL);
    uv_run(loop, UV_RUN_NOWAIT);
}

/* Two managers on one store (two moat instances): the renewal window the first fetched from
 * the CA is the second's too, without asking the CA again. */
static void test_ari_window_shared(void)
{
    char dir[] = "/tmp/moat-acmemgr-XXXXXX";
    CHECK(mkdtemp(dir) != NULL);
    moat_storage_t *st = NULL;
    char err[512] = "";
    CHECK_INT(moat_storage_open_sqlite(dir, &st, err, sizeof err), 0);
    /* A stored certificate for the site, from the internal CA (any issuer will do for ARI). */
    moat_ca_t *ica = NULL;
    CHECK_INT(moat_ca_open(st, &ica, err, sizeof err), 0);
    const char *names[] = {"a.example.com"};
    char *chain = NULL, *key = NULL;
    CHECK_INT(moat_ca_issue(ica, names, 1, 60 * 86400, &chain, &key), 0);
    int64_t now = (int64_t)time(NULL);
    moat_cert_record_t rec = {.id = SITE_ID,
                              .names = "a.example.com",
                              .issuer = "test",
                              .source = "acme",
                              .not_before = now - 60,
                              .not_after = now + 60 * 86400,
                              .cert_pem = chain,
                              .key_pem = key};
    CHECK_INT(st->ops->put_cert(st, &rec), 0);
    free(chain);
    free(key);
    moat_ca_free(ica);

    uv_loop_t loop;
    uv_loop_init(&loop);
    fake_ca_t ca = {.loop = &loop};
    moat_acmemgr_opts_t o = {
        .email = "default@example.com", .request = fake_request, .request_data = &ca};
    moat_config_t *cfg = parse("a.example.com 127.0.0.1:8080 tls=acme ca=https://ca1.test/dir\n");
    moat_acmemgr_t *a = moat_acmemgr_new(&loop, st, &o, NULL, NULL, err, sizeof err);
    moat_acmemgr_update(a, cfg);
    run_for(&loop, 300);
    CHECK_INT(count_sent(&ca, "/renewal-info/"), 1);
    char *v = NULL;
    CHECK_INT(st->ops->kv_get(st, "acme-ari:" SITE_ID, &v), 0);
    CHECK(v != NULL && strstr(v, " 0 1 1893456000 1893542400 ") != NULL); /* CA 0, 2030 */
    free(v);

    moat_acmemgr_t *b = moat_acmemgr_new(&loop, st, &o, NULL, NULL, err, sizeof err);
    moat_acmemgr_update(b, cfg);
    run_for(&loop, 300);
    CHECK_INT(count_sent(&ca, "/renewal-info/"), 1); /* b used a's window */
    CHECK_INT(count_sent(&ca, "/new-order"), 0);

    moat_config_free(cfg);
    moat_acmemgr_free(a);
    moat_acmemgr_free(b);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK_INT(uv_loop_close(&loop), 0);
    fake_clear(&ca);
    st->ops->close(st);
    nftw(dir, rm_cb, 8, FTW_DEPTH | FTW_PHYS);
}

int main(void)
{
    moat_log_min_level = MOAT_LOG_ERROR;
    test_update_takes_new_settings();
    test_update_default_email_and_removal();
    test_ari_window_shared();
    return test_summary("acmemgr_test");
}
