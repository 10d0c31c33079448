/* Unit tests for acme/: base64url, ES256 JWS (raw r||s), JWK thumbprint (RFC 7638 vector),
 * key authorizations, the TLS-ALPN-01 acmeIdentifier certificate, renewal time and backoff. */
#include "moat/acme.h"
#include "test.h"

#include <openssl/bio.h>
#include <openssl/bytestring.h>
#include <openssl/ec.h>
#include <openssl/ec_key.h>
#include <openssl/evp.h>
#include <openssl/mem.h>
#include <openssl/obj.h>
#include <openssl/pem.h>
#include <openssl/sha.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <jansson.h>
#include <stdlib.h>

static void test_b64url(void)
{
    char *s = moat_b64url("\xfb\xff\xfe", 3);
    CHECK_STR(s, "-__-");
    uint8_t out[8];
    CHECK_INT(moat_b64url_decode(s, strlen(s), out), 3);
    CHECK(memcmp(out, "\xfb\xff\xfe", 3) == 0);
    free(s);
    s = moat_b64url("a", 1);
    CHECK_STR(s, "YQ"); /* no padding */
    CHECK_INT(moat_b64url_decode("YQ", 2, out), 1);
    CHECK_INT(moat_b64url_decode("Y", 1, out), -1);
    free(s);
}

/* RFC 7638 §3.1 uses an RSA key; for EC, check the canonical member order and that the
 * thumbprint is SHA-256 of exactly that string. */
static void test_jwk_thumbprint(void)
{
    EVP_PKEY *k = moat_acme_key_new();
    CHECK(k != NULL);
    char *jwk = moat_acme_jwk(k);
    static const char prefix[] = "{\"crv\":\"P-256\",\"kty\":\"EC\",\"x\":\"";
    CHECK(strncmp(jwk, prefix, sizeof prefix - 1) == 0);
    CHECK(strstr(jwk, " ") == NULL);
    uint8_t d[32];
    SHA256((const uint8_t *)jwk, strlen(jwk), d);
    char *want = moat_b64url(d, 32), *tp = moat_acme_thumbprint(k);
    CHECK_STR(tp, want);
    CHECK_INT(strlen(tp), 43);

    char *ka = moat_acme_key_authorization("tok-123", k);
    char buf[200];
    snprintf(buf, sizeof buf, "tok-123.%s", tp);
    CHECK_STR(ka, buf);

    /* PEM round trip keeps the same key. */
    char *pem = moat_acme_key_pem(k);
    EVP_PKEY *k2 = moat_acme_key_from_pem(pem);
    char *tp2 = moat_acme_thumbprint(k2);
    CHECK_STR(tp2, tp);
    CHECK(moat_acme_key_from_pem("not a key") == NULL);
    free(jwk);
    free(want);
    free(tp);
    free(tp2);
    free(ka);
    free(pem);
    EVP_PKEY_free(k);
    EVP_PKEY_free(k2);
}

