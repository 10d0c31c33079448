/* Unit tests for the RFC 8555 order state machine (acme/client.c), driven through a fake
 * moat_acme_io_t: every request is checked against a script (method and URL) and answered
 * from it, timers fire in order without waiting, and each JWS the client signs is decoded so
 * the tests can assert what it sent (nonce, kid or jwk, url, payload). No network, no loop. */
#include "moat/acme.h"
#include "moat/log.h"
#include "test.h"

#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>

#include <jansson.h>
#include <stdlib.h>

#define CA      "https://ca.test"
#define ACCOUNT CA "/acct/1"
#define PEM_A   "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"

/* One scripted exchange: what the client must ask, and the answer. */
typedef struct {
    const char *method, *url;
    int status;
    const char *ctype;   /* NULL: no Content-Type */
    const char *body;    /* NULL: empty */
    const char *hdrs[6]; /* extra headers, name/value pairs, NULL-terminated */
} step_t;

/* What the client sent, with its JWS decoded. */
typedef struct {
    char method[8], url[128];
    char *payload; /* NULL for a GET/HEAD; "" for POST-as-GET */
    char nonce[32], kid[64];
    int has_jwk;
} sent_t;

typedef struct {
    int is_after;
    void (*after_cb)(void *);
    moat_httpc_cb cb;
    void *arg;
    const step_t *step; /* NULL: the script had no answer (err MOAT_EIO) */
    char nonce[32];
} event_t;

typedef struct {
    const step_t *script;
    size_t nsteps, pos;
    int mismatches, quiet;
    int nonces;
    char last_nonce[32];
    sent_t sent[64];
    size_t nsent;
    event_t q[64];
    size_t qhead, qtail;
    int published, withdrawn;
    char key_auth[256], token[64], chal_name[64];
    moat_acme_chal_t chal_type;
    uint64_t propagation;
    /* dns-01: what was asked to be published, and how the publication ends */
    char dns_name[64], dns_value[64];
    int dns_calls, dns_rc, dns_calls_at_chal;
    /* the order's result */
    int done;
    moat_acme_result_t res;
} fake_t;

static char *b64url_text(const char *in)
{
    if (in == NULL)
        return NULL;
    size_t n = strlen(in);
    char *out = malloc(n * 3 / 4 + 4);
    long len = moat_b64url_decode(in, n, (uint8_t *)out);
    if (len < 0) {
        free(out);
        return NULL;
    }
    out[len] = '\0';
    return out;
}

static void record(fake_t *f, const char *method, const char *url, const char *body)
{
    if (f->nsent == MOAT_ARRAY_LEN(f->sent))
        return;
    sent_t *s = &f->sent[f->nsent++];
    memset(s, 0, sizeof *s);
    snprintf(s->method, sizeof s->method, "%s", method);
    snprintf(s->url, sizeof s->url, "%s", url);
    if (body == NULL)
        return;
    json_t *jws = json_loads(body, 0, NULL);
    char *prot = b64url_text(json_string_value(json_object_get(jws, "protected")));
    s->payload = b64url_text(json_string_value(json_object_get(jws, "payload")));
    json_t *p = prot ? json_loads(prot, 0, NULL) : NULL;
    const char *nonce = json_string_value(json_object_get(p, "nonce"));
    const char *kid = json_string_value(json_object_get(p, "kid"));
    snprintf(s->nonce, sizeof s->nonce, "%s", nonce ? nonce : "");
    snprintf(s->kid, sizeof s->kid, "%s", kid ? kid : "");
    s->has_jwk = json_object_get(p, "jwk") != NULL;
    /* Every signed request names its own URL and carries the freshest nonce the CA gave. */
    const char *purl = json_string_value(json_object_get(p, "url"));
    CHECK_STR(purl, url);
    CHECK_STR(s->nonce, f->last_nonce);
    CHECK(s->payload != NULL);
    json_decref(p);
    free(prot);
    json_decref(jws);
}

static event_t *push(fake_t *f)
{
    CHECK(f->qtail - f->qhead < MOAT_ARRAY_LEN(f->q));
    event_t *e = &f->q[f->qtail++ % MOAT_ARRAY_LEN(f->q)];
    memset(e, 0, sizeof *e);
    return e;
}

