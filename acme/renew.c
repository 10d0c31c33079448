/* Renewal and backoff arithmetic (include/moat/acme.h). Pure functions, so the schedule can be
 * tested without a clock. */
#include "moat/acme.h"

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/sha.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <ctype.h>
#include <jansson.h>
#include <stdlib.h>
#include <strings.h>
#include <time.h>

int64_t moat_acme_renew_at(int64_t not_before, int64_t not_after, int64_t ari_start,
                           int64_t ari_end, double jitter)
{
    if (ari_start > 0 && ari_end >= ari_start) {
        if (jitter < 0)
            jitter = 0;
        if (jitter > 1)
            jitter = 1;
        return ari_start + (int64_t)((double)(ari_end - ari_start) * jitter);
    }
    /* A third of the lifetime left: 30 days of a 90-day certificate, 2 days of a 6-day one. */
    int64_t life = not_after > not_before ? not_after - not_before : 0;
    return not_after - life / 3;
}

int64_t moat_acme_backoff(int failures, int64_t retry_after, int rate_limited)
{
    if (failures < 1)
        failures = 1;
    int64_t d = MOAT_ACME_BACKOFF_MIN;
    for (int i = 1; i < failures && d < MOAT_ACME_BACKOFF_MAX; i++)
        d *= 2;
    if (d > MOAT_ACME_BACKOFF_MAX)
        d = MOAT_ACME_BACKOFF_MAX;
    if (rate_limited && retry_after <= 0 && d < 3600)
        d = 3600;
    /* The CA knows its own limits: a longer Retry-After always wins, even past 6 h. */
    if (retry_after > d)
        d = retry_after;
    return d;
}

int64_t moat_acme_parse_retry_after(const char *v, int64_t now)
{
    if (v == NULL)
        return 0;
    while (*v == ' ')
        v++;
    if (isdigit((unsigned char)*v)) {
        char *end;
        long long n = strtoll(v, &end, 10);
        return (*end == '\0' || *end == ' ') && n > 0 ? (int64_t)n : 0;
    }
    struct tm tm = {0};
    const char *e = strptime(v, "%a, %d %b %Y %H:%M:%S GMT", &tm);
    if (e == NULL)
        return 0;
    int64_t t = (int64_t)timegm(&tm);
    return t > now ? t - now : 0;
}

/* --- ARI (RFC 9773) -------------------------------------------------------------------------- */

char *moat_acme_ari_cert_id(const uint8_t *aki, size_t aki_len, const uint8_t *serial,
                            size_t serial_len)
{
    if (aki == NULL || aki_len == 0 || serial == NULL || serial_len == 0)
        return NULL;
    char *a = moat_b64url(aki, aki_len), *b = moat_b64url(serial, serial_len);
    char *id = NULL;
    if (a && b) {
        size_t la = strlen(a), lb = strlen(b);
        id = moat_xmalloc(la + lb + 2);
        memcpy(id, a, la);
        id[la] = '.';
        memcpy(id + la + 1, b, lb + 1);
    }
    free(a);
    free(b);
    return id;
}

char *moat_acme_ari_cert_id_pem(const char *cert_pem)
{
    if (cert_pem == NULL)
        return NULL;
    BIO *bio = BIO_new_mem_buf(cert_pem, -1);
    X509 *x = bio ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;
    BIO_free(bio);
    char *id = NULL;
    if (x != NULL) {
        const ASN1_OCTET_STRING *kid = X509_get0_authority_key_id(x);
        /* The serial's DER content octets keep the leading zero a positive number may need
         * (RFC 9773 §4.1), which is exactly what i2d writes after the tag and length. */
        uint8_t *der = NULL;
        int len = i2d_ASN1_INTEGER(X509_get0_serialNumber(x), &der);
        if (kid != NULL && len > 2 && der[1] < 0x80) {
            id = moat_acme_ari_cert_id(ASN1_STRING_get0_data(kid), (size_t)ASN1_STRING_length(kid),
                                       der + 2, (size_t)len - 2);
        } else if (kid != NULL && len > 3 && der[1] == 0x81) {
            id = moat_acme_ari_cert_id(ASN1_STRING_get0_data(kid), (size_t)ASN1_STRING_length(kid),
                                       der + 3, (size_t)len - 3);
        }
        OPENSSL_free(der);
        X509_free(x);
    }
    ERR_clear_error();
    return id;
}