static void test_jws(void)
{
    EVP_PKEY *k = moat_acme_key_new();
    uint8_t sig[64];
    CHECK_INT(moat_acme_es256_sign(k, "hello", 5, sig), 0);
    CHECK_INT(moat_acme_es256_verify(k, "hello", 5, sig), 1);
    CHECK_INT(moat_acme_es256_verify(k, "hellO", 5, sig), 0);

    char *jws = moat_acme_jws(k, NULL, "nonce-1", "https://ca/new-acct", "{\"a\":1}");
    json_t *j = json_loads(jws, 0, NULL);
    CHECK(j != NULL);
    const char *p = json_string_value(json_object_get(j, "protected"));
    const char *q = json_string_value(json_object_get(j, "payload"));
    const char *s = json_string_value(json_object_get(j, "signature"));
    CHECK(p && q && s);
    /* Raw r||s: exactly 64 bytes, which is 86 base64url characters. */
    CHECK_INT(strlen(s), 86);
    uint8_t raw[70];
    CHECK_INT(moat_b64url_decode(s, strlen(s), raw), 64);
    char input[2048];
    snprintf(input, sizeof input, "%s.%s", p, q);
    CHECK_INT(moat_acme_es256_verify(k, input, strlen(input), raw), 1);
    uint8_t hdr[1024];
    long hl = moat_b64url_decode(p, strlen(p), hdr);
    CHECK(hl > 0);
    json_t *h = json_loadb((const char *)hdr, (size_t)hl, 0, NULL);
    CHECK_STR(json_string_value(json_object_get(h, "alg")), "ES256");
    CHECK_STR(json_string_value(json_object_get(h, "nonce")), "nonce-1");
    CHECK_STR(json_string_value(json_object_get(h, "url")), "https://ca/new-acct");
    CHECK(json_object_get(h, "jwk") != NULL && json_object_get(h, "kid") == NULL);
    CHECK_STR(q, "eyJhIjoxfQ");
    json_decref(h);
    json_decref(j);
    free(jws);

    /* With a kid and POST-as-GET: no jwk, empty payload. */
    jws = moat_acme_jws(k, "https://ca/acct/1", "n2", "https://ca/order/1", NULL);
    j = json_loads(jws, 0, NULL);
    CHECK_STR(json_string_value(json_object_get(j, "payload")), "");
    p = json_string_value(json_object_get(j, "protected"));
    hl = moat_b64url_decode(p, strlen(p), hdr);
    h = json_loadb((const char *)hdr, (size_t)hl, 0, NULL);
    CHECK_STR(json_string_value(json_object_get(h, "kid")), "https://ca/acct/1");
    CHECK(json_object_get(h, "jwk") == NULL);
    json_decref(h);
    json_decref(j);
    free(jws);

    /* EAB: HS256 over the account JWK. */
    char *eab = moat_acme_eab(k, "kid-1", "c2VjcmV0LWtleQ", "https://ca/new-acct");
    CHECK(eab != NULL);
    j = json_loads(eab, 0, NULL);
    CHECK_INT(strlen(json_string_value(json_object_get(j, "signature"))), 43);
    json_decref(j);
    free(eab);

    /* A CSR for two names parses back with both in its SAN. */
    const char *names[] = {"a.example.test", "b.example.test"};
    char *csr = moat_acme_csr(k, names, 2);
    CHECK(csr != NULL);
    uint8_t der[2048];
    long dl = moat_b64url_decode(csr, strlen(csr), der);
    const uint8_t *dp = der;
    X509_REQ *req = d2i_X509_REQ(NULL, &dp, dl);
    CHECK(req != NULL);
    CHECK_INT(X509_REQ_verify(req, k), 1);
    X509_REQ_free(req);
    free(csr);
    EVP_PKEY_free(k);
}

static void test_alpn_cert(void)
{
    uint8_t *der = NULL;
    size_t len = 0;
    char *key = NULL;
    const char *ka = "token.thumb";
    CHECK_INT(moat_acme_alpn_cert("x.example.test", ka, &der, &len, &key), 0);
    const uint8_t *p = der;
    X509 *x = d2i_X509(NULL, &p, (long)len);
    CHECK(x != NULL);
    CHECK_INT(X509_check_host(x, "x.example.test", 14, 0, NULL), 1);
    ASN1_OBJECT *obj = OBJ_txt2obj("1.3.6.1.5.5.7.1.31", 1);
    int idx = X509_get_ext_by_OBJ(x, obj, -1);
    CHECK(idx >= 0);
    X509_EXTENSION *ext = X509_get_ext(x, idx);
    CHECK_INT(X509_EXTENSION_get_critical(ext), 1);
    const ASN1_OCTET_STRING *v = X509_EXTENSION_get_data(ext);
    uint8_t want[34] = {0x04, 0x20};
    SHA256((const uint8_t *)ka, strlen(ka), want + 2);
    CHECK_INT(ASN1_STRING_length(v), 34);
    CHECK(memcmp(ASN1_STRING_get0_data(v), want, 34) == 0);
    ASN1_OBJECT_free(obj);
    X509_free(x);
    free(der);
    free(key);

    /* The tables. */
    char out[64];
    CHECK_INT(moat_acme_http01_set("tok", "tok.tp"), 0);
    CHECK_INT(moat_acme_http01_get("tok", 3, out, sizeof out), 6);
    CHECK_STR(out, "tok.tp");
    CHECK_INT(moat_acme_http01_get("to", 2, out, sizeof out), -1);
    CHECK_INT(moat_acme_http01_get("tok", 3, out, 4), -1);
    CHECK_INT(moat_acme_http01_set("tok", NULL), 0);
    CHECK_INT(moat_acme_http01_get("tok", 3, out, sizeof out), -1);
    CHECK_INT(moat_acme_alpn01_set("x.example.test", "a.b"), 0);
    CHECK_INT(moat_acme_alpn01_set("x.example.test", NULL), 0);
    CHECK_INT(moat_acme_alpn01_set("x.example.test", NULL), MOAT_ENOT_FOUND);
    moat_acme_challenges_clear();
}