static int fake_request(void *data, const char *method, const char *url, const char *ctype,
                        const char *body, moat_httpc_cb cb, void *cb_data)
{
    fake_t *f = data;
    record(f, method, url, body);
    if (strstr(url, "/chal/") != NULL && f->dns_calls_at_chal == 0)
        f->dns_calls_at_chal = f->dns_calls;
    if (body != NULL)
        CHECK_STR(ctype, "application/jose+json");
    const step_t *st = f->pos < f->nsteps ? &f->script[f->pos] : NULL;
    if (st == NULL || strcmp(st->method, method) != 0 || strcmp(st->url, url) != 0) {
        if (!f->quiet)
            fprintf(stderr, "unexpected request %zu: %s %s (script: %s %s)\n", f->pos, method, url,
                    st ? st->method : "-", st ? st->url : "end");
        f->mismatches++;
        st = NULL;
    } else {
        f->pos++;
    }
    event_t *e = push(f);
    e->cb = cb;
    e->arg = cb_data;
    e->step = st;
    /* Every answer but the directory's carries a fresh nonce. */
    if (st != NULL && strcmp(st->url, CA "/dir") != 0) {
        snprintf(e->nonce, sizeof e->nonce, "nonce-%d", ++f->nonces);
        memcpy(f->last_nonce, e->nonce, sizeof e->nonce);
    }
    return 0;
}

static void fake_after(void *data, uint64_t ms, void (*cb)(void *), void *arg)
{
    (void)ms;
    event_t *e = push(data);
    e->is_after = 1;
    e->after_cb = cb;
    e->arg = arg;
}

static void fake_challenge(void *data, moat_acme_chal_t type, const char *name, const char *token,
                           const char *key_auth)
{
    fake_t *f = data;
    f->chal_type = type;
    snprintf(f->chal_name, sizeof f->chal_name, "%s", name);
    snprintf(f->token, sizeof f->token, "%s", token ? token : "");
    if (key_auth) {
        f->published++;
        snprintf(f->key_auth, sizeof f->key_auth, "%s", key_auth);
    } else {
        f->withdrawn++;
    }
}

typedef struct {
    fake_t *f;
    moat_acme_dns01_cb cb;
    void *arg;
} dns_call_t;

static void dns_fire(void *arg)
{
    dns_call_t *c = arg;
    int rc = c->f->dns_rc;
    c->cb(c->arg, rc, rc ? "the DNS server refused the update" : NULL);
    free(c);
}

static void fake_dns01(void *data, const char *name, const char *value, moat_acme_dns01_cb cb,
                       void *arg)
{
    fake_t *f = data;
    f->dns_calls++;
    snprintf(f->dns_name, sizeof f->dns_name, "%s", name);
    snprintf(f->dns_value, sizeof f->dns_value, "%s", value);
    dns_call_t *c = malloc(sizeof *c);
    *c = (dns_call_t){f, cb, arg};
    event_t *e = push(f); /* reported later, from the "loop" */
    e->is_after = 1;
    e->after_cb = dns_fire;
    e->arg = c;
}

static uint64_t fake_propagation(void *data)
{
    return ((fake_t *)data)->propagation;
}

static void deliver(const event_t *e)
{
    moat_httpc_response_t r = {0};
    char *body = NULL;
    if (e->step == NULL) {
        r.err = MOAT_EIO;
    } else {
        const step_t *st = e->step;
        r.status = st->status;
        body = strdup(st->body ? st->body : "");
        r.body = body;
        r.body_len = strlen(body);
        if (e->nonce[0]) {
            r.names[r.nheaders] = (char *)"Replay-Nonce";
            r.values[r.nheaders++] = (char *)e->nonce;
        }
        if (st->ctype) {
            r.names[r.nheaders] = (char *)"Content-Type";
            r.values[r.nheaders++] = (char *)st->ctype;
        }
        for (size_t i = 0; st->hdrs[i] && st->hdrs[i + 1]; i += 2) {
            r.names[r.nheaders] = (char *)st->hdrs[i];
            r.values[r.nheaders++] = (char *)st->hdrs[i + 1];
        }
    }
    e->cb(e->arg, &r);
    free(body);
}

/* Run timers and answers in order until nothing is pending. */
static void pump(fake_t *f)
{
    for (int guard = 0; f->qhead < f->qtail && guard < 1000; guard++) {
        event_t e = f->q[f->qhead++ % MOAT_ARRAY_LEN(f->q)];
        if (e.is_after)
            e.after_cb(e.arg);
        else
            deliver(&e);
    }
    CHECK(f->qhead == f->qtail);
}

static void on_done(void *data, moat_acme_result_t *res)
{
    fake_t *f = data;
    f->done++;
    /* The result belongs to the order: take its strings over. */
    f->res = *res;
    memset(res, 0, sizeof *res);
}

