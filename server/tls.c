/* The BoringSSL server context (include/moat/tls.h). */
#include "moat/tls.h"
#include "moat/acme.h"
#include "moat/certs.h"
#include "moat/common.h"
#include "moat/log.h"

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/mem.h>
#include <openssl/rand.h>
#include <openssl/ssl.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

/* TLS 1.2 only: forward secrecy and AEAD. Brackets are BoringSSL equal-preference groups, so a
 * client without AES hardware can pick ChaCha20 at the same rank. TLS 1.3 suites are fixed by
 * BoringSSL (all AEAD). */
static const char cipher_list[] = "[ECDHE-ECDSA-AES128-GCM-SHA256|ECDHE-ECDSA-CHACHA20-POLY1305]:"
                                  "[ECDHE-RSA-AES128-GCM-SHA256|ECDHE-RSA-CHACHA20-POLY1305]:"
                                  "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384";

/* Session lifetime; matches what the ticket-key ring can still decrypt (see rotate). */
#define SESSION_TIMEOUT_S 7200

/* --- session ticket keys ---------------------------------------------------------------- */

typedef struct {
    uint8_t name[16];
    uint8_t aes[32];
    uint8_t hmac[32];
} ticket_key_t;

/* k[0] encrypts new tickets; k[1..n-1] only decrypt. Never changes after moat_tls_keys_new:
 * a rotation is a new set, published to the workers like any other snapshot. */
#define TICKET_KEYS 3
struct moat_tls_keys {
    atomic_size_t refs;
    size_t n;
    ticket_key_t k[TICKET_KEYS];
};

/* What this thread's handshakes read (moat_tls_thread_use). A worker sets both between
 * events, and the objects stay alive until it sets others, so callbacks read them without a
 * lock or a reference. */
static _Thread_local const moat_certs_t *thread_certs;
static _Thread_local const moat_tls_keys_t *thread_keys;

moat_tls_keys_t *moat_tls_keys_new(const moat_tls_keys_t *prev)
{
    moat_tls_keys_t *ks = moat_xcalloc(1, sizeof *ks);
    atomic_init(&ks->refs, 1);
    RAND_bytes(ks->k[0].name, sizeof ks->k[0].name);
    RAND_bytes(ks->k[0].aes, sizeof ks->k[0].aes);
    RAND_bytes(ks->k[0].hmac, sizeof ks->k[0].hmac);
    ks->n = 1;
    for (size_t i = 0; prev != NULL && i < prev->n && ks->n < TICKET_KEYS; i++)
        ks->k[ks->n++] = prev->k[i];
    return ks;
}

_Static_assert(sizeof(ticket_key_t) == MOAT_TLS_KEY_BYTES, "a key is name, AES and HMAC keys");

size_t moat_tls_keys_export(const moat_tls_keys_t *ks, uint8_t *out, size_t cap)
{
    if (ks == NULL || cap < ks->n * sizeof(ticket_key_t))
        return 0;
    memcpy(out, ks->k, ks->n * sizeof(ticket_key_t));
    return ks->n * sizeof(ticket_key_t);
}

moat_tls_keys_t *moat_tls_keys_import(const uint8_t *raw, size_t len)
{
    if (len == 0 || len % sizeof(ticket_key_t) != 0 || len / sizeof(ticket_key_t) > TICKET_KEYS)
        return NULL;
    moat_tls_keys_t *ks = moat_xcalloc(1, sizeof *ks);
    atomic_init(&ks->refs, 1);
    ks->n = len / sizeof(ticket_key_t);
    memcpy(ks->k, raw, len);
    return ks;
}

moat_tls_keys_t *moat_tls_keys_ref(moat_tls_keys_t *ks)
{
    if (ks != NULL)
        atomic_fetch_add_explicit(&ks->refs, 1, memory_order_relaxed);
    return ks;
}

void moat_tls_keys_release(moat_tls_keys_t *ks)
{
    if (ks != NULL && atomic_fetch_sub_explicit(&ks->refs, 1, memory_order_acq_rel) == 1) {
        OPENSSL_cleanse(ks, sizeof *ks);
        free(ks);
    }
}

void moat_tls_thread_use(const moat_certs_t *certs, const moat_tls_keys_t *keys)
{
    thread_certs = certs;
    thread_keys = keys;
}

/* BoringSSL's ticket callback: encrypt mode returns 1 or -1; decrypt mode returns 1 (ok),
 * 2 (ok, re-issue under the current key), 0 (unknown key: full handshake) or -1. */