static void test_renewal_and_backoff(void)
{
    /* A third of the lifetime left: 90 days -> 60 days in, 6 days -> 4 days in. */
    CHECK_INT(moat_acme_renew_at(0, 90 * 86400, 0, 0, 0), 60 * 86400);
    CHECK_INT(moat_acme_renew_at(1000, 1000 + 6 * 86400, 0, 0, 0), 1000 + 4 * 86400);
    CHECK_INT(moat_acme_renew_at(0, 45 * 86400, 0, 0, 0), 30 * 86400);
    CHECK_INT(moat_acme_renew_at(100, 100, 0, 0, 0), 100);
    /* An ARI window wins. */
    CHECK_INT(moat_acme_renew_at(0, 90 * 86400, 5000, 6000, 0.5), 5500);
    CHECK_INT(moat_acme_renew_at(0, 90 * 86400, 5000, 6000, 2), 6000);

    CHECK_INT(moat_acme_backoff(1, 0, 0), 60);
    CHECK_INT(moat_acme_backoff(2, 0, 0), 120);
    CHECK_INT(moat_acme_backoff(3, 0, 0), 240);
    CHECK_INT(moat_acme_backoff(9, 0, 0), 15360);
    CHECK_INT(moat_acme_backoff(8, 0, 0), 7680);
    CHECK_INT(moat_acme_backoff(10, 0, 0), 6 * 3600);
    CHECK_INT(moat_acme_backoff(1000, 0, 0), 6 * 3600);
    CHECK_INT(moat_acme_backoff(1, 300, 0), 300);
    CHECK_INT(moat_acme_backoff(5, 30, 0), 960);
    CHECK_INT(moat_acme_backoff(1, 0, 1), 3600);
    CHECK_INT(moat_acme_backoff(1, 90000, 1), 90000);

    CHECK_INT(moat_acme_parse_retry_after("120", 0), 120);
    CHECK_INT(moat_acme_parse_retry_after(NULL, 0), 0);
    CHECK_INT(moat_acme_parse_retry_after("soon", 0), 0);
    /* Thu, 01 Jan 1970 00:10:00 GMT is 600. */
    CHECK_INT(moat_acme_parse_retry_after("Thu, 01 Jan 1970 00:10:00 GMT", 100), 500);
}

/* RFC 9773 §4.1's example: AKI keyIdentifier 69:88:5B:...:D4 and serial 00:87:65:43:21. */
static const uint8_t rfc_aki[] = {0x69, 0x88, 0x5B, 0x6B, 0x87, 0x46, 0x40, 0x41, 0xE1, 0xB3,
                                  0x7B, 0x84, 0x7B, 0xA0, 0xAE, 0x2C, 0xDE, 0x01, 0xC8, 0xD4};
static const char rfc_cert_id[] = "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE";

/* A self-signed certificate with the RFC's AKI and serial, as PEM (free()). */
static char *ari_example_pem(void)
{
    EVP_PKEY *k = moat_acme_key_new();
    X509 *x = X509_new();
    ASN1_INTEGER *serial = ASN1_INTEGER_new();
    ASN1_INTEGER_set_uint64(serial, 0x87654321u);
    AUTHORITY_KEYID *akid = AUTHORITY_KEYID_new();
    akid->keyid = ASN1_OCTET_STRING_new();
    ASN1_OCTET_STRING_set(akid->keyid, rfc_aki, sizeof rfc_aki);
    X509_set_version(x, X509_VERSION_3);
    X509_set_serialNumber(x, serial);
    X509_gmtime_adj(X509_getm_notBefore(x), 0);
    X509_gmtime_adj(X509_getm_notAfter(x), 86400);
    X509_set_pubkey(x, k);
    X509_add1_ext_i2d(x, NID_authority_key_identifier, akid, 0, 0);
    X509_sign(x, k, EVP_sha256());
    BIO *b = BIO_new(BIO_s_mem());
    PEM_write_bio_X509(b, x);
    const uint8_t *data;
    size_t len;
    BIO_mem_contents(b, &data, &len);
    char *pem = moat_xstrndup((const char *)data, len);
    BIO_free(b);
    AUTHORITY_KEYID_free(akid);
    ASN1_INTEGER_free(serial);
    X509_free(x);
    EVP_PKEY_free(k);
    return pem;
}