static moat_acme_io_t fake_io(fake_t *f)
{
    return (moat_acme_io_t){.data = f,
                            .request = fake_request,
                            .after = fake_after,
                            .challenge = fake_challenge,
                            .dns01_publish = fake_dns01,
                            .propagation_ms = fake_propagation};
}

static void fake_clear(fake_t *f)
{
    for (size_t i = 0; i < f->nsent; i++)
        free(f->sent[i].payload);
    moat_acme_result_clear(&f->res);
}

static const char *names_a[] = {"a.example"};

static moat_acme_order_opts_t order_opts(EVP_PKEY *k)
{
    return (moat_acme_order_opts_t){.directory_url = CA "/dir",
                                    .names = names_a,
                                    .nnames = 1,
                                    .account_key = k,
                                    .email = "me@example.com",
                                    .challenge = MOAT_ACME_HTTP01};
}

static void run(fake_t *f, const step_t *script, size_t n, const moat_acme_order_opts_t *o)
{
    f->script = script;
    f->nsteps = n;
    moat_acme_io_t io = fake_io(f);
    moat_acme_order_t *ord = moat_acme_order_start(&io, o, on_done, f);
    CHECK(ord != NULL);
    CHECK_INT(f->done, 0); /* never from inside the call */
    pump(f);
    CHECK_INT(f->done, 1);
    CHECK_INT(f->mismatches, 0);
    CHECK_INT(f->pos, n); /* the whole script was asked for */
}

#define JSON    "application/json"
#define PROBLEM "application/problem+json"
#define DIRECTORY                                                                                  \
    {                                                                                              \
        "GET", CA "/dir", 200, JSON,                                                               \
            "{\"newNonce\":\"" CA "/nonce\",\"newAccount\":\"" CA "/new-acct\",\"newOrder\":\"" CA \
            "/new-order\"}",                                                                       \
        {                                                                                          \
            NULL                                                                                   \
        }                                                                                          \
    }
#define NEW_NONCE                                                                                  \
    {                                                                                              \
        "HEAD", CA "/nonce", 200, NULL, NULL,                                                      \
        {                                                                                          \
            NULL                                                                                   \
        }                                                                                          \
    }
#define NEW_ACCOUNT                                                                                \
    {                                                                                              \
        "POST", CA "/new-acct", 201, JSON, "{\"status\":\"valid\"}",                               \
        {                                                                                          \
            "Location", ACCOUNT, NULL                                                              \
        }                                                                                          \
    }
#define ORDER_BODY                                                                                 \
    "{\"status\":\"pending\",\"authorizations\":[\"" CA "/authz/1\"],\"finalize\":\"" CA           \
    "/order/1/finalize\"}"
#define NEW_ORDER                                                                                  \
    {                                                                                              \
        "POST", CA "/new-order", 201, JSON, ORDER_BODY,                                            \
        {                                                                                          \
            "Location", CA "/order/1", NULL                                                        \
        }                                                                                          \
    }
#define AUTHZ_PENDING                                                                              \
    {                                                                                              \
        "POST", CA "/authz/1", 200, JSON,                                                          \
            "{\"status\":\"pending\",\"identifier\":{\"type\":\"dns\",\"value\":\"a.example\"},"   \
            "\"challenges\":[{\"type\":\"tls-alpn-01\",\"url\":\"" CA                              \
            "/chal/2\",\"token\":\"tok2\"},"                                                       \
            "{\"type\":\"http-01\",\"url\":\"" CA "/chal/1\",\"token\":\"tok1\"}]}",               \
        {                                                                                          \
            NULL                                                                                   \
        }                                                                                          \
    }
#define CHALLENGE                                                                                  \
    {                                                                                              \
        "POST", CA "/chal/1", 200, JSON, "{\"status\":\"processing\"}",                            \
        {                                                                                          \
            NULL                                                                                   \
        }                                                                                          \
    }

/* The whole order, with one badNonce on newOrder: the client resends the same request with
 * the nonce from the problem response and carries on. */