static int ticket_cb(SSL *ssl, uint8_t *key_name, uint8_t *iv, EVP_CIPHER_CTX *cctx, HMAC_CTX *hctx,
                     int encrypt)
{
    (void)ssl;
    const moat_tls_keys_t *ks = thread_keys;
    if (ks == NULL)
        return encrypt ? -1 : 0;
    const ticket_key_t *k = NULL;
    size_t idx = 0;
    if (encrypt) {
        k = &ks->k[0];
    } else {
        for (size_t i = 0; i < ks->n && k == NULL; i++) {
            if (CRYPTO_memcmp(ks->k[i].name, key_name, 16) == 0) {
                k = &ks->k[i];
                idx = i;
            }
        }
        if (k == NULL)
            return 0;
    }

    int ok;
    if (encrypt) {
        memcpy(key_name, k->name, sizeof k->name);
        ok = RAND_bytes(iv, EVP_CIPHER_iv_length(EVP_aes_256_cbc())) &&
             EVP_EncryptInit_ex(cctx, EVP_aes_256_cbc(), NULL, k->aes, iv);
    } else {
        ok = EVP_DecryptInit_ex(cctx, EVP_aes_256_cbc(), NULL, k->aes, iv);
    }
    ok = ok && HMAC_Init_ex(hctx, k->hmac, sizeof k->hmac, EVP_sha256(), NULL);
    if (!ok)
        return -1;
    return encrypt ? 1 : (idx == 0 ? 1 : 2);
}

/* --- ALPN -------------------------------------------------------------------------------- */

#define MAX_ALPN 8

/* Per-connection marks (SSL ex_data): the local address, an unknown SNI name to refuse, and a
 * TLS-ALPN-01 validation connection. Per-context: the ALPN preference list. */
static int ex_local_addr = -1, ex_refused = -1, ex_acme = -1, ex_ctx_alpn = -1;
static char refused_marker, acme_marker;

/* A context's preference list, copied from the defaults when the context is made and never
 * changed afterwards: the ALPN callback reads it on every handshake without a lock. */
typedef struct {
    size_t n;
    const char *p[MAX_ALPN];
} alpn_list_t;

/* Protocol names are interned forever so that lists and moat_tls_selected_alpn can hand out
 * stable pointers. Written only by moat_tls_set_alpn, before any context exists. */
static const char *interned[32] = {"http/1.1", "h2", "acme-tls/1"};
static size_t ninterned = 3;
#define NBUILTIN 3
static alpn_list_t alpn_defaults = {1, {"http/1.1"}};

static const char *intern(const char *p)
{
    for (size_t i = 0; i < ninterned; i++)
        if (strcmp(interned[i], p) == 0)
            return interned[i];
    if (ninterned == MOAT_ARRAY_LEN(interned))
        return NULL;
    return interned[ninterned++] = moat_xstrdup(p);
}

void moat_tls_set_alpn(const char *const *protos, size_t n)
{
    alpn_defaults.n = 0;
    for (size_t i = 0; i < n && alpn_defaults.n < MAX_ALPN; i++) {
        size_t len = strlen(protos[i]);
        const char *p = (len > 0 && len < 256) ? intern(protos[i]) : NULL;
        if (p != NULL)
            alpn_defaults.p[alpn_defaults.n++] = p;
    }
}

static void alpn_list_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int index, long argl,
                           void *argp)
{
    (void)parent;
    (void)ad;
    (void)index;
    (void)argl;
    (void)argp;
    free(ptr);
}

/* Server preference: the first of our protocols that the client offered wins. */
static int alpn_cb(SSL *ssl, const uint8_t **out, uint8_t *outlen, const uint8_t *in,
                   unsigned inlen, void *arg)
{
    const alpn_list_t *prefs = arg;
    if (SSL_get_ex_data(ssl, ex_acme) != NULL) {
        for (unsigned off = 0; off < inlen;) {
            unsigned l = in[off];
            if (l == 0 || off + 1 + l > inlen)
                break;
            if (l == 10 && memcmp(in + off + 1, "acme-tls/1", 10) == 0) {
                *out = in + off + 1;
                *outlen = (uint8_t)l;
                return SSL_TLSEXT_ERR_OK;
            }
            off += 1 + l;
        }
        return SSL_TLSEXT_ERR_ALERT_FATAL;
    }
    for (size_t i = 0; i < prefs->n; i++) {
        size_t plen = strlen(prefs->p[i]);
        for (unsigned off = 0; off < inlen;) {
            unsigned l = in[off];
            if (l == 0 || off + 1 + l > inlen)
                break;
            if (l == plen && memcmp(in + off + 1, prefs->p[i], plen) == 0) {
                *out = in + off + 1;
                *outlen = (uint8_t)l;
                return SSL_TLSEXT_ERR_OK;
            }
            off += 1 + l;
        }
    }
    return SSL_TLSEXT_ERR_NOACK;
}

