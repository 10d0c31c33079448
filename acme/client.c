/* The RFC 8555 client (include/moat/acme.h): one order as an asynchronous state machine.
 *
 *   directory -> newNonce -> newAccount -> newOrder -> for each authorization: fetch it, publish
 *   the chosen challenge, tell the CA, poll until valid -> finalize with a CSR -> poll the order
 *   -> download the chain (and the alternates when a preferred chain is asked for).
 *
 * Every request goes through post() or get(), whose responses land in on_response(): it does
 * what every response needs (transport errors, the nonce, problem documents in on_problem())
 * and hands the rest to the handler for o->state in state_handlers[]. Each response carries a
 * fresh nonce; a badNonce problem resends the same request with it. Nothing here blocks or sleeps:
 * waits are io->after() timers. */
#include "moat/acme.h"
#include "moat/log.h"

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/sha.h>
#include <openssl/x509.h>

#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <strings.h>
#include <time.h>

#define MAX_BAD_NONCE  8
#define POLL_FIRST_MS  20
#define POLL_MAX_MS    5000
#define MAX_POLLS      120
#define MAX_ALTERNATES 8

enum {
    S_DIR,
    S_NONCE,
    S_ACCOUNT,
    S_ORDER,
    S_RESUME,
    S_AUTHZ,
    S_CHALLENGE,
    S_AUTHZ_POLL,
    S_FINALIZE,
    S_ORDER_POLL,
    S_CERT,
    S_ALT,
};

typedef struct {
    moat_acme_chal_t type;
    char *name, *token;
} published_t;

struct moat_acme_order {
    moat_acme_io_t io;
    moat_acme_done_cb done;
    void *done_data;
    char *dir_url, *email, *eab_kid, *eab_hmac, *preferred, *replaces, *resume_url;
    void (*placed)(void *data, const char *order_url);
    char **names;
    size_t nnames;
    EVP_PKEY *account;
    moat_acme_chal_t chal;

    int state, pending, cancelled, finished;
    char *new_nonce, *new_account, *new_order;
    char *nonce, *kid;
    char *order_url, *finalize_url, *cert_url, *chal_url;
    char **authz;
    size_t nauthz, authz_i;
    char *authz_name;
    published_t pub[16];
    size_t npub;
    EVP_PKEY *cert_key;
    /* dns-01 runs in two phases: every authorization is fetched and its record published
     * (the publications wait for propagation side by side), then each challenge is answered
     * in turn. dns_chal[i] is authorization i's challenge URL (NULL: already valid). */
    char **dns_chal, **dns_name;
    int dns_validating, dns_collected, dns_inflight;
    uint64_t poll_ms;
    int polls, bad_nonces;
    char *req_url, *req_payload; /* the request in flight, kept to resend on badNonce */
    char *alts[MAX_ALTERNATES];
    size_t nalts, alt_i;
    char *first_chain;
    moat_acme_result_t res;
};

static void order_free(moat_acme_order_t *o)
{
    free(o->dir_url);
    free(o->email);
    free(o->eab_kid);
    moat_secret_free(o->eab_hmac);
    free(o->preferred);
    free(o->replaces);
    free(o->resume_url);
    for (size_t i = 0; i < o->nnames; i++)
        free(o->names[i]);
    free(o->names);
    EVP_PKEY_free(o->account);
    free(o->new_nonce);
    free(o->new_account);
    free(o->new_order);
    free(o->nonce);
    free(o->kid);
    free(o->order_url);
    free(o->finalize_url);
    free(o->cert_url);
    free(o->chal_url);
    for (size_t i = 0; i < o->nauthz; i++)
        free(o->authz[i]);
    free(o->authz);
    for (size_t i = 0; o->dns_chal && i < o->nauthz; i++) {
        free(o->dns_chal[i]);
        free(o->dns_name[i]);
    }
    free(o->dns_chal);
    free(o->dns_name);
    free(o->authz_name);
    EVP_PKEY_free(o->cert_key);
    free(o->req_url);
    free(o->req_payload);
    for (size_t i = 0; i < o->nalts; i++)
        free(o->alts[i]);
    free(o->first_chain);
    moat_acme_result_clear(&o->res);
    free(o);
}

void moat_acme_result_clear(moat_acme_result_t *r)
{
    free(r->chain_pem);
    moat_secret_free(r->key_pem);
    free(r->error);
    free(r->account_url);
    memset(r, 0, sizeof *r);
}

const char *moat_acme_chal_name(moat_acme_chal_t c)
{
    return c == MOAT_ACME_HTTP01 ? "http-01" : c == MOAT_ACME_TLSALPN01 ? "tls-alpn-01" : "dns-01";
}

char *moat_acme_dns01_value(const char *key_auth)
{
    uint8_t d[SHA256_DIGEST_LENGTH];
    SHA256((const uint8_t *)key_auth, strlen(key_auth), d);
    return moat_b64url(d, sizeof d);
}

