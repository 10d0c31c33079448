/* Challenge answers (include/moat/acme.h): the HTTP-01 token table and the TLS-ALPN-01
 * certificates. Both tables hold only pending challenges (a handful at most), so a linear scan
 * under one mutex is the simplest correct thing; workers hold the lock for a string compare. */
#include "moat/acme.h"

#include <openssl/bytestring.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/mem.h>
#include <openssl/obj.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <pthread.h>
#include <stdlib.h>
#include <strings.h>

#define MAX_PENDING 64

typedef struct {
    char *token, *key_auth;
} http01_t;

typedef struct {
    char *name;
    X509 *cert;
    EVP_PKEY *key;
} alpn01_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static http01_t http01[MAX_PENDING];
static alpn01_t alpn01[MAX_PENDING];

int moat_acme_http01_set(const char *token, const char *key_auth)
{
    int rc = MOAT_ENOT_FOUND;
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < MAX_PENDING; i++) {
        if (http01[i].token && strcmp(http01[i].token, token) == 0) {
            free(http01[i].token);
            free(http01[i].key_auth);
            http01[i].token = http01[i].key_auth = NULL;
            rc = 0;
        }
    }
    if (key_auth != NULL) {
        rc = MOAT_ENOMEM;
        for (size_t i = 0; i < MAX_PENDING; i++) {
            if (http01[i].token == NULL) {
                http01[i].token = moat_xstrdup(token);
                http01[i].key_auth = moat_xstrdup(key_auth);
                rc = 0;
                break;
            }
        }
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

int moat_acme_http01_get(const char *token, size_t len, char *out, size_t cap)
{
    int n = -1;
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < MAX_PENDING && n < 0; i++) {
        const char *t = http01[i].token;
        if (t && strlen(t) == len && memcmp(t, token, len) == 0) {
            size_t kl = strlen(http01[i].key_auth);
            if (kl < cap) {
                memcpy(out, http01[i].key_auth, kl + 1);
                n = (int)kl;
            }
        }
    }
    pthread_mutex_unlock(&lock);
    return n;
}

/* The acmeIdentifier extension value: the DER of an OCTET STRING holding SHA-256(key_auth). */
static X509_EXTENSION *acme_identifier(const char *key_auth)
{
    uint8_t der[2 + SHA256_DIGEST_LENGTH] = {0x04, SHA256_DIGEST_LENGTH};
    SHA256((const uint8_t *)key_auth, strlen(key_auth), der + 2);
    ASN1_OBJECT *obj = OBJ_txt2obj("1.3.6.1.5.5.7.1.31", 1);
    ASN1_OCTET_STRING *os = ASN1_OCTET_STRING_new();
    X509_EXTENSION *ext = NULL;
    if (obj && os && ASN1_OCTET_STRING_set(os, der, sizeof der))
        ext = X509_EXTENSION_create_by_OBJ(NULL, obj, 1, os);
    ASN1_OBJECT_free(obj);
    ASN1_OCTET_STRING_free(os);
    return ext;
}

static X509 *make_cert(const char *name, const char *key_auth, EVP_PKEY *key)
{
    X509 *x = X509_new();
    X509_NAME *subj = X509_NAME_new();
    GENERAL_NAMES *gens = sk_GENERAL_NAME_new_null();
    GENERAL_NAME *g = GENERAL_NAME_new();
    ASN1_IA5STRING *s = ASN1_IA5STRING_new();
    X509_EXTENSION *id = acme_identifier(key_auth);
    uint8_t serial[16];
    RAND_bytes(serial, sizeof serial);
    serial[0] &= 0x7f;
    BIGNUM *bn = BN_bin2bn(serial, sizeof serial, NULL);
    int ok =
        x && subj && gens && g && s && id && bn && X509_set_version(x, X509_VERSION_3) &&
        BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x)) &&
        X509_NAME_add_entry_by_txt(subj, "CN", MBSTRING_UTF8, (const uint8_t *)name, -1, -1, 0) &&
        X509_set_subject_name(x, subj) && X509_set_issuer_name(x, subj) &&
        X509_gmtime_adj(X509_getm_notBefore(x), -3600) &&
        X509_gmtime_adj(X509_getm_notAfter(x), 7 * 86400) && X509_set_pubkey(x, key) &&
        ASN1_STRING_set(s, name, (int)strlen(name));
    if (ok) {
        GENERAL_NAME_set0_value(g, GEN_DNS, s);
        s = NULL;
        ok = sk_GENERAL_NAME_push(gens, g) != 0;
        if (ok)
            g = NULL;
    }
    ok = ok && X509_add1_ext_i2d(x, NID_subject_alt_name, gens, 0, 0) > 0 &&
         X509_add_ext(x, id, -1) && X509_sign(x, key, EVP_sha256());
    BN_free(bn);
    X509_EXTENSION_free(id);
    ASN1_IA5STRING_free(s);
    GENERAL_NAME_free(g);
    sk_GENERAL_NAME_pop_free(gens, GENERAL_NAME_free);
    X509_NAME_free(subj);
    ERR_clear_error();
    if (!ok) {
        X509_free(x);
        return NULL;
    }
    return x;
}

