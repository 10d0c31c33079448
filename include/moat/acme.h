/* ACME (RFC 8555): JWS signing, challenge material, renewal arithmetic and the client state
 * machine. Everything here runs on the control thread except the challenge lookups, which
 * workers call during a request or a handshake (they take one small mutex).
 *
 * acme/ never does I/O itself: the client is handed an HTTP client and a timer through
 * moat_acme_io_t, and publishes challenge answers through the same struct. */
#ifndef MOAT_ACME_H
#define MOAT_ACME_H

#include "moat/common.h"
#include "moat/httpclient.h"
#include <stddef.h>
#include <stdint.h>

typedef struct ssl_st SSL;
typedef struct evp_pkey_st EVP_PKEY;

#define MOAT_ACME_LE_PRODUCTION "https://acme-v02.api.letsencrypt.org/directory"
#define MOAT_ACME_LE_STAGING    "https://acme-staging-v02.api.letsencrypt.org/directory"

/* --- JWS (acme/jws.c) ---------------------------------------------------------------------- */

/* base64url without padding of in[0..len): a new NUL-terminated string (free()). */
char *moat_b64url(const void *in, size_t len);
/* Decode base64url (padding optional); returns the length or -1. out needs len*3/4+3 bytes. */
long moat_b64url_decode(const char *in, size_t len, uint8_t *out);

/* A new P-256 key, and PEM (PKCS#8) in and out. NULL / MOAT_ECRYPTO on failure. */
EVP_PKEY *moat_acme_key_new(void);
char *moat_acme_key_pem(EVP_PKEY *k); /* free() */
EVP_PKEY *moat_acme_key_from_pem(const char *pem);

/* The JWK of the key's public half as canonical JSON ({"crv","kty","x","y"} in that order,
 * RFC 7638), and its SHA-256 thumbprint, base64url. Both free(). */
char *moat_acme_jwk(EVP_PKEY *k);
char *moat_acme_thumbprint(EVP_PKEY *k);

/* ES256 signature of data: the raw 64-byte r||s form JWS requires (RFC 7518 §3.4), not DER.
 * Returns 0 or MOAT_ECRYPTO. */
int moat_acme_es256_sign(EVP_PKEY *k, const void *data, size_t len, uint8_t sig[64]);
/* Verify such a signature (tests). 1 valid, 0 not. */
int moat_acme_es256_verify(EVP_PKEY *k, const void *data, size_t len, const uint8_t sig[64]);

/* A flattened JWS (RFC 7515 §7.2.2) for an ACME POST: protected header {alg, jwk|kid, nonce,
 * url}, payload (NULL means the empty POST-as-GET payload). kid NULL puts the JWK in. */
char *moat_acme_jws(EVP_PKEY *k, const char *kid, const char *nonce, const char *url,
                    const char *payload);
/* The externalAccountBinding object (RFC 8555 §7.3.4): an HS256 JWS over the account JWK.
 * hmac_b64url is the CA's key as given (base64url). NULL when it does not decode. */
char *moat_acme_eab(EVP_PKEY *account, const char *eab_kid, const char *hmac_b64url,
                    const char *url);

/* The key authorization token "." thumbprint (free()). */
char *moat_acme_key_authorization(const char *token, EVP_PKEY *account);

/* A DER CSR (base64url, free()) for names with key k; the first name is the CN. */
char *moat_acme_csr(EVP_PKEY *k, const char *const *names, size_t n);

/* --- challenges (acme/challenge.c) ----------------------------------------------------------- */

/* HTTP-01 answers. Set (key_auth non-NULL) or remove a token. The table is process-wide and
 * tiny (pending tokens only); workers read it under a mutex. */
int moat_acme_http01_set(const char *token, const char *key_auth);
/* Copy the key authorization for token[0..len) into out (NUL-terminated); returns its length,
 * or -1 when the token is unknown or out is too small. Any thread. */
int moat_acme_http01_get(const char *token, size_t len, char *out, size_t cap);

/* TLS-ALPN-01 (RFC 8737): the self-signed certificate for `name` with the critical
 * acmeIdentifier extension holding SHA-256(key_auth). Returns 0 with *cert_der (free()) and
 * the key's PEM in *key_pem (free()), or MOAT_ECRYPTO. */
int moat_acme_alpn_cert(const char *name, const char *key_auth, uint8_t **cert_der,
                        size_t *cert_len, char **key_pem);
/* Publish (key_auth non-NULL) or withdraw the TLS-ALPN-01 certificate for name. */
int moat_acme_alpn01_set(const char *name, const char *key_auth);
/* For a ClientHello that offers ALPN acme-tls/1 for `sni`: install the challenge
 * certificate on ssl. 0 when installed, MOAT_ENOT_FOUND when none is pending. Any thread. */