static void test_order_success(void)
{
    static const step_t script[] = {
        DIRECTORY,
        NEW_NONCE,
        NEW_ACCOUNT,
        {"POST",
         CA "/new-order",
         400,
         PROBLEM,
         "{\"type\":\"urn:ietf:params:acme:error:badNonce\",\"detail\":\"stale\"}",
         {NULL}},
        NEW_ORDER,
        AUTHZ_PENDING,
        CHALLENGE,
        {"POST", CA "/authz/1", 200, JSON, "{\"status\":\"pending\"}", {NULL}},
        {"POST", CA "/authz/1", 200, JSON, "{\"status\":\"valid\"}", {NULL}},
        {"POST",
         CA "/order/1/finalize",
         200,
         JSON,
         "{\"status\":\"processing\"}",
         {"Retry-After", "1", NULL}},
        {"POST",
         CA "/order/1",
         200,
         JSON,
         "{\"status\":\"valid\",\"certificate\":\"" CA "/cert/1\"}",
         {NULL}},
        {"POST", CA "/cert/1", 200, "application/pem-certificate-chain", PEM_A, {NULL}},
    };
    fake_t f = {0};
    EVP_PKEY *k = moat_acme_key_new();
    moat_acme_order_opts_t o = order_opts(k);
    run(&f, script, MOAT_ARRAY_LEN(script), &o);

    CHECK_INT(f.res.rc, 0);
    CHECK_STR(f.res.chain_pem, PEM_A);
    CHECK_STR(f.res.account_url, ACCOUNT);
    CHECK(f.res.error == NULL);
    CHECK_INT(f.res.challenge, MOAT_ACME_HTTP01);
    CHECK_INT(f.nsent, MOAT_ARRAY_LEN(script));

    /* newAccount: signed with the JWK, agrees to the terms, names the contact. */
    const sent_t *acct = &f.sent[2];
    CHECK(acct->has_jwk);
    CHECK_STR(acct->kid, "");
    CHECK(strstr(acct->payload, "\"termsOfServiceAgreed\":true") != NULL);
    CHECK(strstr(acct->payload, "\"contact\":[\"mailto:me@example.com\"]") != NULL);
    /* Everything after it is signed with the account URL as kid. */
    for (size_t i = 3; i < f.nsent; i++) {
        CHECK_STR(f.sent[i].kid, ACCOUNT);
        CHECK(!f.sent[i].has_jwk);
    }
    /* The badNonce retry is the same request with the problem response's nonce. */
    CHECK_STR(f.sent[3].payload, f.sent[4].payload);
    CHECK(strcmp(f.sent[3].nonce, f.sent[4].nonce) != 0);
    CHECK_STR(f.sent[4].payload, "{\"identifiers\":[{\"type\":\"dns\",\"value\":\"a.example\"}]}");
    /* POST-as-GET has an empty payload; the challenge POST sends {}. */
    CHECK_STR(f.sent[5].payload, "");
    CHECK_STR(f.sent[6].payload, "{}");
    CHECK_STR(f.sent[11].payload, "");

    /* The http-01 answer was published for the right token and withdrawn once valid. */
    char *tp = moat_acme_thumbprint(k), want[256];
    snprintf(want, sizeof want, "tok1.%s", tp);
    free(tp);
    CHECK_INT(f.chal_type, MOAT_ACME_HTTP01);
    CHECK_STR(f.chal_name, "a.example");
    CHECK_STR(f.key_auth, want);
    CHECK_INT(f.published, 1);
    CHECK_INT(f.withdrawn, 1);

    /* finalize carries a CSR for the names whose key is the one returned (and not the
     * account's). */
    json_t *fin = json_loads(f.sent[9].payload, 0, NULL);
    const char *csr_b64 = json_string_value(json_object_get(fin, "csr"));
    CHECK(csr_b64 != NULL);
    uint8_t der[2048];
    long dlen = csr_b64 ? moat_b64url_decode(csr_b64, strlen(csr_b64), der) : -1;
    const uint8_t *dp = der;
    X509_REQ *req = dlen > 0 ? d2i_X509_REQ(NULL, &dp, dlen) : NULL;
    CHECK(req != NULL);
    EVP_PKEY *csr_key = req ? X509_REQ_get_pubkey(req) : NULL;
    EVP_PKEY *cert_key = f.res.key_pem ? moat_acme_key_from_pem(f.res.key_pem) : NULL;
    CHECK(csr_key != NULL && cert_key != NULL);
    CHECK_INT(EVP_PKEY_cmp(csr_key, cert_key), 1);
    CHECK(EVP_PKEY_cmp(csr_key, k) != 1);
    EVP_PKEY_free(csr_key);
    EVP_PKEY_free(cert_key);
    X509_REQ_free(req);
    json_decref(fin);

    fake_clear(&f);
    EVP_PKEY_free(k);
}

/* A problem document ends the order with the CA's sentence, and its type and Retry-After
 * reach the result for the backoff. */
