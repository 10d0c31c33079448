/* JWS for ACME (include/moat/acme.h): ES256 account keys, JWK thumbprints, flattened JWS,
 * external account binding, key authorizations and the CSR. */
#include "moat/acme.h"

#include <openssl/base64.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/bytestring.h>
#include <openssl/ec.h>
#include <openssl/ec_key.h>
#include <openssl/ecdsa.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/mem.h>
#include <openssl/nid.h>
#include <openssl/pem.h>
#include <openssl/sha.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>

char *moat_b64url(const void *in, size_t len)
{
    size_t cap = 0;
    EVP_EncodedLength(&cap, len);
    char *out = moat_xmalloc(cap + 1);
    size_t n = EVP_EncodeBlock((uint8_t *)out, in, len);
    while (n > 0 && out[n - 1] == '=')
        n--;
    out[n] = '\0';
    for (size_t i = 0; i < n; i++) {
        if (out[i] == '+')
            out[i] = '-';
        else if (out[i] == '/')
            out[i] = '_';
    }
    return out;
}

long moat_b64url_decode(const char *in, size_t len, uint8_t *out)
{
    /* Map back to standard base64 and restore the padding EVP_DecodeBase64 wants. */
    char *tmp = moat_xmalloc(len + 4);
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        char c = in[i];
        if (c == '=')
            break;
        tmp[n++] = c == '-' ? '+' : c == '_' ? '/' : c;
    }
    if (n % 4 == 1) {
        free(tmp);
        return -1;
    }
    while (n % 4)
        tmp[n++] = '=';
    size_t outlen = 0;
    int ok = EVP_DecodeBase64(out, &outlen, len * 3 / 4 + 3, (const uint8_t *)tmp, n);
    free(tmp);
    return ok ? (long)outlen : -1;
}

EVP_PKEY *moat_acme_key_new(void)
{
    EC_KEY *ec = EC_KEY_new_by_curve_name(NID_X9_62_prime256v1);
    EVP_PKEY *k = EVP_PKEY_new();
    if (ec == NULL || k == NULL || !EC_KEY_generate_key(ec) || !EVP_PKEY_assign_EC_KEY(k, ec)) {
        EC_KEY_free(ec);
        EVP_PKEY_free(k);
        return NULL;
    }
    return k;
}

char *moat_acme_key_pem(EVP_PKEY *k)
{
    BIO *bio = BIO_new(BIO_s_mem());
    char *out = NULL;
    if (bio && PEM_write_bio_PrivateKey(bio, k, NULL, NULL, 0, NULL, NULL)) {
        const uint8_t *p;
        size_t n;
        if (BIO_mem_contents(bio, &p, &n))
            out = moat_xstrndup((const char *)p, n);
    }
    BIO_free(bio);
    return out;
}

EVP_PKEY *moat_acme_key_from_pem(const char *pem)
{
    BIO *bio = BIO_new_mem_buf(pem, -1);
    EVP_PKEY *k = bio ? PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL) : NULL;
    BIO_free(bio);
    ERR_clear_error();
    if (k && EVP_PKEY_id(k) != EVP_PKEY_EC) {
        EVP_PKEY_free(k);
        return NULL;
    }
    return k;
}

/* The public point's affine coordinates, 32 bytes each. */
static int coords(EVP_PKEY *k, uint8_t x[32], uint8_t y[32])
{
    const EC_KEY *ec = EVP_PKEY_get0_EC_KEY(k);
    uint8_t buf[65];
    if (ec == NULL ||
        EC_POINT_point2oct(EC_KEY_get0_group(ec), EC_KEY_get0_public_key(ec),
                           POINT_CONVERSION_UNCOMPRESSED, buf, sizeof buf, NULL) != sizeof buf)
        return MOAT_ECRYPTO;
    memcpy(x, buf + 1, 32);
    memcpy(y, buf + 33, 32);
    return 0;
}

char *moat_acme_jwk(EVP_PKEY *k)
{
    uint8_t x[32], y[32];
    if (coords(k, x, y) != 0)
        return NULL;
    char *xs = moat_b64url(x, 32), *ys = moat_b64url(y, 32);
    /* Members in lexicographic order and no whitespace: this exact string is what RFC 7638
     * hashes for the thumbprint. */
    size_t cap = strlen(xs) + strlen(ys) + 64;
    char *out = moat_xmalloc(cap);
    snprintf(out, cap, "{\"crv\":\"P-256\",\"kty\":\"EC\",\"x\":\"%s\",\"y\":\"%s\"}", xs, ys);
    free(xs);
    free(ys);
    return out;
}