int moat_acme_alpn01_install(SSL *ssl, const char *sni);
/* Withdraw everything (at exit; frees the table). */
void moat_acme_challenges_clear(void);

/* --- renewal arithmetic (acme/renew.c) ------------------------------------------------------ */

#define MOAT_ACME_BACKOFF_MIN 60
#define MOAT_ACME_BACKOFF_MAX (6 * 3600)

/* When to renew a certificate valid [not_before, not_after): when a third of its lifetime is
 * left. With an ARI window (start/end non-zero) a time inside the window wins, chosen as the
 * window start plus `jitter` (0..1) of its length. */
int64_t moat_acme_renew_at(int64_t not_before, int64_t not_after, int64_t ari_start,
                           int64_t ari_end, double jitter);
/* Delay in seconds before the attempt after `failures` consecutive failures (>= 1): 60 s
 * doubling to 6 h. retry_after (seconds, 0 none) wins when longer; rate_limited without
 * Retry-After waits at least an hour. */
int64_t moat_acme_backoff(int failures, int64_t retry_after, int rate_limited);
/* Parse a Retry-After value (delta seconds or an HTTP date) against now: seconds to wait, 0
 * when absent or unparseable. */
int64_t moat_acme_parse_retry_after(const char *v, int64_t now);

/* --- ACME Renewal Information, RFC 9773 (acme/renew.c) ---------------------------------------- */

#define MOAT_ACME_ARI_POLL_DEFAULT (6 * 3600)
#define MOAT_ACME_ARI_POLL_MIN     60
#define MOAT_ACME_ARI_POLL_MAX     86400

/* The ARI certificate identifier (RFC 9773 §4.1): base64url(AKI keyIdentifier) "."
 * base64url(serial DER content octets), no padding. A new string (free()), or NULL when the
 * certificate has no authority key identifier. _pem takes the leaf (first) of a PEM chain. */
char *moat_acme_ari_cert_id(const uint8_t *aki, size_t aki_len, const uint8_t *serial,
                            size_t serial_len);
char *moat_acme_ari_cert_id_pem(const char *cert_pem);
/* An RFC 3339 date-time ("2025-01-02T04:00:00Z", fractions and offsets allowed) as Unix
 * seconds; -1 when malformed. */
int64_t moat_acme_parse_rfc3339(const char *s);

/* A renewalInfo response: the suggested window and the optional explanation URL. */
typedef struct {
    int64_t start, end;
    char *explanation_url; /* free() via moat_acme_ari_clear */
} moat_acme_ari_t;
/* Parse a renewalInfo body. 0, or MOAT_EPARSE when the window is missing, malformed or has
 * end before start (RFC 9773 §4.2: then the client ignores it). */
int moat_acme_ari_parse(const char *body, size_t len, moat_acme_ari_t *out);
void moat_acme_ari_clear(moat_acme_ari_t *a);
/* Seconds until the next renewalInfo poll: the Retry-After (0 none: 6 h), kept within
 * 1 min..1 day. */
int64_t moat_acme_ari_poll_delay(int64_t retry_after);
/* A jitter in [0, 1) that depends only on the certificate identifier, so the time picked
 * inside a window is the same on every check and in every process sharing the store. */
double moat_acme_ari_jitter(const char *cert_id);

/* --- the client (acme/client.c) ------------------------------------------------------------ */

typedef enum {
    MOAT_ACME_HTTP01 = 0,
    MOAT_ACME_TLSALPN01 = 1,
    MOAT_ACME_DNS01 = 2, /* needs io.dns01_publish; never a fallback for the other two */
} moat_acme_chal_t;

/* "http-01", "tls-alpn-01", "dns-01". Static. */
const char *moat_acme_chal_name(moat_acme_chal_t c);
/* The DNS-01 TXT value for a key authorization: base64url(SHA-256(key_auth)) (RFC 8555 §8.4).
 * free(). */
char *moat_acme_dns01_value(const char *key_auth);
/* How a DNS-01 publication ended: rc 0 when the record is in place and the zone's
 * authoritative servers answer it; else a negative code and a sentence in error. */
typedef void (*moat_acme_dns01_cb)(void *arg, int rc, const char *error);