static void withdraw(moat_acme_order_t *o)
{
    for (size_t i = 0; i < o->npub; i++) {
        o->io.challenge(o->io.data, o->pub[i].type, o->pub[i].name, o->pub[i].token, NULL);
        free(o->pub[i].name);
        free(o->pub[i].token);
    }
    o->npub = 0;
}

static void finish(moat_acme_order_t *o)
{
    if (o->finished)
        return;
    o->finished = 1;
    withdraw(o);
    if (!o->cancelled) {
        o->res.challenge = o->chal;
        if (o->kid && o->res.account_url == NULL)
            o->res.account_url = moat_xstrdup(o->kid);
        o->done(o->done_data, &o->res);
    }
    if (o->pending == 0)
        order_free(o);
}

static void fail(moat_acme_order_t *o, int rc, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void fail(moat_acme_order_t *o, int rc, const char *fmt, ...)
{
    char buf[2048];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    o->res.rc = rc ? rc : MOAT_EIO;
    free(o->res.error);
    o->res.error = moat_xstrdup(buf);
    finish(o);
}

/* "type: detail [subproblems: ID: type: detail; ...]" from an RFC 7807 problem document. */
static void describe_problem(json_t *p, char *out, size_t cap, int *rate_limited, int *bad_nonce)
{
    const char *type = json_string_value(json_object_get(p, "type"));
    const char *detail = json_string_value(json_object_get(p, "detail"));
    if (type == NULL)
        type = "(no type)";
    const char *shortt = strncmp(type, "urn:ietf:params:acme:error:", 27) == 0 ? type + 27 : type;
    if (rate_limited)
        *rate_limited = strcmp(shortt, "rateLimited") == 0;
    if (bad_nonce)
        *bad_nonce = strcmp(shortt, "badNonce") == 0;
    int n = snprintf(out, cap, "%s: %s", shortt, detail ? detail : "(no detail)");
    json_t *subs = json_object_get(p, "subproblems");
    size_t i;
    json_t *s;
    json_array_foreach(subs, i, s)
    {
        if (n < 0 || (size_t)n >= cap)
            break;
        const char *st = json_string_value(json_object_get(s, "type"));
        const char *sd = json_string_value(json_object_get(s, "detail"));
        const char *id =
            json_string_value(json_object_get(json_object_get(s, "identifier"), "value"));
        if (st && strncmp(st, "urn:ietf:params:acme:error:", 27) == 0)
            st += 27;
        n += snprintf(out + n, cap - (size_t)n, "%s%s: %s: %s", i == 0 ? " [subproblems: " : "; ",
                      id ? id : "?", st ? st : "?", sd ? sd : "");
        if (i + 1 == json_array_size(subs) && (size_t)n < cap)
            n += snprintf(out + n, cap - (size_t)n, "]");
    }
}

static void on_response(void *data, const moat_httpc_response_t *r);

static void send_post(moat_acme_order_t *o)
{
    char *jws = moat_acme_jws(o->account, o->state == S_ACCOUNT ? NULL : o->kid, o->nonce,
                              o->req_url, o->req_payload);
    free(o->nonce);
    o->nonce = NULL;
    if (jws == NULL) {
        fail(o, MOAT_ECRYPTO, "cannot sign the request to %s", o->req_url);
        return;
    }
    o->pending++;
    int rc =
        o->io.request(o->io.data, "POST", o->req_url, "application/jose+json", jws, on_response, o);
    free(jws);
    if (rc < 0) {
        o->pending--;
        fail(o, rc, "cannot send a request to %s: %s", o->req_url, moat_strerror(rc));
    }
}

/* POST (payload NULL: POST-as-GET) to url; the response goes to on_response in state st. */
static void post(moat_acme_order_t *o, int st, const char *url, const char *payload)
{
    o->state = st;
    o->bad_nonces = 0;
    char *u = moat_xstrdup(url);
    free(o->req_url);
    o->req_url = u;
    free(o->req_payload);
    o->req_payload = payload ? moat_xstrdup(payload) : NULL;
    send_post(o);
}

static void get(moat_acme_order_t *o, int st, const char *method, const char *url)
{
    o->state = st;
    o->pending++;
    int rc = o->io.request(o->io.data, method, url, NULL, NULL, on_response, o);
    if (rc < 0) {
        o->pending--;
        fail(o, rc, "cannot send a request to %s: %s", url, moat_strerror(rc));
    }
}

static void start_authz(moat_acme_order_t *o);
static void poll_fire(void *arg);

static void poll_later(moat_acme_order_t *o, const moat_httpc_response_t *r)
{
    if (++o->polls > MAX_POLLS) {
        fail(o, MOAT_ETIMEOUT, "the CA did not finish %s in time",
             o->state == S_AUTHZ_POLL ? "validating" : "issuing");
        return;
    }
    uint64_t ms = o->poll_ms;
    int64_t ra = moat_acme_parse_retry_after(moat_httpc_header(r, "Retry-After", 0, NULL),
                                             (int64_t)time(NULL));
    if (ra > 0)
        ms = (uint64_t)MOAT_MIN(ra, 60) * 1000;
    o->poll_ms = MOAT_MIN(o->poll_ms * 2, POLL_MAX_MS);
    o->pending++;
    o->io.after(o->io.data, ms, poll_fire, o);
}

static void poll_fire(void *arg)
{
    moat_acme_order_t *o = arg;
    o->pending--;
    if (o->cancelled || o->finished) {
        if (o->pending == 0 && (o->finished || o->cancelled))
            order_free(o);
        return;
    }
    if (o->state == S_AUTHZ_POLL)
        post(o, S_AUTHZ_POLL, o->authz[o->authz_i], NULL);
    else
        post(o, S_ORDER_POLL, o->order_url, NULL);
}

static const char *jstr(json_t *j, const char *key)
{
    return json_string_value(json_object_get(j, key));
}

static void publish(moat_acme_order_t *o, moat_acme_chal_t type, const char *name,
                    const char *token, const char *ka)
{
    if (o->npub < MOAT_ARRAY_LEN(o->pub)) {
        o->pub[o->npub++] = (published_t){type, moat_xstrdup(name), moat_xstrdup(token)};
        o->io.challenge(o->io.data, type, name, token, ka);
    }
}

static void challenge_fire(void *arg)
{
    moat_acme_order_t *o = arg;
    o->pending--;
    if (o->cancelled || o->finished) {
        if (o->pending == 0)
            order_free(o);
        return;
    }
    post(o, S_CHALLENGE, o->chal_url, "{}");
}

/* One publication under way: which authorization it is for. */
typedef struct {
    moat_acme_order_t *o;
    size_t idx;
} dns_pub_t;

/* Every record is published and the authorizations are all fetched: answer the challenges. */
static void dns01_validate(moat_acme_order_t *o)
{
    o->dns_validating = 1;
    o->authz_i = 0;
    start_authz(o);
}

/* A DNS-01 record is in place (or could not be made): once all are, tell the CA. */
static void dns01_published(void *arg, int rc, const char *error)
{
    dns_pub_t *p = arg;
    moat_acme_order_t *o = p->o;
    size_t idx = p->idx;
    free(p);
    o->pending--;
    o->dns_inflight--;
    if (o->cancelled || o->finished) {
        if (o->pending == 0)
            order_free(o);
        return;
    }
    if (rc != 0) {
        fail(o, rc, "dns-01 for %s: %s", o->dns_name[idx] ? o->dns_name[idx] : "?",
             error ? error : moat_strerror(rc));
        return;
    }
    if (o->dns_collected && o->dns_inflight == 0)
        dns01_validate(o);
}

static void on_authz(moat_acme_order_t *o, const moat_httpc_response_t *r, json_t *j)
{
    (void)r;
    const char *status = jstr(j, "status");
    const char *name = jstr(json_object_get(j, "identifier"), "value");
    if (status && strcmp(status, "valid") == 0) {
        o->authz_i++;
        start_authz(o);
        return;
    }
    if (status == NULL || name == NULL || strcmp(status, "pending") != 0) {
        fail(o, MOAT_EIO, "authorization for %s is %s", name ? name : "?",
             status ? status : "malformed");
        return;
    }
    const char *want = moat_acme_chal_name(o->chal);
    json_t *chals = json_object_get(j, "challenges"), *c, *pick = NULL;
    size_t i;
    json_array_foreach(chals, i, c)
    {
        const char *t = jstr(c, "type");
        if (t && strcmp(t, want) == 0)
            pick = c;
    }
    const char *url = jstr(pick, "url"), *token = jstr(pick, "token");
    if (pick == NULL || url == NULL || token == NULL) {
        o->res.challenge_failed = 1;
        fail(o, MOAT_EIO, "the CA offers no %s challenge for %s", want, name);
        return;
    }
    char *ka = moat_acme_key_authorization(token, o->account);
    if (ka == NULL) {
        fail(o, MOAT_ECRYPTO, "cannot compute the key authorization");
        return;
    }
    free(o->authz_name);
    o->authz_name = moat_xstrdup(name);
    if (o->chal == MOAT_ACME_DNS01) {
        /* One TXT value per authorization; a wildcard and its base name share the record name
         * (the identifier of *.example.com is example.com), each with its own value, both in
         * the zone at once. */
        char *value = moat_acme_dns01_value(ka);
        free(ka);
        if (o->io.dns01_publish == NULL || o->npub >= MOAT_ARRAY_LEN(o->pub)) {
            free(value);
            fail(o, MOAT_EINVAL, "dns-01 for %s: %s", name,
                 o->io.dns01_publish ? "too many authorizations" : "no DNS provider is configured");
            return;
        }
        o->dns_chal[o->authz_i] = moat_xstrdup(url);
        o->dns_name[o->authz_i] = moat_xstrdup(name);
        o->pub[o->npub++] = (published_t){MOAT_ACME_DNS01, moat_xstrdup(name), value};
        MOAT_DEBUG("acme: answering dns-01 for %s", name);
        dns_pub_t *p = moat_xmalloc(sizeof *p);
        *p = (dns_pub_t){o, o->authz_i};
        o->pending++;
        o->dns_inflight++;
        o->io.dns01_publish(o->io.data, name, value, dns01_published, p);
        o->authz_i++;
        start_authz(o);
        return;
    }
    publish(o, o->chal, name, token, ka);
    free(ka);
    MOAT_DEBUG("acme: answering %s for %s", want, name);
    uint64_t wait = o->io.propagation_ms ? o->io.propagation_ms(o->io.data) : 0;
    if (wait > 0) {
        /* Other instances answer from storage: give them time to load the token before the
         * CA's validator may connect to them. */
        free(o->chal_url);
        o->chal_url = moat_xstrdup(url);
        o->pending++;
        o->io.after(o->io.data, wait, challenge_fire, o);
        return;
    }
    post(o, S_CHALLENGE, url, "{}");
}

static void start_authz(moat_acme_order_t *o)
{
    if (o->chal == MOAT_ACME_DNS01 && !o->dns_validating) {
        if (o->dns_chal == NULL) {
            o->dns_chal = moat_xcalloc(o->nauthz ? o->nauthz : 1, sizeof *o->dns_chal);
            o->dns_name = moat_xcalloc(o->nauthz ? o->nauthz : 1, sizeof *o->dns_name);
        }
        if (o->authz_i < o->nauthz) {
            post(o, S_AUTHZ, o->authz[o->authz_i], NULL);
            return;
        }
        /* Fetched them all: answer the challenges once every record is published. */
        o->dns_collected = 1;
        if (o->dns_inflight == 0)
            dns01_validate(o);
        return;
    }
    if (o->chal == MOAT_ACME_DNS01) {
        while (o->authz_i < o->nauthz && o->dns_chal[o->authz_i] == NULL)
            o->authz_i++; /* valid already */
        if (o->authz_i < o->nauthz) {
            o->poll_ms = POLL_FIRST_MS;
            o->polls = 0;
            free(o->authz_name);
            o->authz_name = moat_xstrdup(o->dns_name[o->authz_i]);
            post(o, S_CHALLENGE, o->dns_chal[o->authz_i], "{}");
            return;
        }
    }
    if (o->authz_i < o->nauthz) {
        o->poll_ms = POLL_FIRST_MS;
        o->polls = 0;
        post(o, S_AUTHZ, o->authz[o->authz_i], NULL);
        return;
    }
    /* Every name is authorized: a new key for the certificate (never the account's). */
    o->cert_key = moat_acme_key_new();
    char *csr =
        o->cert_key ? moat_acme_csr(o->cert_key, (const char *const *)o->names, o->nnames) : NULL;
    if (csr == NULL) {
        fail(o, MOAT_ECRYPTO, "cannot make the certificate request");
        return;
    }
    json_t *p = json_pack("{s:s}", "csr", csr);
    char *ps = json_dumps(p, JSON_COMPACT);
    json_decref(p);
    free(csr);
    o->poll_ms = POLL_FIRST_MS;
    o->polls = 0;
    post(o, S_FINALIZE, o->finalize_url, ps);
    free(ps);
}

/* The common name of the issuer of the last certificate in a PEM chain (the one closest to the
 * root), for preferred_chain. */
static int chain_matches(const char *pem, const char *want)
{
    BIO *bio = BIO_new_mem_buf(pem, -1);
    X509 *x, *last = NULL;
    while (bio && (x = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {
        X509_free(last);
        last = x;
    }
    BIO_free(bio);
    ERR_clear_error();
    int ok = 0;
    if (last) {
        char cn[256] = "";
        X509_NAME_get_text_by_NID(X509_get_issuer_name(last), NID_commonName, cn, sizeof cn);
        ok = strcmp(cn, want) == 0;
        if (!ok) {
            X509_NAME_get_text_by_NID(X509_get_subject_name(last), NID_commonName, cn, sizeof cn);
            ok = strcmp(cn, want) == 0;
        }
    }
    X509_free(last);
    return ok;
}

static void succeed(moat_acme_order_t *o, const char *chain)
{
    o->res.rc = 0;
    o->res.chain_pem = moat_xstrdup(chain);
    o->res.key_pem = moat_acme_key_pem(o->cert_key);
    if (o->res.key_pem == NULL) {
        fail(o, MOAT_ECRYPTO, "cannot encode the certificate key");
        return;
    }
    finish(o);
}

/* Link: <url>;rel="alternate" headers of a certificate response. */
static void collect_alternates(moat_acme_order_t *o, const moat_httpc_response_t *r)
{
    size_t idx = 0;
    const char *v;
    for (size_t from = 0; (v = moat_httpc_header(r, "Link", from, &idx)) != NULL; from = idx + 1) {
        /* A header may hold several comma-separated links. */
        const char *p = v;
        while ((p = strchr(p, '<')) != NULL) {
            const char *e = strchr(p, '>');
            if (e == NULL)
                break;
            const char *next = strchr(e, '<');
            size_t plen = next ? (size_t)(next - e) : strlen(e);
            char params[256];
            snprintf(params, sizeof params, "%.*s", (int)MOAT_MIN(plen, 255), e);
            if ((strstr(params, "rel=\"alternate\"") || strstr(params, "rel=alternate")) &&
                o->nalts < MAX_ALTERNATES)
                o->alts[o->nalts++] = moat_xstrndup(p + 1, (size_t)(e - p - 1));
            p = e;
        }
    }
}

static void send_new_order(moat_acme_order_t *o)
{
    json_t *ids = json_array();
    for (size_t i = 0; i < o->nnames; i++)
        json_array_append_new(ids, json_pack("{s:s,s:s}", "type", "dns", "value", o->names[i]));
    json_t *p = json_pack("{s:o}", "identifiers", ids);
    if (o->replaces)
        json_object_set_new(p, "replaces", json_string(o->replaces));
    char *ps = json_dumps(p, JSON_COMPACT);
    json_decref(p);
    post(o, S_ORDER, o->new_order, ps);
    free(ps);
}

/* describe_problem() starts its sentence with the short problem type. */
static int is_replaces_problem(const char *msg)
{
    return strncmp(msg, "alreadyReplaced:", 16) == 0 || strncmp(msg, "malformed:", 10) == 0;
}

/* --- one handler per state ---------------------------------------------------------------- *
 * Each gets a response that passed on_response()'s common checks (delivered, status < 400)
 * and its JSON body (NULL when there is none), which on_response() releases afterwards. */

static void on_directory(moat_acme_order_t *o, const moat_httpc_response_t *r, json_t *j)
{
    (void)r;
    const char *nn = jstr(j, "newNonce"), *na = jstr(j, "newAccount"), *no = jstr(j, "newOrder");
    if (!nn || !na || !no) {
        fail(o, MOAT_EPARSE, "%s is not an ACME directory", o->dir_url);
        return;
    }
    o->new_nonce = moat_xstrdup(nn);
    o->new_account = moat_xstrdup(na);
    o->new_order = moat_xstrdup(no);
    json_t *meta = json_object_get(j, "meta");
    if (json_is_true(json_object_get(meta, "externalAccountRequired")) && !o->eab_kid) {
        fail(o, MOAT_EINVAL,
             "%s requires external account binding: set eab_kid= and "
             "eab_hmac= on the site",
             o->dir_url);
        return;
    }
    get(o, S_NONCE, "HEAD", o->new_nonce);
}

static void on_nonce(moat_acme_order_t *o, const moat_httpc_response_t *r, json_t *j)
{
    (void)r;
    (void)j;
    if (o->nonce == NULL) {
        fail(o, MOAT_EPARSE, "the CA sent no Replay-Nonce");
        return;
    }
    json_t *p = json_object();
    json_object_set_new(p, "termsOfServiceAgreed", json_true());
    if (o->email && *o->email) {
        char mail[512];
        snprintf(mail, sizeof mail, "mailto:%s", o->email);
        json_object_set_new(p, "contact", json_pack("[s]", mail));
    }
    if (o->eab_kid && o->eab_hmac) {
        char *eab = moat_acme_eab(o->account, o->eab_kid, o->eab_hmac, o->new_account);
        json_t *e = eab ? json_loads(eab, 0, NULL) : NULL;
        free(eab);
        if (e == NULL) {
            json_decref(p);
            fail(o, MOAT_EINVAL, "eab_hmac is not valid base64url");
            return;
        }
        json_object_set_new(p, "externalAccountBinding", e);
    }
    char *ps = json_dumps(p, JSON_COMPACT);
    json_decref(p);
    post(o, S_ACCOUNT, o->new_account, ps);
    free(ps);
}

static void on_account(moat_acme_order_t *o, const moat_httpc_response_t *r, json_t *j)
{
    (void)j;
    const char *loc = moat_httpc_header(r, "Location", 0, NULL);
    if (loc == NULL) {
        fail(o, MOAT_EPARSE, "the CA returned no account URL");
        return;
    }
    o->kid = moat_xstrdup(loc);
    if (o->resume_url) /* POST-as-GET: what became of the order placed before the restart */
        post(o, S_RESUME, o->resume_url, NULL);
    else
        send_new_order(o);
}

/* Take the order object j at url as this order's, and work through its authorizations. */
static int adopt_order(moat_acme_order_t *o, const char *url, json_t *j)
{
    const char *fin = jstr(j, "finalize");
    json_t *az = json_object_get(j, "authorizations");
    if (url == NULL || fin == NULL || !json_is_array(az) || json_array_size(az) == 0)
        return MOAT_EPARSE;
    o->order_url = moat_xstrdup(url);
    o->finalize_url = moat_xstrdup(fin);
    o->nauthz = json_array_size(az);
    o->authz = moat_xcalloc(o->nauthz, sizeof *o->authz);
    for (size_t i = 0; i < o->nauthz; i++) {
        const char *u = json_string_value(json_array_get(az, i));
        o->authz[i] = moat_xstrdup(u ? u : "");
    }
    if (o->placed)
        o->placed(o->done_data, o->order_url);
    o->authz_i = 0;
    return 0;
}

static void on_order(moat_acme_order_t *o, const moat_httpc_response_t *r, json_t *j)
{
    if (adopt_order(o, moat_httpc_header(r, "Location", 0, NULL), j) != 0) {
        fail(o, MOAT_EPARSE, "the CA's order response is malformed");
        return;
    }
    MOAT_INFO("acme: order %s placed for %s", o->order_url, o->names[0]);
    start_authz(o);
}

/* The order placed before a restart: continued while it can still lead to a certificate with
 * a key this process holds, which is until it is finalized (the old key went with the old
 * process). The CA's word on its expiry is taken as is: an expired order is "invalid". */
static void on_resume(moat_acme_order_t *o, const moat_httpc_response_t *r, json_t *j)
{
    (void)r;
    const char *st = jstr(j, "status");
    if (st && (strcmp(st, "pending") == 0 || strcmp(st, "ready") == 0) &&
        adopt_order(o, o->resume_url, j) == 0) {
        MOAT_INFO("acme: continuing order %s for %s, placed before a restart (%s)", o->order_url,
                  o->names[0], st);
        start_authz(o);
        return;
    }
    MOAT_INFO("acme: the order placed before a restart is %s; placing a new one for %s",
              st ? st : "unreadable", o->names[0]);
    send_new_order(o);
}

/* The CA took the challenge: poll the authorization until it is decided. */
static void on_challenge(moat_acme_order_t *o, const moat_httpc_response_t *r, json_t *j)
{
    (void)j;
    o->state = S_AUTHZ_POLL;
    poll_later(o, r);
}

static void on_authz_poll(moat_acme_order_t *o, const moat_httpc_response_t *r, json_t *j)
{
    const char *st = jstr(j, "status");
    if (st && strcmp(st, "valid") == 0) {
        /* dns-01 records stay until the order ends: another authorization may be validating
         * the same name's other value right now. */
        if (o->chal != MOAT_ACME_DNS01)
            withdraw(o);
        o->authz_i++;
        start_authz(o);
        return;
    }
    if (st && strcmp(st, "pending") == 0) {
        poll_later(o, r);
        return;
    }
    /* invalid: the challenge's error says why. */
    char msg[1536] = "no reason given";
    size_t i;
    json_t *c;
    json_array_foreach(json_object_get(j, "challenges"), i, c)
    {
        json_t *e = json_object_get(c, "error");
        if (e)
            describe_problem(e, msg, sizeof msg, NULL, NULL);
    }
    o->res.challenge_failed = 1;
    fail(o, MOAT_EIO, "%s validation of %s failed: %s", moat_acme_chal_name(o->chal),
         o->authz_name ? o->authz_name : "?", msg);
}

/* The answer to finalize and to each poll of the order. */
static void on_order_status(moat_acme_order_t *o, const moat_httpc_response_t *r, json_t *j)
{
    const char *st = jstr(j, "status");
    const char *cert = jstr(j, "certificate");
    if (st && strcmp(st, "valid") == 0 && cert) {
        o->cert_url = moat_xstrdup(cert);
        post(o, S_CERT, o->cert_url, NULL);
        return;
    }
    if (st && (strcmp(st, "processing") == 0 || strcmp(st, "ready") == 0 ||
               strcmp(st, "pending") == 0 || strcmp(st, "valid") == 0)) {
        o->state = S_ORDER_POLL;
        poll_later(o, r);
        return;
    }
    char msg[1536] = "no reason given";
    json_t *e = json_object_get(j, "error");
    if (e)
        describe_problem(e, msg, sizeof msg, NULL, NULL);
    fail(o, MOAT_EIO, "the order became %s: %s", st ? st : "malformed", msg);
}

/* The default chain (S_CERT), then the alternates in turn (S_ALT) while a preferred chain is
 * asked for and not found; without a match the default chain wins. */
static void on_certificate(moat_acme_order_t *o, const moat_httpc_response_t *r, json_t *j)
{
    (void)j;
    if (r->body == NULL || strstr(r->body, "-----BEGIN CERTIFICATE-----") == NULL) {
        fail(o, MOAT_EPARSE, "the CA's certificate download is not PEM");
        return;
    }
    if (o->state == S_CERT) {
        collect_alternates(o, r);
        if (o->preferred == NULL || chain_matches(r->body, o->preferred)) {
            succeed(o, r->body);
            return;
        }
        o->first_chain = moat_xstrdup(r->body);
    } else if (chain_matches(r->body, o->preferred)) {
        succeed(o, r->body);
        return;
    }
    if (o->alt_i < o->nalts) {
        post(o, S_ALT, o->alts[o->alt_i++], NULL);
        return;
    }
    MOAT_WARN("acme: no chain issued by \"%s\" is offered; using the default chain", o->preferred);
    char *first = o->first_chain;
    o->first_chain = NULL;
    succeed(o, first);
    free(first);
}

typedef void (*state_handler_fn)(moat_acme_order_t *o, const moat_httpc_response_t *r, json_t *j);

static const state_handler_fn state_handlers[] = {
    [S_DIR] = on_directory,         [S_NONCE] = on_nonce,
    [S_ACCOUNT] = on_account,       [S_ORDER] = on_order,
    [S_RESUME] = on_resume,         [S_AUTHZ] = on_authz,
    [S_CHALLENGE] = on_challenge,   [S_AUTHZ_POLL] = on_authz_poll,
    [S_FINALIZE] = on_order_status, [S_ORDER_POLL] = on_order_status,
    [S_CERT] = on_certificate,      [S_ALT] = on_certificate,
};

/* A status >= 400: a badNonce is resent with the fresh nonce, a refused "replaces" is
 * ordered again without it, anything else ends the order with the CA's problem. */
static void on_problem(moat_acme_order_t *o, const moat_httpc_response_t *r, json_t *j)
{
    char msg[1536];
    int rl = 0, bn = 0;
    if (j)
        describe_problem(j, msg, sizeof msg, &rl, &bn);
    else
        snprintf(msg, sizeof msg, "HTTP %d", r->status);
    if (bn && o->state != S_DIR && o->state != S_NONCE && o->nonce &&
        ++o->bad_nonces <= MAX_BAD_NONCE) {
        MOAT_DEBUG("acme: badNonce from %s; retrying with the fresh nonce", o->req_url);
        send_post(o);
        return;
    }
    if (o->state == S_RESUME) {
        /* Gone (404), or not this account's: start afresh. */
        MOAT_INFO("acme: the order placed before a restart cannot be continued (%s); placing a "
                  "new one for %s",
                  msg, o->names[0]);
        send_new_order(o);
        return;
    }
    if (o->state == S_ORDER && o->replaces && is_replaces_problem(msg)) {
        /* RFC 9773 §5: the CA may refuse "replaces" (already replaced, or not one of its
         * certificates); the renewal itself should still happen. */
        MOAT_WARN("acme: the CA refused \"replaces\" (%s); ordering without it", msg);
        free(o->replaces);
        o->replaces = NULL;
        send_new_order(o);
        return;
    }
    o->res.rate_limited = rl;
    o->res.retry_after = moat_acme_parse_retry_after(moat_httpc_header(r, "Retry-After", 0, NULL),
                                                     (int64_t)time(NULL));
    fail(o, MOAT_EIO, "%s (HTTP %d from %s)", msg, r->status,
         o->state == S_DIR || o->state == S_NONCE ? o->dir_url : o->req_url);
}

/* What every response needs before its state's handler sees it: a cancelled order is freed,
 * a transport error ends the order, the nonce is kept for the next request. */
static void on_response(void *data, const moat_httpc_response_t *r)
{
    moat_acme_order_t *o = data;
    o->pending--;
    if (o->cancelled || o->finished) {
        if (o->pending == 0)
            order_free(o);
        return;
    }
    if (r->err != 0) {
        const char *why = r->err == MOAT_EUPSTREAM ? "connection failed"
                          : r->err == MOAT_ETLS
                              ? "TLS handshake failed (is the CA's certificate trusted? see "
                                "--acme-ca-root)"
                              : moat_strerror(r->err);
        fail(o, r->err, "cannot reach the CA at %s: %s", o->dir_url, why);
        return;
    }
    const char *nonce = moat_httpc_header(r, "Replay-Nonce", 0, NULL);
    if (nonce) {
        free(o->nonce);
        o->nonce = moat_xstrdup(nonce);
    }
    json_t *j = NULL;
    const char *ct = moat_httpc_header(r, "Content-Type", 0, NULL);
    if (r->body_len && ct && (strstr(ct, "json") != NULL))
        j = json_loadb(r->body, r->body_len, 0, NULL);
    /* The handler may finish (and free) the order; j is ours either way. */
    if (r->status >= 400)
        on_problem(o, r, j);
    else
        state_handlers[o->state](o, r, j);
    json_decref(j);
}

static void start_fire(void *arg)
{
    moat_acme_order_t *o = arg;
    o->pending--;
    if (o->cancelled) {
        if (o->pending == 0)
            order_free(o);
        return;
    }
    get(o, S_DIR, "GET", o->dir_url);
}

static char *dup_or_null(const char *s)
{
    return s && *s ? moat_xstrdup(s) : NULL;
}

moat_acme_order_t *moat_acme_order_start(const moat_acme_io_t *io,
                                         const moat_acme_order_opts_t *opts, moat_acme_done_cb done,
                                         void *data)
{
    moat_acme_order_t *o = moat_xcalloc(1, sizeof *o);
    o->io = *io;
    o->done = done;
    o->done_data = data;
    o->dir_url = moat_xstrdup(opts->directory_url);
    o->email = dup_or_null(opts->email);
    o->eab_kid = dup_or_null(opts->eab_kid);
    o->eab_hmac = dup_or_null(opts->eab_hmac);
    o->preferred = dup_or_null(opts->preferred_chain);
    o->replaces = dup_or_null(opts->replaces);
    o->resume_url = dup_or_null(opts->resume_url);
    o->placed = opts->placed;
    o->names = moat_xcalloc(opts->nnames ? opts->nnames : 1, sizeof *o->names);
    for (size_t i = 0; i < opts->nnames; i++)
        o->names[i] = moat_xstrdup(opts->names[i]);
    o->nnames = opts->nnames;
    EVP_PKEY_up_ref(opts->account_key);
    o->account = opts->account_key;
    o->chal = opts->challenge;
    /* Start from a timer so that `done` never runs inside this call. */
    o->pending++;
    o->io.after(o->io.data, 0, start_fire, o);
    return o;
}

void moat_acme_order_cancel(moat_acme_order_t *o)
{
    if (o == NULL)
        return;
    /* After `done` has run the order belongs to nobody: callers must not cancel it then. */
    o->cancelled = 1;
    finish(o);
}

/* --- renewalInfo (RFC 9773) ------------------------------------------------------------------ */

struct moat_acme_ari_fetch {
    moat_acme_io_t io;
    moat_acme_ari_cb done;
    void *data;
    char *dir_url, *cert_id;
    int state, pending, cancelled;
    moat_acme_ari_result_t res;
};

static void ari_free(moat_acme_ari_fetch_t *f)
{
    free(f->dir_url);
    free(f->cert_id);
    moat_acme_ari_clear(&f->res.ari);
    free(f->res.error);
    free(f);
}

static void ari_finish(moat_acme_ari_fetch_t *f, int rc, const char *error)
{
    f->res.rc = rc;
    if (error)
        f->res.error = moat_xstrdup(error);
    f->done(f->data, &f->res);
    ari_free(f);
}

static void ari_on_response(void *data, const moat_httpc_response_t *r);

static void ari_get(moat_acme_ari_fetch_t *f, const char *url)
{
    f->pending++;
    int rc = f->io.request(f->io.data, "GET", url, NULL, NULL, ari_on_response, f);
    if (rc < 0) {
        f->pending--;
        char msg[512];
        snprintf(msg, sizeof msg, "cannot send a request to %s: %s", url, moat_strerror(rc));
        ari_finish(f, rc, msg);
    }
}

static void ari_on_response(void *data, const moat_httpc_response_t *r)
{
    moat_acme_ari_fetch_t *f = data;
    f->pending--;
    if (f->cancelled) {
        ari_free(f);
        return;
    }
    char msg[512];
    if (r->err != 0 || r->status != 200) {
        if (r->err != 0)
            snprintf(msg, sizeof msg, "cannot reach the CA at %s: %s", f->dir_url,
                     moat_strerror(r->err));
        else
            snprintf(msg, sizeof msg, "HTTP %d from the CA's %s", r->status,
                     f->state == 0 ? "directory" : "renewalInfo");
        f->res.retry_after = moat_acme_parse_retry_after(
            moat_httpc_header(r, "Retry-After", 0, NULL), (int64_t)time(NULL));
        ari_finish(f, r->err ? r->err : MOAT_EIO, msg);
        return;
    }
    if (f->state == 0) {
        json_t *j = json_loadb(r->body, r->body_len, 0, NULL);
        const char *ri = jstr(j, "renewalInfo");
        if (ri == NULL || *ri == '\0') {
            json_decref(j);
            ari_finish(f, 0, NULL); /* no ARI: supported stays 0 */
            return;
        }
        f->res.supported = 1;
        size_t ul = strlen(ri) + strlen(f->cert_id) + 2;
        char *url = moat_xmalloc(ul);
        snprintf(url, ul, "%s%s%s", ri, ri[strlen(ri) - 1] == '/' ? "" : "/", f->cert_id);
        json_decref(j);
        f->state = 1;
        ari_get(f, url);
        free(url);
        return;
    }
    f->res.retry_after = moat_acme_parse_retry_after(moat_httpc_header(r, "Retry-After", 0, NULL),
                                                     (int64_t)time(NULL));
    if (moat_acme_ari_parse(r->body, r->body_len, &f->res.ari) != 0) {
        ari_finish(f, MOAT_EPARSE, "the CA's renewalInfo has no valid suggestedWindow");
        return;
    }
    ari_finish(f, 0, NULL);
}

static void ari_start_fire(void *arg)
{
    moat_acme_ari_fetch_t *f = arg;
    f->pending--;
    if (f->cancelled) {
        if (f->pending == 0)
            ari_free(f);
        return;
    }
    ari_get(f, f->dir_url);
}

moat_acme_ari_fetch_t *moat_acme_ari_fetch(const moat_acme_io_t *io, const char *directory_url,
                                           const char *cert_id, moat_acme_ari_cb done, void *data)
{
    moat_acme_ari_fetch_t *f = moat_xcalloc(1, sizeof *f);
    f->io = *io;
    f->done = done;
    f->data = data;
    f->dir_url = moat_xstrdup(directory_url);
    f->cert_id = moat_xstrdup(cert_id);
    f->pending++;
    f->io.after(f->io.data, 0, ari_start_fire, f);
    return f;
}

void moat_acme_ari_fetch_cancel(moat_acme_ari_fetch_t *f)
{
    if (f == NULL)
        return;
    /* At most one timer or request is pending at a time; it frees the fetch when it returns. */
    f->cancelled = 1;
}
