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
    int valid;
} ticket_key_t;

/* keys[0] encrypts new tickets; keys[1..] only decrypt. */
#define TICKET_KEYS 3
static ticket_key_t ticket_keys[TICKET_KEYS];
static pthread_rwlock_t ticket_lock = PTHREAD_RWLOCK_INITIALIZER;

static void new_ticket_key(ticket_key_t *k)
{
    RAND_bytes(k->name, sizeof k->name);
    RAND_bytes(k->aes, sizeof k->aes);
    RAND_bytes(k->hmac, sizeof k->hmac);
    k->valid = 1;
}

void moat_tls_rotate_ticket_keys(void)
{
    ticket_key_t fresh;
    new_ticket_key(&fresh);
    pthread_rwlock_wrlock(&ticket_lock);
    OPENSSL_cleanse(&ticket_keys[TICKET_KEYS - 1], sizeof ticket_keys[0]);
    memmove(&ticket_keys[1], &ticket_keys[0], (TICKET_KEYS - 1) * sizeof ticket_keys[0]);
    ticket_keys[0] = fresh;
    pthread_rwlock_unlock(&ticket_lock);
    OPENSSL_cleanse(&fresh, sizeof fresh);
}

/* BoringSSL's ticket callback: encrypt mode returns 1 or -1; decrypt mode returns 1 (ok),
 * 2 (ok, re-issue under the current key), 0 (unknown key: full handshake) or -1. */
static int ticket_cb(SSL *ssl, uint8_t *key_name, uint8_t *iv, EVP_CIPHER_CTX *cctx, HMAC_CTX *hctx,
                     int encrypt)
{
    (void)ssl;
    ticket_key_t k;
    int idx = -1;
    pthread_rwlock_rdlock(&ticket_lock);
    if (encrypt) {
        idx = 0;
    } else {
        for (int i = 0; i < TICKET_KEYS && idx < 0; i++)
            if (ticket_keys[i].valid && CRYPTO_memcmp(ticket_keys[i].name, key_name, 16) == 0)
                idx = i;
    }
    if (idx >= 0)
        k = ticket_keys[idx];
    pthread_rwlock_unlock(&ticket_lock);
    if (idx < 0)
        return 0;

    int ok;
    if (encrypt) {
        memcpy(key_name, k.name, sizeof k.name);
        ok = RAND_bytes(iv, EVP_CIPHER_iv_length(EVP_aes_256_cbc())) &&
             EVP_EncryptInit_ex(cctx, EVP_aes_256_cbc(), NULL, k.aes, iv);
    } else {
        ok = EVP_DecryptInit_ex(cctx, EVP_aes_256_cbc(), NULL, k.aes, iv);
    }
    ok = ok && HMAC_Init_ex(hctx, k.hmac, sizeof k.hmac, EVP_sha256(), NULL);
    OPENSSL_cleanse(&k, sizeof k);
    if (!ok)
        return -1;
    return encrypt ? 1 : (idx == 0 ? 1 : 2);
}

/* --- ALPN -------------------------------------------------------------------------------- */

#define MAX_ALPN 8

/* Per-connection marks (SSL ex_data): the local address, an unknown SNI name to refuse, and a
 * TLS-ALPN-01 validation connection. */
static int ex_local_addr = -1, ex_refused = -1, ex_acme = -1;
static char refused_marker, acme_marker;

/* Protocol names are interned forever so that moat_tls_selected_alpn can hand out stable
 * pointers even after the preference list changes. */
static const char *interned[32] = {"http/1.1", "h2", "acme-tls/1"};
static size_t ninterned = 3;
static const char *alpn_prefs[MAX_ALPN] = {"http/1.1"};
static size_t nalpn_prefs = 1;
static pthread_rwlock_t alpn_lock = PTHREAD_RWLOCK_INITIALIZER;

static const char *intern_locked(const char *p)
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
    pthread_rwlock_wrlock(&alpn_lock);
    nalpn_prefs = 0;
    for (size_t i = 0; i < n && nalpn_prefs < MAX_ALPN; i++) {
        size_t len = strlen(protos[i]);
        const char *p = (len > 0 && len < 256) ? intern_locked(protos[i]) : NULL;
        if (p != NULL)
            alpn_prefs[nalpn_prefs++] = p;
    }
    pthread_rwlock_unlock(&alpn_lock);
}