static void test_ari(void)
{
    static const uint8_t serial[] = {0x00, 0x87, 0x65, 0x43, 0x21};
    char *id = moat_acme_ari_cert_id(rfc_aki, sizeof rfc_aki, serial, sizeof serial);
    CHECK_STR(id, rfc_cert_id);
    free(id);
    CHECK(moat_acme_ari_cert_id(NULL, 0, serial, sizeof serial) == NULL);
    /* From a certificate: the serial's DER content keeps its leading zero. */
    char *pem = ari_example_pem();
    id = moat_acme_ari_cert_id_pem(pem);
    CHECK_STR(id, rfc_cert_id);
    free(id);
    free(pem);
    CHECK(moat_acme_ari_cert_id_pem("not a certificate") == NULL);

    /* RFC 3339 dates. */
    CHECK_INT(moat_acme_parse_rfc3339("1970-01-01T00:10:00Z"), 600);
    CHECK_INT(moat_acme_parse_rfc3339("2025-01-02T04:00:00Z"), 1735790400);
    CHECK_INT(moat_acme_parse_rfc3339("2025-01-02T04:00:00.123456Z"), 1735790400);
    CHECK_INT(moat_acme_parse_rfc3339("2025-01-02T06:00:00+02:00"), 1735790400);
    CHECK_INT(moat_acme_parse_rfc3339("2025-01-02t03:30:00-00:30"), 1735790400);
    CHECK_INT(moat_acme_parse_rfc3339("2025-01-02T04:00:00"), -1);
    CHECK_INT(moat_acme_parse_rfc3339("2025-13-02T04:00:00Z"), -1);
    CHECK_INT(moat_acme_parse_rfc3339("2025-01-02T04:00:00Zjunk"), -1);
    CHECK_INT(moat_acme_parse_rfc3339(NULL), -1);

    /* The window and the explanation URL (RFC 9773 §4.2's example shape). */
    static const char body[] = "{\"suggestedWindow\": {\"start\": \"2025-01-02T04:00:00Z\","
                               " \"end\": \"2025-01-03T04:00:00Z\"},"
                               " \"explanationURL\": \"https://acme.example.com/docs/ari\"}";
    moat_acme_ari_t a;
    CHECK_INT(moat_acme_ari_parse(body, strlen(body), &a), 0);
    CHECK_INT(a.start, 1735790400);
    CHECK_INT(a.end, 1735790400 + 86400);
    CHECK_STR(a.explanation_url, "https://acme.example.com/docs/ari");
    moat_acme_ari_clear(&a);
    static const char no_url[] = "{\"suggestedWindow\": {\"start\": \"2025-01-02T04:00:00Z\","
                                 " \"end\": \"2025-01-02T04:00:00Z\"}}";
    CHECK_INT(moat_acme_ari_parse(no_url, strlen(no_url), &a), 0);
    CHECK(a.explanation_url == NULL);
    moat_acme_ari_clear(&a);
    /* End before start, missing fields and junk are ignored (RFC 9773 §4.2). */
    static const char reversed[] = "{\"suggestedWindow\": {\"start\": \"2025-01-03T04:00:00Z\","
                                   " \"end\": \"2025-01-02T04:00:00Z\"}}";
    CHECK_INT(moat_acme_ari_parse(reversed, strlen(reversed), &a), MOAT_EPARSE);
    CHECK_INT(moat_acme_ari_parse("{\"suggestedWindow\": {}}", 22, &a), MOAT_EPARSE);
    CHECK_INT(moat_acme_ari_parse("not json", 8, &a), MOAT_EPARSE);
    CHECK_INT(moat_acme_ari_parse(NULL, 0, &a), MOAT_EPARSE);

    /* Poll interval: Retry-After within 1 min .. 1 day, 6 h without it. */
    CHECK_INT(moat_acme_ari_poll_delay(0), 6 * 3600);
    CHECK_INT(moat_acme_ari_poll_delay(10), 60);
    CHECK_INT(moat_acme_ari_poll_delay(7200), 7200);
    CHECK_INT(moat_acme_ari_poll_delay(10 * 86400), 86400);

    /* Renewal time: a fixed point inside the window, the same for the same certificate. */
    double jt = moat_acme_ari_jitter(rfc_cert_id);
    CHECK(jt >= 0 && jt < 1);
    CHECK(jt == moat_acme_ari_jitter(rfc_cert_id));
    CHECK(jt != moat_acme_ari_jitter("another.id"));
    int64_t at = moat_acme_renew_at(0, 90 * 86400, 1735790400, 1735790400 + 86400, jt);
    CHECK(at >= 1735790400 && at <= 1735790400 + 86400);
    /* A window entirely in the past means renew now: the time is before any "now" today. */
    CHECK(moat_acme_renew_at(0, 90 * 86400, 600, 1200, jt) <= 1200);
}

int main(void)
{
    test_b64url();
    test_jwk_thumbprint();
    test_jws();
    test_alpn_cert();
    test_renewal_and_backoff();
    test_ari();
    return test_summary("acme");
}