const char *moat_tls_selected_alpn(const SSL *ssl)
{
    const uint8_t *p;
    unsigned len;
    SSL_get0_alpn_selected(ssl, &p, &len);
    if (len == 0)
        return NULL;
    /* The context's own list, then the built-in names, which never change: nothing here reads
     * what moat_tls_set_alpn writes. */
    const alpn_list_t *prefs = SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), ex_ctx_alpn);
    for (size_t i = 0; prefs != NULL && i < prefs->n; i++)
        if (strlen(prefs->p[i]) == len && memcmp(prefs->p[i], p, len) == 0)
            return prefs->p[i];
    for (size_t i = 0; i < NBUILTIN; i++)
        if (strlen(interned[i]) == len && memcmp(interned[i], p, len) == 0)
            return interned[i];
    return NULL;
}

/* --- certificate selection ---------------------------------------------------------------- */

static pthread_once_t ex_once = PTHREAD_ONCE_INIT;

static void ex_init(void)
{
    ex_local_addr = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
    ex_refused = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
    ex_acme = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
    ex_ctx_alpn = SSL_CTX_get_ex_new_index(0, NULL, NULL, NULL, alpn_list_free);
}

/* Whether the ClientHello's ALPN list offers `proto`. */
static int offers_alpn(const SSL_CLIENT_HELLO *ch, const char *proto)
{
    const uint8_t *p;
    size_t len, plen = strlen(proto);
    if (!SSL_early_callback_ctx_extension_get(
            ch, TLSEXT_TYPE_application_layer_protocol_negotiation, &p, &len) ||
        len < 2)
        return 0;
    size_t off = 2, end = MOAT_MIN(len, 2 + ((size_t)p[0] << 8 | p[1]));
    while (off < end) {
        size_t l = p[off];
        if (l == 0 || off + 1 + l > end)
            return 0;
        if (l == plen && memcmp(p + off + 1, proto, plen) == 0)
            return 1;
        off += 1 + l;
    }
    return 0;
}

int moat_tls_set_local_addr(SSL *ssl, const struct sockaddr *sa)
{
    pthread_once(&ex_once, ex_init);
    return SSL_set_ex_data(ssl, ex_local_addr, (void *)sa) ? 0 : MOAT_ETLS;
}

/* The local address as text (inet_ntop form, IPv4-mapped IPv6 shown as IPv4), or NULL. */
static const char *local_ip(SSL *ssl, char *buf, size_t cap)
{
    const struct sockaddr *sa = SSL_get_ex_data(ssl, ex_local_addr);
    struct sockaddr_storage ss;
    if (sa == NULL) {
        int fd = SSL_get_fd(ssl);
        socklen_t slen = sizeof ss;
        if (fd < 0 || getsockname(fd, (struct sockaddr *)&ss, &slen) != 0)
            return NULL;
        sa = (const struct sockaddr *)&ss;
    }
    if (sa->sa_family == AF_INET)
        return inet_ntop(AF_INET, &((const struct sockaddr_in *)sa)->sin_addr, buf, (socklen_t)cap);
    if (sa->sa_family == AF_INET6) {
        const struct in6_addr *a = &((const struct sockaddr_in6 *)sa)->sin6_addr;
        if (IN6_IS_ADDR_V4MAPPED(a))
            return inet_ntop(AF_INET, &a->s6_addr[12], buf, (socklen_t)cap);
        return inet_ntop(AF_INET6, a, buf, (socklen_t)cap);
    }
    return NULL;
}

/* Runs first on every ClientHello, on a worker thread: a lookup in the thread's snapshot (no
 * lock, no reference: the worker swaps it only between events, and SSL_set_chain_and_key takes
 * its own references on the chain and key, so the handshake outlives a swap). An unknown SNI name
 * is not rejected here, because returning an error from this callback sends handshake_failure; it
 * is marked, and the servername callback, which runs next, sends the unrecognized_name alert
 * instead. */