/* The environment an order runs in. All callbacks run on the control loop. */
typedef struct {
    void *data;
    /* Start an HTTP request; exactly one cb call follows unless this returns < 0. */
    int (*request)(void *data, const char *method, const char *url, const char *content_type,
                   const char *body, moat_httpc_cb cb, void *cb_data);
    /* Call cb(arg) after ms milliseconds. */
    void (*after)(void *data, uint64_t ms, void (*cb)(void *arg), void *arg);
    /* Publish (key_auth non-NULL) or withdraw a challenge answer. */
    void (*challenge)(void *data, moat_acme_chal_t type, const char *name, const char *token,
                      const char *key_auth);
    /* Optional: milliseconds to wait after publishing an answer before telling the CA, so
     * that other instances sharing the storage have picked it up. NULL means none. */
    uint64_t (*propagation_ms)(void *data);
    /* DNS-01 only: create the TXT record _acme-challenge.<name> = value and wait until it is
     * visible; cb runs exactly once, never inside this call. The record is withdrawn through
     * `challenge` (type MOAT_ACME_DNS01, token = value, key_auth NULL), also when the publication
     * is still under way or failed (whatever part of it was made is then removed). */
    void (*dns01_publish)(void *data, const char *name, const char *value, moat_acme_dns01_cb cb,
                          void *arg);
} moat_acme_io_t;

typedef struct {
    const char *directory_url;
    const char *const *names;
    size_t nnames;
    EVP_PKEY *account_key; /* borrowed */
    const char *email;     /* may be NULL */
    const char *eab_kid, *eab_hmac;
    const char *preferred_chain; /* issuer CN of the chain's top certificate, or NULL */
    moat_acme_chal_t challenge;
    /* ARI certificate identifier of the certificate this order replaces, or NULL. When the CA
     * refuses it (alreadyReplaced, malformed) the newOrder is sent once more without it. */
    const char *replaces;
    /* An order placed earlier for these names on this CA and not seen through (the process
     * was killed, or restarted, in the middle), or NULL. It is continued while the CA still
     * has it pending or ready (authorizations already won are not asked again); otherwise
     * (gone, expired, invalid, or finalized with a key that went with the old process) a new
     * order is placed. */
    const char *resume_url;
    /* Optional, with done's data: the CA accepted a new order at order_url (or a resumed one
     * is being continued). The caller keeps the URL to pass as resume_url after a restart. */
    void (*placed)(void *data, const char *order_url);
} moat_acme_order_opts_t;

/* What an order ended with. On success chain_pem/key_pem are set. On failure `error` is a
 * sentence with the CA's problem (type, detail, subproblems) and the flags say why. */
typedef struct {
    int rc; /* 0 or a negative MOAT_E* code */
    char *chain_pem, *key_pem;
    char *error;
    char *account_url;
    int64_t retry_after;  /* seconds, 0 none */
    int rate_limited;     /* the CA said rateLimited */
    int challenge_failed; /* validation failed: the other challenge type may work */
    moat_acme_chal_t challenge;
} moat_acme_result_t;

typedef void (*moat_acme_done_cb)(void *data, moat_acme_result_t *res);

typedef struct moat_acme_order moat_acme_order_t;

/* Start an order; `done` is called exactly once (never from inside this call) unless the order
 * is cancelled first. The options are copied. */
moat_acme_order_t *moat_acme_order_start(const moat_acme_io_t *io,
                                         const moat_acme_order_opts_t *opts, moat_acme_done_cb done,
                                         void *data);
/* Stop an order: `done` is not called; memory is released once pending I/O returns. */
void moat_acme_order_cancel(moat_acme_order_t *o);
void moat_acme_result_clear(moat_acme_result_t *r);

/* Ask the CA for renewal information: GET the directory and, when it has "renewalInfo",
 * GET renewalInfo/<cert_id> (both unauthenticated). `done` runs exactly once (never from
 * inside this call) unless cancelled first. */
typedef struct {
    int rc;              /* 0 or a negative MOAT_E* code (the CA unreachable, a bad window) */
    int supported;       /* the directory has renewalInfo */
    moat_acme_ari_t ari; /* valid when rc == 0 and supported */
    int64_t retry_after; /* seconds from the renewalInfo response, 0 none */
    char *error;         /* a sentence when rc != 0 */
} moat_acme_ari_result_t;
typedef void (*moat_acme_ari_cb)(void *data, moat_acme_ari_result_t *res);
typedef struct moat_acme_ari_fetch moat_acme_ari_fetch_t;
moat_acme_ari_fetch_t *moat_acme_ari_fetch(const moat_acme_io_t *io, const char *directory_url,
                                           const char *cert_id, moat_acme_ari_cb done, void *data);
void moat_acme_ari_fetch_cancel(moat_acme_ari_fetch_t *f);

#endif