int moat_acme_alpn_cert(const char *name, const char *key_auth, uint8_t **cert_der,
                        size_t *cert_len, char **key_pem)
{
    EVP_PKEY *key = moat_acme_key_new();
    X509 *x = key ? make_cert(name, key_auth, key) : NULL;
    int rc = MOAT_ECRYPTO;
    if (x != NULL) {
        uint8_t *der = NULL;
        int len = i2d_X509(x, &der);
        if (len > 0) {
            *cert_der = moat_xmalloc((size_t)len);
            memcpy(*cert_der, der, (size_t)len);
            *cert_len = (size_t)len;
            *key_pem = moat_acme_key_pem(key);
            rc = *key_pem ? 0 : MOAT_ECRYPTO;
            if (rc != 0)
                free(*cert_der);
        }
        OPENSSL_free(der);
    }
    X509_free(x);
    EVP_PKEY_free(key);
    return rc;
}

static void alpn_clear(alpn01_t *a)
{
    free(a->name);
    X509_free(a->cert);
    EVP_PKEY_free(a->key);
    memset(a, 0, sizeof *a);
}

int moat_acme_alpn01_set(const char *name, const char *key_auth)
{
    X509 *x = NULL;
    EVP_PKEY *key = NULL;
    if (key_auth != NULL) {
        key = moat_acme_key_new();
        x = key ? make_cert(name, key_auth, key) : NULL;
        if (x == NULL) {
            EVP_PKEY_free(key);
            return MOAT_ECRYPTO;
        }
    }
    int rc = key_auth ? MOAT_ENOMEM : MOAT_ENOT_FOUND;
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < MAX_PENDING; i++) {
        if (alpn01[i].name && strcasecmp(alpn01[i].name, name) == 0) {
            alpn_clear(&alpn01[i]);
            if (key_auth == NULL)
                rc = 0;
        }
    }
    for (size_t i = 0; x != NULL && i < MAX_PENDING; i++) {
        if (alpn01[i].name == NULL) {
            alpn01[i] = (alpn01_t){moat_xstrdup(name), x, key};
            x = NULL;
            key = NULL;
            rc = 0;
        }
    }
    pthread_mutex_unlock(&lock);
    X509_free(x);
    EVP_PKEY_free(key);
    return rc;
}

int moat_acme_alpn01_install(SSL *ssl, const char *sni)
{
    if (sni == NULL)
        return MOAT_ENOT_FOUND;
    int rc = MOAT_ENOT_FOUND;
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < MAX_PENDING && rc == MOAT_ENOT_FOUND; i++) {
        if (alpn01[i].name && strcasecmp(alpn01[i].name, sni) == 0) {
            /* Both calls take their own references, so withdrawing the entry later is safe. */
            rc = SSL_use_certificate(ssl, alpn01[i].cert) && SSL_use_PrivateKey(ssl, alpn01[i].key)
                     ? 0
                     : MOAT_ETLS;
        }
    }
    pthread_mutex_unlock(&lock);
    return rc;
}

void moat_acme_challenges_clear(void)
{
    pthread_mutex_lock(&lock);
    for (size_t i = 0; i < MAX_PENDING; i++) {
        free(http01[i].token);
        free(http01[i].key_auth);
        http01[i].token = http01[i].key_auth = NULL;
        alpn_clear(&alpn01[i]);
    }
    pthread_mutex_unlock(&lock);
}