static enum ssl_select_cert_result_t select_cert_cb(const SSL_CLIENT_HELLO *ch)
{
    SSL *ssl = ch->ssl;
    const char *sni = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    if (thread_keys == NULL)
        SSL_set_options(ssl, SSL_OP_NO_TICKET); /* nothing to encrypt a ticket with */
    /* TLS-ALPN-01 (RFC 8737): a validation connection gets the challenge certificate and
     * nothing else; it speaks no HTTP. */
    if (sni != NULL && offers_alpn(ch, "acme-tls/1")) {
        if (moat_acme_alpn01_install(ssl, sni) == 0) {
            SSL_set_ex_data(ssl, ex_acme, &acme_marker);
            MOAT_DEBUG("TLS: answering a tls-alpn-01 challenge for %.64s", sni);
            return ssl_select_cert_success;
        }
        MOAT_DEBUG("TLS: acme-tls/1 for %.64s but no challenge is pending", sni);
    }
    char ipbuf[INET6_ADDRSTRLEN];
    const char *ip = sni ? NULL : local_ip(ssl, ipbuf, sizeof ipbuf);
    const moat_cert_t *cert = moat_certs_lookup(thread_certs, sni, ip);
    int rc = cert ? moat_cert_install(cert, ssl) : MOAT_ENOT_FOUND;
    if (rc == 0)
        return ssl_select_cert_success;
    if (rc == MOAT_ENOT_FOUND && sni != NULL) {
        MOAT_DEBUG("TLS: refusing unknown server name \"%.64s\"", sni);
        SSL_set_ex_data(ssl, ex_refused, &refused_marker);
        return ssl_select_cert_success;
    }
    MOAT_DEBUG("TLS: no certificate for a ClientHello without server name");
    return ssl_select_cert_error;
}

int moat_tls_refused_sni(const SSL *ssl)
{
    return ex_refused >= 0 && SSL_get_ex_data(ssl, ex_refused) != NULL;
}

static int servername_cb(SSL *ssl, int *alert, void *arg)
{
    (void)arg;
    if (SSL_get_ex_data(ssl, ex_refused) != NULL) {
        *alert = SSL_AD_UNRECOGNIZED_NAME;
        return SSL_TLSEXT_ERR_ALERT_FATAL;
    }
    return SSL_TLSEXT_ERR_OK;
}

/* --- the context ------------------------------------------------------------------------ */

SSL_CTX *moat_tls_server_ctx_new(char *err, size_t errlen)
{
    pthread_once(&ex_once, ex_init);
    if (ex_local_addr < 0 || ex_refused < 0 || ex_acme < 0 || ex_ctx_alpn < 0) {
        moat_errf(err, errlen, "TLS setup failed: no ex_data index");
        return NULL;
    }
    SSL_CTX *ctx = SSL_CTX_new(TLS_method());
    if (ctx == NULL) {
        moat_errf(err, errlen, "TLS setup failed: cannot create an SSL_CTX");
        return NULL;
    }
    /* Owned by the context from here on (freed with it by alpn_list_free). */
    alpn_list_t *prefs = moat_xmalloc(sizeof *prefs);
    *prefs = alpn_defaults;
    int ok = SSL_CTX_set_ex_data(ctx, ex_ctx_alpn, prefs);
    if (!ok)
        free(prefs);
    ok = ok && SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) &&
         SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION) &&
         SSL_CTX_set_strict_cipher_list(ctx, cipher_list) &&
         SSL_CTX_set1_curves_list(ctx, "X25519:P-256") &&
         SSL_CTX_set_tlsext_ticket_key_cb(ctx, ticket_cb) &&
         SSL_CTX_set_tlsext_servername_callback(ctx, servername_cb);
    if (!ok) {
        uint32_t e = ERR_get_error();
        char buf[256];
        ERR_error_string_n(e, buf, sizeof buf);
        moat_errf(err, errlen, "TLS setup failed: %s", buf);
        ERR_clear_error();
        SSL_CTX_free(ctx);
        return NULL;
    }
    SSL_CTX_set_options(ctx, SSL_OP_CIPHER_SERVER_PREFERENCE);
    /* Stateless resumption only: tickets need no shared cache and no lock across workers. */
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_timeout(ctx, SESSION_TIMEOUT_S);
    SSL_CTX_set_select_certificate_cb(ctx, select_cert_cb);
    SSL_CTX_set_alpn_select_cb(ctx, alpn_cb, prefs);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                              SSL_MODE_RELEASE_BUFFERS);
    return ctx;
}