static void test_order_problem(void)
{
    static const step_t script[] = {
        DIRECTORY,
        NEW_NONCE,
        NEW_ACCOUNT,
        {"POST",
         CA "/new-order",
         429,
         PROBLEM,
         "{\"type\":\"urn:ietf:params:acme:error:rateLimited\",\"detail\":\"too many "
         "certificates\",\"subproblems\":[{\"type\":\"urn:ietf:params:acme:error:rejectedIdentifier"
         "\",\"detail\":\"no\",\"identifier\":{\"type\":\"dns\",\"value\":\"a.example\"}}]}",
         {"Retry-After", "120", NULL}},
    };
    fake_t f = {0};
    EVP_PKEY *k = moat_acme_key_new();
    moat_acme_order_opts_t o = order_opts(k);
    run(&f, script, MOAT_ARRAY_LEN(script), &o);
    CHECK_INT(f.res.rc, MOAT_EIO);
    CHECK_INT(f.res.rate_limited, 1);
    CHECK_INT(f.res.retry_after, 120);
    CHECK_INT(f.res.challenge_failed, 0);
    CHECK_STR(f.res.error, "rateLimited: too many certificates [subproblems: a.example: "
                           "rejectedIdentifier: no] (HTTP 429 from " CA "/new-order)");
    CHECK(f.res.chain_pem == NULL && f.res.key_pem == NULL);
    CHECK_STR(f.res.account_url, ACCOUNT);
    fake_clear(&f);
    EVP_PKEY_free(k);
}

/* A failed validation says why and marks the result so the manager tries the other
 * challenge; the published answer is withdrawn. */
static void test_challenge_invalid(void)
{
    static const step_t script[] = {
        DIRECTORY,
        NEW_NONCE,
        NEW_ACCOUNT,
        NEW_ORDER,
        AUTHZ_PENDING,
        CHALLENGE,
        {"POST",
         CA "/authz/1",
         200,
         JSON,
         "{\"status\":\"invalid\",\"challenges\":[{\"type\":\"http-01\",\"error\":{\"type\":"
         "\"urn:ietf:params:acme:error:connection\",\"detail\":\"refused\"}}]}",
         {NULL}},
    };
    fake_t f = {0};
    f.propagation = 5; /* the answer waits for other instances before the CA is told */
    EVP_PKEY *k = moat_acme_key_new();
    moat_acme_order_opts_t o = order_opts(k);
    run(&f, script, MOAT_ARRAY_LEN(script), &o);
    CHECK_INT(f.res.rc, MOAT_EIO);
    CHECK_INT(f.res.challenge_failed, 1);
    CHECK_STR(f.res.error, "http-01 validation of a.example failed: connection: refused");
    CHECK_INT(f.published, 1);
    CHECK_INT(f.withdrawn, 1);
    fake_clear(&f);
    EVP_PKEY_free(k);
}

/* tls-alpn-01 picks the other challenge of the same authorization. */
static void test_challenge_alpn(void)
{
    static const step_t script[] = {
        DIRECTORY,
        NEW_NONCE,
        NEW_ACCOUNT,
        NEW_ORDER,
        AUTHZ_PENDING,
        {"POST", CA "/chal/2", 200, JSON, "{}", {NULL}},
        {"POST", CA "/authz/1", 200, JSON, "{\"status\":\"invalid\"}", {NULL}},
    };
    fake_t f = {0};
    EVP_PKEY *k = moat_acme_key_new();
    moat_acme_order_opts_t o = order_opts(k);
    o.challenge = MOAT_ACME_TLSALPN01;
    run(&f, script, MOAT_ARRAY_LEN(script), &o);
    CHECK_INT(f.chal_type, MOAT_ACME_TLSALPN01);
    CHECK_STR(f.token, "tok2");
    CHECK_INT(f.res.challenge, MOAT_ACME_TLSALPN01);
    CHECK_STR(f.res.error, "tls-alpn-01 validation of a.example failed: no reason given");
    fake_clear(&f);
    EVP_PKEY_free(k);
}

/* dns-01 for a wildcard: the authorization names the base domain; the TXT value is
 * base64url(SHA-256(key authorization)); the CA is told only once the record is published,
 * and the record is withdrawn at the end. A publication that fails ends the order with its
 * sentence and never tells the CA. */
#define AUTHZ_DNS                                                                                  \
    {                                                                                              \
        "POST", CA "/authz/1", 200, JSON,                                                          \
            "{\"status\":\"pending\",\"wildcard\":true,\"identifier\":{\"type\":\"dns\","          \
            "\"value\":\"a.example\"},\"challenges\":[{\"type\":\"http-01\",\"url\":\"" CA         \
            "/chal/1\",\"token\":\"tok1\"},{\"type\":\"dns-01\",\"url\":\"" CA                     \
            "/chal/3\",\"token\":\"tok3\"}]}",                                                     \
        {                                                                                          \
            NULL                                                                                   \
        }                                                                                          \
    }