char *moat_acme_thumbprint(EVP_PKEY *k)
{
    char *jwk = moat_acme_jwk(k);
    if (jwk == NULL)
        return NULL;
    uint8_t d[SHA256_DIGEST_LENGTH];
    SHA256((const uint8_t *)jwk, strlen(jwk), d);
    free(jwk);
    return moat_b64url(d, sizeof d);
}

int moat_acme_es256_sign(EVP_PKEY *k, const void *data, size_t len, uint8_t sig[64])
{
    const EC_KEY *ec = EVP_PKEY_get0_EC_KEY(k);
    if (ec == NULL)
        return MOAT_ECRYPTO;
    uint8_t d[SHA256_DIGEST_LENGTH];
    SHA256(data, len, d);
    ECDSA_SIG *s = ECDSA_do_sign(d, sizeof d, ec);
    if (s == NULL)
        return MOAT_ECRYPTO;
    const BIGNUM *r, *ss;
    ECDSA_SIG_get0(s, &r, &ss);
    int ok = BN_bn2bin_padded(sig, 32, r) && BN_bn2bin_padded(sig + 32, 32, ss);
    ECDSA_SIG_free(s);
    return ok ? 0 : MOAT_ECRYPTO;
}

int moat_acme_es256_verify(EVP_PKEY *k, const void *data, size_t len, const uint8_t sig[64])
{
    const EC_KEY *ec = EVP_PKEY_get0_EC_KEY(k);
    if (ec == NULL)
        return 0;
    uint8_t d[SHA256_DIGEST_LENGTH];
    SHA256(data, len, d);
    ECDSA_SIG *s = ECDSA_SIG_new();
    BIGNUM *r = BN_bin2bn(sig, 32, NULL), *ss = BN_bin2bn(sig + 32, 32, NULL);
    int ok = s && r && ss && ECDSA_SIG_set0(s, r, ss);
    if (!ok) {
        BN_free(r);
        BN_free(ss);
    }
    ok = ok && ECDSA_do_verify(d, sizeof d, s, ec);
    ECDSA_SIG_free(s);
    ERR_clear_error();
    return ok ? 1 : 0;
}

/* {"protected":P,"payload":Q,"signature":S} with S over "P.Q". */
static char *flatten(const char *prot_json, const char *payload, const uint8_t *key, size_t keylen,
                     EVP_PKEY *k)
{
    char *p64 = moat_b64url(prot_json, strlen(prot_json));
    char *q64 = payload ? moat_b64url(payload, strlen(payload)) : moat_xstrdup("");
    size_t ilen = strlen(p64) + 1 + strlen(q64);
    char *input = moat_xmalloc(ilen + 1);
    snprintf(input, ilen + 1, "%s.%s", p64, q64);
    char *sig64 = NULL;
    if (k != NULL) {
        uint8_t sig[64];
        if (moat_acme_es256_sign(k, input, ilen, sig) == 0)
            sig64 = moat_b64url(sig, sizeof sig);
    } else {
        uint8_t mac[EVP_MAX_MD_SIZE];
        unsigned maclen = 0;
        if (HMAC(EVP_sha256(), key, keylen, (const uint8_t *)input, ilen, mac, &maclen))
            sig64 = moat_b64url(mac, maclen);
    }
    char *out = NULL;
    if (sig64 != NULL) {
        size_t cap = ilen + strlen(sig64) + 64;
        out = moat_xmalloc(cap);
        snprintf(out, cap, "{\"protected\":\"%s\",\"payload\":\"%s\",\"signature\":\"%s\"}", p64,
                 q64, sig64);
    }
    free(p64);
    free(q64);
    free(input);
    free(sig64);
    return out;
}