/* Server preference: the first of our protocols that the client offered wins. */
static int alpn_cb(SSL *ssl, const uint8_t **out, uint8_t *outlen, const uint8_t *in,
                   unsigned inlen, void *arg)
{
    (void)arg;
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
    int rc = SSL_TLSEXT_ERR_NOACK;
    pthread_rwlock_rdlock(&alpn_lock);
    for (size_t i = 0; i < nalpn_prefs && rc != SSL_TLSEXT_ERR_OK; i++) {
        size_t plen = strlen(alpn_prefs[i]);
        for (unsigned off = 0; off < inlen;) {
            unsigned l = in[off];
            if (l == 0 || off + 1 + l > inlen)
                break;
            if (l == plen && memcmp(in + off + 1, alpn_prefs[i], plen) == 0) {
                *out = in + off + 1;
                *outlen = (uint8_t)l;
                rc = SSL_TLSEXT_ERR_OK;
                break;
            }
            off += 1 + l;
        }
    }
    pthread_rwlock_unlock(&alpn_lock);
    return rc;
}

const char *moat_tls_selected_alpn(const SSL *ssl)
{
    const uint8_t *p;
    unsigned len;
    SSL_get0_alpn_selected(ssl, &p, &len);
    if (len == 0)
        return NULL;
    const char *r = NULL;
    pthread_rwlock_rdlock(&alpn_lock);
    for (size_t i = 0; i < ninterned && r == NULL; i++)
        if (strlen(interned[i]) == len && memcmp(interned[i], p, len) == 0)
            r = interned[i];
    pthread_rwlock_unlock(&alpn_lock);
    return r;
}

/* --- certificate selection ---------------------------------------------------------------- */

static pthread_once_t ex_once = PTHREAD_ONCE_INIT;

static void ex_init(void)
{
    ex_local_addr = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
    ex_refused = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
    ex_acme = SSL_get_ex_new_index(0, NULL, NULL, NULL, NULL);
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

/* Runs first on every ClientHello, on a worker thread: a reference on the snapshot, a lookup
 * and SSL_set_chain_and_key (references only). An unknown SNI name is not rejected here,
 * because returning an error from this callback sends handshake_failure; it is marked, and the
 * servername callback, which runs next, sends the unrecognized_name alert instead. */
static enum ssl_select_cert_result_t select_cert_cb(const SSL_CLIENT_HELLO *ch)
{
    SSL *ssl = ch->ssl;
    const char *sni = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
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
    moat_certs_t *c = moat_certs_acquire();
    const moat_cert_t *cert = moat_certs_lookup(c, sni, ip);
    int rc = cert ? moat_cert_install(cert, ssl) : MOAT_ENOT_FOUND;
    moat_certs_release(c);
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

static pthread_once_t keys_once = PTHREAD_ONCE_INIT;

static void keys_init(void)
{
    pthread_rwlock_wrlock(&ticket_lock);
    if (!ticket_keys[0].valid)
        new_ticket_key(&ticket_keys[0]);
    pthread_rwlock_unlock(&ticket_lock);
}

SSL_CTX *moat_tls_server_ctx_new(char *err, size_t errlen)
{
    pthread_once(&ex_once, ex_init);
    pthread_once(&keys_once, keys_init);
    if (ex_local_addr < 0 || ex_refused < 0 || ex_acme < 0) {
        moat_errf(err, errlen, "TLS setup failed: no ex_data index");
        return NULL;
    }
    SSL_CTX *ctx = SSL_CTX_new(TLS_method());
    if (ctx == NULL) {
        moat_errf(err, errlen, "TLS setup failed: cannot create an SSL_CTX");
        return NULL;
    }
    int ok = SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) &&
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
    SSL_CTX_set_alpn_select_cb(ctx, alpn_cb, NULL);
    SSL_CTX_set_mode(ctx, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER |
                              SSL_MODE_RELEASE_BUFFERS);
    return ctx;
}