static void test_challenge_dns01(void)
{
    static const char *wild[] = {"*.a.example"};
    static const step_t script[] = {
        DIRECTORY,
        NEW_NONCE,
        NEW_ACCOUNT,
        NEW_ORDER,
        AUTHZ_DNS,
        {"POST", CA "/chal/3", 200, JSON, "{}", {NULL}},
        {"POST",
         CA "/authz/1",
         200,
         JSON,
         "{\"status\":\"invalid\",\"challenges\":[{\"type\":\"dns-01\",\"error\":{\"type\":"
         "\"urn:ietf:params:acme:error:unauthorized\",\"detail\":\"no TXT\"}}]}",
         {NULL}},
    };
    fake_t f = {0};
    EVP_PKEY *k = moat_acme_key_new();
    moat_acme_order_opts_t o = order_opts(k);
    o.names = wild;
    o.challenge = MOAT_ACME_DNS01;
    run(&f, script, MOAT_ARRAY_LEN(script), &o);
    CHECK_INT(f.dns_calls, 1);
    CHECK_STR(f.dns_name, "a.example");
    char *ka = moat_acme_key_authorization("tok3", k);
    char *want = moat_acme_dns01_value(ka);
    CHECK_STR(f.dns_value, want);
    CHECK_INT(strlen(want), 43);
    /* Withdrawn through `challenge` with the value as token; never published through it. */
    CHECK_INT(f.published, 0);
    CHECK_INT(f.withdrawn, 1);
    CHECK_INT(f.chal_type, MOAT_ACME_DNS01);
    CHECK_STR(f.token, want);
    CHECK_INT(f.res.challenge, MOAT_ACME_DNS01);
    CHECK_INT(f.res.challenge_failed, 1);
    CHECK_STR(f.res.error, "dns-01 validation of a.example failed: unauthorized: no TXT");
    /* The sent JWS names the wildcard in the order. */
    CHECK(f.sent[3].payload && strstr(f.sent[3].payload, "\"*.a.example\"") != NULL);
    fake_clear(&f);
    free(ka);
    free(want);

    static const step_t failing[] = {DIRECTORY, NEW_NONCE, NEW_ACCOUNT, NEW_ORDER, AUTHZ_DNS};
    fake_t g = {0};
    g.dns_rc = MOAT_EPERM;
    run(&g, failing, MOAT_ARRAY_LEN(failing), &o);
    CHECK_INT(g.res.rc, MOAT_EPERM);
    CHECK_INT(g.res.challenge_failed, 0);
    CHECK_STR(g.res.error, "dns-01 for a.example: the DNS server refused the update");
    CHECK_INT(g.withdrawn, 1);
    fake_clear(&g);
    EVP_PKEY_free(k);
    CHECK_STR(moat_acme_chal_name(MOAT_ACME_DNS01), "dns-01");
}

/* A wildcard and its base name: both authorizations are fetched and both values published
 * (side by side, under the same record name) before the CA is told about either; both stay
 * until the order ends. */
static void test_dns01_wildcard_and_base(void)
{
    static const char *both[] = {"*.a.example", "a.example"};
    static const step_t script[] = {
        DIRECTORY,
        NEW_NONCE,
        NEW_ACCOUNT,
        {"POST",
         CA "/new-order",
         201,
         JSON,
         "{\"status\":\"pending\",\"authorizations\":[\"" CA "/authz/1\",\"" CA
         "/authz/2\"],\"finalize\":\"" CA "/order/1/finalize\"}",
         {"Location", CA "/order/1", NULL}},
        AUTHZ_DNS,
        {"POST",
         CA "/authz/2",
         200,
         JSON,
         "{\"status\":\"pending\",\"identifier\":{\"type\":\"dns\",\"value\":\"a.example\"},"
         "\"challenges\":[{\"type\":\"dns-01\",\"url\":\"" CA "/chal/4\",\"token\":\"tok4\"}]}",
         {NULL}},
        {"POST", CA "/chal/3", 200, JSON, "{}", {NULL}},
        {"POST", CA "/authz/1", 200, JSON, "{\"status\":\"valid\"}", {NULL}},
        {"POST", CA "/chal/4", 200, JSON, "{}", {NULL}},
        {"POST", CA "/authz/2", 200, JSON, "{\"status\":\"invalid\"}", {NULL}},
    };
    fake_t f = {0};
    EVP_PKEY *k = moat_acme_key_new();
    moat_acme_order_opts_t o = order_opts(k);
    o.names = both;
    o.nnames = 2;
    o.challenge = MOAT_ACME_DNS01;
    run(&f, script, MOAT_ARRAY_LEN(script), &o);
    CHECK_INT(f.dns_calls, 2);
    CHECK_INT(f.dns_calls_at_chal, 2); /* both published before the first challenge */
    CHECK_INT(f.withdrawn, 2);         /* both withdrawn, at the end */
    CHECK_STR(f.res.error, "dns-01 validation of a.example failed: no reason given");
    fake_clear(&f);
    EVP_PKEY_free(k);
}