static int digits(const char *s, int n, int *out)
{
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (!isdigit((unsigned char)s[i]))
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    *out = v;
    return 0;
}

int64_t moat_acme_parse_rfc3339(const char *s)
{
    int y, mo, d, h, mi, se;
    if (s == NULL || strlen(s) < 20 || digits(s, 4, &y) || s[4] != '-' || digits(s + 5, 2, &mo) ||
        s[7] != '-' || digits(s + 8, 2, &d) || (s[10] != 'T' && s[10] != 't' && s[10] != ' ') ||
        digits(s + 11, 2, &h) || s[13] != ':' || digits(s + 14, 2, &mi) || s[16] != ':' ||
        digits(s + 17, 2, &se))
        return -1;
    if (mo < 1 || mo > 12 || d < 1 || d > 31 || h > 23 || mi > 59 || se > 60)
        return -1;
    const char *p = s + 19;
    if (*p == '.') {
        p++;
        if (!isdigit((unsigned char)*p))
            return -1;
        while (isdigit((unsigned char)*p))
            p++;
    }
    int64_t off = 0;
    if (*p == 'Z' || *p == 'z') {
        p++;
    } else if (*p == '+' || *p == '-') {
        int oh, om;
        if (digits(p + 1, 2, &oh) || p[3] != ':' || digits(p + 4, 2, &om) || oh > 23 || om > 59)
            return -1;
        off = (int64_t)(oh * 3600 + om * 60) * (*p == '-' ? -1 : 1);
        p += 6;
    } else {
        return -1;
    }
    if (*p != '\0')
        return -1;
    struct tm tm = {0};
    tm.tm_year = y - 1900;
    tm.tm_mon = mo - 1;
    tm.tm_mday = d;
    tm.tm_hour = h;
    tm.tm_min = mi;
    tm.tm_sec = se > 59 ? 59 : se; /* a leap second counts as the one before it */
    return (int64_t)timegm(&tm) - off;
}

void moat_acme_ari_clear(moat_acme_ari_t *a)
{
    free(a->explanation_url);
    memset(a, 0, sizeof *a);
}

int moat_acme_ari_parse(const char *body, size_t len, moat_acme_ari_t *out)
{
    memset(out, 0, sizeof *out);
    json_t *j = body ? json_loadb(body, len, 0, NULL) : NULL;
    json_t *w = json_object_get(j, "suggestedWindow");
    int64_t start = moat_acme_parse_rfc3339(json_string_value(json_object_get(w, "start")));
    int64_t end = moat_acme_parse_rfc3339(json_string_value(json_object_get(w, "end")));
    int rc = MOAT_EPARSE;
    if (start > 0 && end >= start) {
        out->start = start;
        out->end = end;
        const char *u = json_string_value(json_object_get(j, "explanationURL"));
        if (u != NULL && *u)
            out->explanation_url = moat_xstrdup(u);
        rc = 0;
    }
    json_decref(j);
    return rc;
}

int64_t moat_acme_ari_poll_delay(int64_t retry_after)
{
    int64_t d = retry_after > 0 ? retry_after : MOAT_ACME_ARI_POLL_DEFAULT;
    return MOAT_MAX(MOAT_ACME_ARI_POLL_MIN, MOAT_MIN(d, MOAT_ACME_ARI_POLL_MAX));
}

double moat_acme_ari_jitter(const char *cert_id)
{
    uint8_t h[SHA256_DIGEST_LENGTH];
    SHA256((const uint8_t *)cert_id, cert_id ? strlen(cert_id) : 0, h);
    uint32_t v = (uint32_t)h[0] << 24 | (uint32_t)h[1] << 16 | (uint32_t)h[2] << 8 | h[3];
    return (double)v / 4294967296.0;
}