char *moat_acme_jws(EVP_PKEY *k, const char *kid, const char *nonce, const char *url,
                    const char *payload)
{
    json_t *prot = json_object();
    json_object_set_new(prot, "alg", json_string("ES256"));
    if (kid != NULL) {
        json_object_set_new(prot, "kid", json_string(kid));
    } else {
        char *jwk = moat_acme_jwk(k);
        json_t *j = jwk ? json_loads(jwk, 0, NULL) : NULL;
        free(jwk);
        if (j == NULL) {
            json_decref(prot);
            return NULL;
        }
        json_object_set_new(prot, "jwk", j);
    }
    if (nonce != NULL)
        json_object_set_new(prot, "nonce", json_string(nonce));
    json_object_set_new(prot, "url", json_string(url));
    char *ps = json_dumps(prot, JSON_COMPACT);
    json_decref(prot);
    if (ps == NULL)
        return NULL;
    char *out = flatten(ps, payload ? payload : NULL, NULL, 0, k);
    free(ps);
    return out;
}

char *moat_acme_eab(EVP_PKEY *account, const char *eab_kid, const char *hmac_b64url,
                    const char *url)
{
    size_t hl = strlen(hmac_b64url);
    uint8_t *key = moat_xmalloc(hl * 3 / 4 + 3);
    long klen = moat_b64url_decode(hmac_b64url, hl, key);
    char *jwk = moat_acme_jwk(account);
    char *out = NULL;
    if (klen > 0 && jwk != NULL) {
        json_t *prot = json_pack("{s:s, s:s, s:s}", "alg", "HS256", "kid", eab_kid, "url", url);
        char *ps = prot ? json_dumps(prot, JSON_COMPACT) : NULL;
        json_decref(prot);
        if (ps != NULL)
            out = flatten(ps, jwk, key, (size_t)klen, NULL);
        free(ps);
    }
    OPENSSL_cleanse(key, hl * 3 / 4 + 3);
    free(key);
    free(jwk);
    return out;
}

char *moat_acme_key_authorization(const char *token, EVP_PKEY *account)
{
    char *tp = moat_acme_thumbprint(account);
    if (tp == NULL)
        return NULL;
    size_t cap = strlen(token) + strlen(tp) + 2;
    char *out = moat_xmalloc(cap);
    snprintf(out, cap, "%s.%s", token, tp);
    free(tp);
    return out;
}

char *moat_acme_csr(EVP_PKEY *k, const char *const *names, size_t n)
{
    X509_REQ *req = X509_REQ_new();
    X509_NAME *subj = X509_NAME_new();
    GENERAL_NAMES *gens = sk_GENERAL_NAME_new_null();
    STACK_OF(X509_EXTENSION) *exts = sk_X509_EXTENSION_new_null();
    char *out = NULL;
    int ok = req && subj && gens && exts && n > 0 && X509_REQ_set_version(req, 0) &&
             X509_NAME_add_entry_by_txt(subj, "CN", MBSTRING_UTF8, (const uint8_t *)names[0], -1,
                                        -1, 0) &&
             X509_REQ_set_subject_name(req, subj) && X509_REQ_set_pubkey(req, k);
    for (size_t i = 0; ok && i < n; i++) {
        GENERAL_NAME *g = GENERAL_NAME_new();
        ASN1_IA5STRING *s = ASN1_IA5STRING_new();
        ok = g && s && ASN1_STRING_set(s, names[i], (int)strlen(names[i]));
        if (ok) {
            GENERAL_NAME_set0_value(g, GEN_DNS, s);
            ok = sk_GENERAL_NAME_push(gens, g) != 0;
            if (!ok)
                GENERAL_NAME_free(g);
        } else {
            GENERAL_NAME_free(g);
            ASN1_IA5STRING_free(s);
        }
    }
    ok = ok && X509V3_add1_i2d(&exts, NID_subject_alt_name, gens, 0, 0) > 0 &&
         X509_REQ_add_extensions(req, exts) && X509_REQ_sign(req, k, EVP_sha256());
    if (ok) {
        uint8_t *der = NULL;
        int len = i2d_X509_REQ(req, &der);
        if (len > 0)
            out = moat_b64url(der, (size_t)len);
        OPENSSL_free(der);
    }
    ERR_clear_error();
    sk_X509_EXTENSION_pop_free(exts, X509_EXTENSION_free);
    sk_GENERAL_NAME_pop_free(gens, GENERAL_NAME_free);
    X509_NAME_free(subj);
    X509_REQ_free(req);
    return out;
}