/* The CA refuses "replaces": the newOrder goes once more without it. */
static void test_replaces_refused(void)
{
    static const step_t script[] = {
        DIRECTORY,
        NEW_NONCE,
        NEW_ACCOUNT,
        {"POST",
         CA "/new-order",
         409,
         PROBLEM,
         "{\"type\":\"urn:ietf:params:acme:error:alreadyReplaced\",\"detail\":\"done\"}",
         {NULL}},
        {"POST",
         CA "/new-order",
         400,
         PROBLEM,
         "{\"type\":\"urn:ietf:params:acme:error:rejectedIdentifier\"}",
         {NULL}},
    };
    fake_t f = {0};
    EVP_PKEY *k = moat_acme_key_new();
    moat_acme_order_opts_t o = order_opts(k);
    o.replaces = "aki.serial";
    run(&f, script, MOAT_ARRAY_LEN(script), &o);
    CHECK(strstr(f.sent[3].payload, "\"replaces\":\"aki.serial\"") != NULL);
    CHECK(strstr(f.sent[4].payload, "replaces") == NULL);
    CHECK_STR(f.res.error, "rejectedIdentifier: (no detail) (HTTP 400 from " CA "/new-order)");
    fake_clear(&f);
    EVP_PKEY_free(k);
}

/* A self-signed certificate whose subject and issuer CN is cn, as PEM (free()). */
static char *cert_pem(const char *cn, EVP_PKEY *k)
{
    X509 *x = X509_new();
    X509_NAME *n = X509_NAME_new();
    X509_NAME_add_entry_by_txt(n, "CN", MBSTRING_UTF8, (const uint8_t *)cn, -1, -1, 0);
    X509_set_version(x, 2);
    ASN1_INTEGER_set(X509_get_serialNumber(x), 1);
    X509_set_subject_name(x, n);
    X509_set_issuer_name(x, n);
    X509_gmtime_adj(X509_getm_notBefore(x), 0);
    X509_gmtime_adj(X509_getm_notAfter(x), 3600);
    X509_set_pubkey(x, k);
    X509_sign(x, k, EVP_sha256());
    BIO *bio = BIO_new(BIO_s_mem());
    PEM_write_bio_X509(bio, x);
    const uint8_t *p;
    size_t len;
    BIO_mem_contents(bio, &p, &len);
    char *out = strndup((const char *)p, len);
    BIO_free(bio);
    X509_NAME_free(n);
    X509_free(x);
    return out;
}

/* preferred_chain: the default chain does not end at the wanted root, so the client fetches
 * the alternates the Link headers name and takes the one that does; when none does it falls
 * back to the default chain. */
static void test_preferred_chain(void)
{
    EVP_PKEY *k = moat_acme_key_new();
    char *def = cert_pem("Default Root", k), *alt1 = cert_pem("Other Root", k),
         *alt2 = cert_pem("Preferred Root", k);
    const char *ct = "application/pem-certificate-chain";
    step_t script[] = {
        DIRECTORY,
        NEW_NONCE,
        NEW_ACCOUNT,
        NEW_ORDER,
        {"POST", CA "/authz/1", 200, JSON, "{\"status\":\"valid\"}", {NULL}},
        {"POST",
         CA "/order/1/finalize",
         200,
         JSON,
         "{\"status\":\"valid\",\"certificate\":\"" CA "/cert/1\"}",
         {NULL}},
        {"POST",
         CA "/cert/1",
         200,
         ct,
         def,
         {"Link", "<" CA "/dir>;rel=\"index\", <" CA "/cert/1/1>;rel=\"alternate\"", "Link",
          "<" CA "/cert/1/2>; rel=\"alternate\"", NULL}},
        {"POST", CA "/cert/1/1", 200, ct, alt1, {NULL}},
        {"POST", CA "/cert/1/2", 200, ct, alt2, {NULL}},
    };
    moat_acme_order_opts_t o = order_opts(k);
    o.preferred_chain = "Preferred Root";
    fake_t f = {0};
    run(&f, script, MOAT_ARRAY_LEN(script), &o);
    CHECK_INT(f.res.rc, 0);
    CHECK_STR(f.res.chain_pem, alt2);
    CHECK_INT(f.published, 0); /* the authorization was already valid */
    fake_clear(&f);

    /* No alternate matches: the default chain. */
    o.preferred_chain = "Nobody";
    fake_t g = {0};
    run(&g, script, MOAT_ARRAY_LEN(script), &o);
    CHECK_INT(g.res.rc, 0);
    CHECK_STR(g.res.chain_pem, def);
    fake_clear(&g);
    free(def);
    free(alt1);
    free(alt2);
    EVP_PKEY_free(k);
}

/* Errors before any account exists: a directory that is not ACME, one that needs EAB, a CA
 * that cannot be reached, and badNonce forever. */
static void test_early_failures(void)
{
    EVP_PKEY *k = moat_acme_key_new();
    moat_acme_order_opts_t o = order_opts(k);
    {
        static const step_t script[] = {{"GET", CA "/dir", 200, JSON, "{}", {NULL}}};
        fake_t f = {0};
        run(&f, script, 1, &o);
        CHECK_INT(f.res.rc, MOAT_EPARSE);
        CHECK_STR(f.res.error, CA "/dir is not an ACME directory");
        fake_clear(&f);
    }
    {
        static const step_t script[] = {
            {"GET",
             CA "/dir",
             200,
             JSON,
             "{\"newNonce\":\"n\",\"newAccount\":\"a\",\"newOrder\":\"o\",\"meta\":{"
             "\"externalAccountRequired\":true}}",
             {NULL}}};
        fake_t f = {0};
        run(&f, script, 1, &o);
        CHECK_INT(f.res.rc, MOAT_EINVAL);
        CHECK(f.res.error && strstr(f.res.error, "requires external account binding"));
        fake_clear(&f);
    }
    {
        fake_t f = {.quiet = 1}; /* no script: the CA is unreachable */
        moat_acme_io_t io = fake_io(&f);
        moat_acme_order_start(&io, &o, on_done, &f);
        pump(&f);
        CHECK_INT(f.done, 1);
        CHECK_INT(f.res.rc, MOAT_EIO);
        CHECK(f.res.error && strncmp(f.res.error, "cannot reach the CA at " CA "/dir", 31) == 0);
        f.mismatches = 0;
        fake_clear(&f);
    }
    {
        /* Eight retries, then the problem is the answer. */
        step_t script[3 + 9];
        const step_t head[] = {DIRECTORY, NEW_NONCE, NEW_ACCOUNT};
        memcpy(script, head, sizeof head);
        for (size_t i = 3; i < MOAT_ARRAY_LEN(script); i++)
            script[i] = (step_t){"POST",
                                 CA "/new-order",
                                 400,
                                 PROBLEM,
                                 "{\"type\":\"urn:ietf:params:acme:error:badNonce\"}",
                                 {NULL}};
        fake_t f = {0};
        run(&f, script, MOAT_ARRAY_LEN(script), &o);
        CHECK_STR(f.res.error, "badNonce: (no detail) (HTTP 400 from " CA "/new-order)");
        fake_clear(&f);
    }
    EVP_PKEY_free(k);
}

/* A cancelled order never calls done; its memory goes when the pending answer returns. */
static void test_cancel(void)
{
    static const step_t script[] = {DIRECTORY, NEW_NONCE};
    fake_t f = {0};
    f.script = script;
    f.nsteps = MOAT_ARRAY_LEN(script);
    EVP_PKEY *k = moat_acme_key_new();
    moat_acme_order_opts_t o = order_opts(k);
    moat_acme_io_t io = fake_io(&f);
    moat_acme_order_t *ord = moat_acme_order_start(&io, &o, on_done, &f);
    /* Run the start timer and the directory answer only: the nonce request is in flight. */
    for (int i = 0; i < 2; i++) {
        event_t e = f.q[f.qhead++ % MOAT_ARRAY_LEN(f.q)];
        if (e.is_after)
            e.after_cb(e.arg);
        else
            deliver(&e);
    }
    CHECK_INT(f.nsent, 2);
    moat_acme_order_cancel(ord);
    pump(&f);
    CHECK_INT(f.done, 0);
    fake_clear(&f);
    EVP_PKEY_free(k);
}

int main(void)
{
    moat_log_min_level = MOAT_LOG_ERROR;
    test_order_success();
    test_order_problem();
    test_challenge_invalid();
    test_challenge_alpn();
    test_challenge_dns01();
    test_dns01_wildcard_and_base();
    test_replaces_refused();
    test_preferred_chain();
    test_early_failures();
    test_cancel();
    return test_summary("acme_client_test");
}
