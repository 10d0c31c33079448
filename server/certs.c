/* The certificate snapshot and the certificate manager (include/moat/certs.h). */
#include "moat/certs.h"
#include "moat/acme.h"
#include "moat/common.h"
#include "moat/log.h"
#include "certs_internal.h"

#include <openssl/bio.h>
#include <openssl/bytestring.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/pool.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <arpa/inet.h>
#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

/* Longest DNS name (RFC 1035) plus room for the terminator. */
#define NAME_MAX_LEN 253

struct moat_cert {
    char *id;
    CRYPTO_BUFFER **chain; /* DER, leaf first */
    size_t nchain;
    EVP_PKEY *key;
    int64_t not_after;
};

typedef struct {
    char *name; /* lower-case; IP literals in inet_ntop form */
    moat_cert_t *cert;
} name_entry_t;

struct moat_certs {
    atomic_size_t refs;
    moat_cert_t **certs; /* certs[0] is the default */
    size_t ncerts;
    name_entry_t *names; /* sorted by name for binary search */
    size_t nnames;
};

struct moat_certs_builder {
    moat_certs_t *c;
    size_t certs_cap, names_cap;
};

static int64_t asn1_time_unix(const ASN1_TIME *t)
{
    int days = 0, secs = 0;
    ASN1_TIME *epoch = ASN1_TIME_set(NULL, 0);
    int ok = epoch != NULL && ASN1_TIME_diff(&days, &secs, epoch, t);
    ASN1_TIME_free(epoch);
    return ok ? (int64_t)days * 86400 + secs : 0;
}

/* Canonical form of a name for the table: IP literals as inet_ntop writes them (the form a
 * worker produces from getsockname), everything else lower-case without one trailing dot.
 * Returns 0, or -1 when the name is empty or too long. */
static int normalize_name(const char *in, char out[NAME_MAX_LEN + 1])
{
    size_t n = strlen(in);
    if (n > 0 && in[n - 1] == '.')
        n--;
    if (n == 0 || n > NAME_MAX_LEN)
        return -1;
    for (size_t i = 0; i < n; i++) {
        char ch = in[i];
        out[i] = (ch >= 'A' && ch <= 'Z') ? (char)(ch + 32) : ch;
    }
    out[n] = '\0';
    unsigned char bin[16];
    if (strchr(out, ':') != NULL && inet_pton(AF_INET6, out, bin) == 1)
        inet_ntop(AF_INET6, bin, out, NAME_MAX_LEN + 1);
    return 0;
}

static void cert_free(moat_cert_t *c)
{
    if (c == NULL)
        return;
    for (size_t i = 0; i < c->nchain; i++)
        CRYPTO_BUFFER_free(c->chain[i]);
    free(c->chain);
    EVP_PKEY_free(c->key);
    free(c->id);
    free(c);
}

static void certs_free(moat_certs_t *c)
{
    for (size_t i = 0; i < c->ncerts; i++)
        cert_free(c->certs[i]);
    for (size_t i = 0; i < c->nnames; i++)
        free(c->names[i].name);
    free(c->certs);
    free(c->names);
    free(c);
}

moat_certs_builder_t *moat_certs_builder_new(void)
{
    moat_certs_builder_t *b = moat_xcalloc(1, sizeof *b);
    b->c = moat_xcalloc(1, sizeof *b->c);
    atomic_init(&b->c->refs, 1);
    return b;
}

void moat_certs_builder_free(moat_certs_builder_t *b)
{
    if (b == NULL)
        return;
    certs_free(b->c);
    free(b);
}

/* Parse every CERTIFICATE block of pem into DER buffers. */
static int parse_chain(const char *pem, moat_cert_t *cert)
{
    BIO *bio = BIO_new_mem_buf(pem, -1);
    if (bio == NULL)
        return MOAT_ENOMEM;
    size_t cap = 0;
    X509 *x;
    while ((x = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL) {
        uint8_t *der = NULL;
        int len = i2d_X509(x, &der);
        CRYPTO_BUFFER *buf = len > 0 ? CRYPTO_BUFFER_new(der, (size_t)len, NULL) : NULL;
        if (cert->nchain == 0)
            cert->not_after = asn1_time_unix(X509_get0_notAfter(x));
        OPENSSL_free(der);
        X509_free(x);
        if (buf == NULL) {
            BIO_free(bio);
            return MOAT_ECRYPTO;
        }
        if (cert->nchain == cap) {
            cap = cap ? cap * 2 : 4;
            cert->chain = moat_xrealloc(cert->chain, cap * sizeof *cert->chain);
        }
        cert->chain[cert->nchain++] = buf;
    }
    /* The loop ends on "no more PEM" (expected) or on a damaged block (not expected). */
    uint32_t e = ERR_peek_last_error();
    int clean = ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE;
    ERR_clear_error();
    BIO_free(bio);
    return (cert->nchain > 0 && (clean || e == 0)) ? 0 : MOAT_ECRYPTO;
}

static int name_cmp(const void *a, const void *b)
{
    return strcmp(((const name_entry_t *)a)->name, ((const name_entry_t *)b)->name);
}

int moat_certs_builder_add(moat_certs_builder_t *b, const char *id, const char *const *names,
                           size_t n, const char *chain_pem, const char *key_pem, char *err,
                           size_t errlen)
{
    moat_cert_t *cert = moat_xcalloc(1, sizeof *cert);
    cert->id = moat_xstrdup(id ? id : "");
    if (parse_chain(chain_pem, cert) != 0) {
        moat_errf(err, errlen, "%s: the certificate chain cannot be parsed", cert->id);
        cert_free(cert);
        return MOAT_ECRYPTO;
    }
    BIO *bio = BIO_new_mem_buf(key_pem, -1);
    cert->key = bio ? PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL) : NULL;
    BIO_free(bio);
    ERR_clear_error();
    if (cert->key == NULL) {
        moat_errf(err, errlen, "%s: the private key cannot be parsed", cert->id);
        cert_free(cert);
        return MOAT_ECRYPTO;
    }

    moat_certs_t *c = b->c;
    if (c->ncerts == b->certs_cap) {
        b->certs_cap = b->certs_cap ? b->certs_cap * 2 : 8;
        c->certs = moat_xrealloc(c->certs, b->certs_cap * sizeof *c->certs);
    }
    c->certs[c->ncerts++] = cert;
    for (size_t i = 0; i < n; i++) {
        char norm[NAME_MAX_LEN + 1];
        if (normalize_name(names[i], norm) != 0)
            continue;
        /* Linear scan: the builder runs on the control thread over a handful of sites. */
        int taken = 0;
        for (size_t j = 0; j < c->nnames && !taken; j++)
            taken = strcmp(c->names[j].name, norm) == 0;
        if (taken) {
            MOAT_DEBUG("certificate %s: name %s already served by an earlier certificate", cert->id,
                       norm);
            continue;
        }
        if (c->nnames == b->names_cap) {
            b->names_cap = b->names_cap ? b->names_cap * 2 : 16;
            c->names = moat_xrealloc(c->names, b->names_cap * sizeof *c->names);
        }
        c->names[c->nnames++] = (name_entry_t){moat_xstrdup(norm), cert};
    }
    return 0;
}

moat_certs_t *moat_certs_builder_finish(moat_certs_builder_t *b)
{
    moat_certs_t *c = b->c;
    if (c->nnames > 1)
        qsort(c->names, c->nnames, sizeof *c->names, name_cmp);
    free(b);
    return c;
}

moat_certs_t *moat_certs_ref(moat_certs_t *c)
{
    if (c != NULL)
        atomic_fetch_add_explicit(&c->refs, 1, memory_order_relaxed);
    return c;
}

void moat_certs_release(moat_certs_t *c)
{
    if (c != NULL && atomic_fetch_sub_explicit(&c->refs, 1, memory_order_acq_rel) == 1)
        certs_free(c);
}

static const moat_cert_t *find(const moat_certs_t *c, const char *name)
{
    char norm[NAME_MAX_LEN + 1];
    if (normalize_name(name, norm) != 0)
        return NULL;
    size_t lo = 0, hi = c->nnames;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int r = strcmp(norm, c->names[mid].name);
        if (r == 0)
            return c->names[mid].cert;
        if (r < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

const moat_cert_t *moat_certs_lookup(const moat_certs_t *c, const char *sni, const char *local_ip)
{
    if (c == NULL)
        return NULL;
    if (sni != NULL && sni[0] != '\0') {
        /* The exact name, else a wildcard for its parent: "*.example.com" serves
         * a.example.com, never example.com nor a.b.example.com. */
        const moat_cert_t *exact = find(c, sni);
        const char *dot = strchr(sni, '.');
        if (exact != NULL || dot == NULL || dot == sni || strchr(dot + 1, '.') == NULL ||
            strlen(dot) > NAME_MAX_LEN - 1)
            return exact;
        char wild[NAME_MAX_LEN + 1];
        snprintf(wild, sizeof wild, "*%s", dot);
        return find(c, wild);
    }
    if (local_ip != NULL) {
        const moat_cert_t *cert = find(c, local_ip);
        if (cert != NULL)
            return cert;
    }
    return moat_certs_default(c);
}

const moat_cert_t *moat_certs_default(const moat_certs_t *c)
{
    return (c != NULL && c->ncerts > 0) ? c->certs[0] : NULL;
}

size_t moat_certs_count(const moat_certs_t *c)
{
    return c ? c->ncerts : 0;
}

const moat_cert_t *moat_certs_at(const moat_certs_t *c, size_t i)
{
    return c && i < c->ncerts ? c->certs[i] : NULL;
}

int64_t moat_cert_next_renewal(const moat_cert_record_t *r)
{
    if (r->source == NULL || strcmp(r->source, "files") == 0)
        return 0;
    if (strcmp(r->source, "acme") == 0)
        return moat_acme_renew_at(r->not_before, r->not_after, 0, 0, 0);
    return r->not_before + (r->not_after - r->not_before) * 2 / 3;
}

int moat_cert_install(const moat_cert_t *cert, SSL *ssl)
{
    return SSL_set_chain_and_key(ssl, cert->chain, cert->nchain, cert->key, NULL) ? 0 : MOAT_ETLS;
}

const char *moat_cert_id(const moat_cert_t *cert)
{
    return cert->id;
}

int64_t moat_cert_not_after(const moat_cert_t *cert)
{
    return cert->not_after;
}

/* ---------------------------------------------------------------------------------------- */
/* Certificate manager                                                                      */

static char *read_file(const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        moat_errf(err, errlen, "%s: cannot read: %s", path, strerror(errno));
        return NULL;
    }
    moat_buf_t b = {0};
    char tmp[4096];
    size_t n;
    while ((n = fread(tmp, 1, sizeof tmp, f)) > 0) {
        /* Certificate files are small; refuse anything absurd rather than read it all. */
        if (moat_buf_size(&b) + n > 1024 * 1024) {
            moat_errf(err, errlen, "%s: file is larger than 1 MiB; is this a certificate?", path);
            fclose(f);
            moat_buf_free(&b);
            return NULL;
        }
        if (moat_buf_append(&b, tmp, n) != 0)
            abort();
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        moat_errf(err, errlen, "%s: cannot read: %s", path, strerror(errno));
        moat_buf_free(&b);
        return NULL;
    }
    char *s = moat_xstrndup(moat_buf_data(&b), moat_buf_size(&b));
    moat_buf_free(&b);
    return s;
}

static void describe(X509 *x, char *out, size_t cap)
{
    char cn[128];
    if (X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, sizeof cn) <= 0)
        snprintf(cn, sizeof cn, "no common name");
    snprintf(out, cap, "\"%s\"", cn);
}

static void format_date(int64_t t, char *out, size_t cap)
{
    time_t tt = (time_t)t;
    struct tm tm;
    gmtime_r(&tt, &tm);
    strftime(out, cap, "%Y-%m-%d %H:%M UTC", &tm);
}

/* NULL when BoringSSL takes chain and key for a handshake the way moat_cert_install will, else
 * its reason. Its TLS stack parses the leaf again, more strictly than the X509 parser that read
 * the file (the key's type and parameters, the keyUsage extension): a certificate that passed
 * every check above could still fail every handshake. */
static const char *tls_unusable(STACK_OF(X509) * chain, EVP_PKEY *key)
{
    size_t n = sk_X509_num(chain);
    CRYPTO_BUFFER **bufs = moat_xcalloc(n, sizeof *bufs);
    SSL_CTX *ctx = SSL_CTX_new(TLS_method());
    int ok = ctx != NULL;
    for (size_t i = 0; i < n && ok; i++) {
        uint8_t *der = NULL;
        int len = i2d_X509(sk_X509_value(chain, i), &der);
        bufs[i] = len > 0 ? CRYPTO_BUFFER_new(der, (size_t)len, NULL) : NULL;
        OPENSSL_free(der);
        ok = bufs[i] != NULL;
    }
    ok = ok && SSL_CTX_set_chain_and_key(ctx, bufs, n, key, NULL);
    const char *why = NULL;
    if (!ok) {
        why = ERR_reason_error_string(ERR_peek_error());
        why = why ? why : "unsupported key or certificate";
    }
    ERR_clear_error();
    for (size_t i = 0; i < n; i++)
        CRYPTO_BUFFER_free(bufs[i]);
    free(bufs);
    SSL_CTX_free(ctx);
    return why;
}

int moat_certmgr_load_files(const char *cert_path, const char *key_path, char **chain_pem,
                            char **key_pem, int64_t *not_before, int64_t *not_after, char *err,
                            size_t errlen)
{
    *chain_pem = *key_pem = NULL;
    char *cert_text = read_file(cert_path, err, errlen);
    char *key_text = cert_text ? read_file(key_path, err, errlen) : NULL;
    int rc = MOAT_EIO;
    if (cert_text != NULL && key_text != NULL)
        rc = moat__certs_check_pem(cert_path, cert_text, key_path, key_text, chain_pem, key_pem,
                                   not_before, not_after, err, errlen);
    free(cert_text);
    if (key_text != NULL)
        moat_secret_free(key_text);
    return rc;
}

int moat__certs_check_pem(const char *cert_path, const char *cert_text, const char *key_path,
                          const char *key_text, char **chain_pem, char **key_pem,
                          int64_t *not_before, int64_t *not_after, char *err, size_t errlen)
{
    *chain_pem = *key_pem = NULL;
    int rc = MOAT_ECRYPTO;
    STACK_OF(X509) *chain = sk_X509_new_null();
    EVP_PKEY *key = NULL;
    BIO *out = BIO_new(BIO_s_mem());
    if (chain == NULL || out == NULL)
        abort();

    ERR_clear_error();
    BIO *bio = BIO_new_mem_buf(cert_text, -1);
    X509 *x;
    while (bio != NULL && (x = PEM_read_bio_X509(bio, NULL, NULL, NULL)) != NULL)
        sk_X509_push(chain, x);
    BIO_free(bio);
    /* The loop ends at "no more PEM" or at a block that does not parse. Stopping quietly at a
     * damaged block would serve the certificates before it as the whole chain (and the
     * snapshot builder, which reads the stored text again, would refuse it later). */
    uint32_t e = ERR_peek_last_error();
    int damaged =
        e != 0 && !(ERR_GET_LIB(e) == ERR_LIB_PEM && ERR_GET_REASON(e) == PEM_R_NO_START_LINE);
    ERR_clear_error();
    size_t n = sk_X509_num(chain);
    if (damaged) {
        moat_errf(err, errlen,
                  "%s: certificate %zu cannot be parsed (a damaged or truncated PEM block)",
                  cert_path, n + 1);
        goto out;
    }
    if (n == 0) {
        moat_errf(err, errlen,
                  "%s: no PEM certificate found (expected \"-----BEGIN CERTIFICATE-----\")",
                  cert_path);
        goto out;
    }
    bio = BIO_new_mem_buf(key_text, -1);
    key = bio ? PEM_read_bio_PrivateKey(bio, NULL, NULL, NULL) : NULL;
    BIO_free(bio);
    ERR_clear_error();
    if (key == NULL) {
        moat_errf(err, errlen,
                  "%s: no usable private key found (expected an unencrypted PEM key: \"-----BEGIN "
                  "PRIVATE KEY-----\", EC or RSA)",
                  key_path);
        goto out;
    }
    X509 *leaf = sk_X509_value(chain, 0);
    if (!X509_check_private_key(leaf, key)) {
        ERR_clear_error();
        moat_errf(err, errlen, "%s: the private key does not match the first certificate in %s",
                  key_path, cert_path);
        goto out;
    }
    char a[160], b[160], when[64];
    const char *why = tls_unusable(chain, key);
    if (why != NULL) {
        describe(leaf, a, sizeof a);
        moat_errf(err, errlen, "%s: certificate 1 (%s) cannot be used for TLS (%s)", cert_path, a,
                  why);
        goto out;
    }
    for (size_t i = 0; i + 1 < n; i++) {
        X509 *child = sk_X509_value(chain, i), *parent = sk_X509_value(chain, i + 1);
        EVP_PKEY *pk = X509_get_pubkey(parent);
        int ok = X509_check_issued(parent, child) == X509_V_OK && pk != NULL &&
                 X509_verify(child, pk) == 1;
        EVP_PKEY_free(pk);
        ERR_clear_error();
        if (!ok) {
            describe(child, a, sizeof a);
            describe(parent, b, sizeof b);
            moat_errf(err, errlen,
                      "%s: certificate %zu (%s) is not issued by certificate %zu (%s); the file "
                      "must hold the site's certificate first, then each issuer in order",
                      cert_path, i + 1, a, i + 2, b);
            goto out;
        }
    }
    int64_t now = (int64_t)time(NULL);
    for (size_t i = 0; i < n; i++) {
        X509 *c = sk_X509_value(chain, i);
        int64_t na = asn1_time_unix(X509_get0_notAfter(c));
        if (na <= now) {
            describe(c, a, sizeof a);
            format_date(na, when, sizeof when);
            moat_errf(err, errlen, "%s: certificate %zu (%s) expired on %s", cert_path, i + 1, a,
                      when);
            goto out;
        }
    }
    *not_before = asn1_time_unix(X509_get0_notBefore(leaf));
    *not_after = asn1_time_unix(X509_get0_notAfter(leaf));
    if (*not_after - now < MOAT_CERTS_FILES_WARN_DAYS * 86400LL) {
        format_date(*not_after, when, sizeof when);
        MOAT_WARN("%s: the certificate expires on %s; replace the file soon", cert_path, when);
    }
    for (size_t i = 0; i < n; i++)
        if (!PEM_write_bio_X509(out, sk_X509_value(chain, i)))
            goto out;
    const uint8_t *data;
    size_t len;
    if (!BIO_mem_contents(out, &data, &len))
        goto out;
    *chain_pem = moat_xstrndup((const char *)data, len);
    BIO_reset(out);
    if (!PEM_write_bio_PrivateKey(out, key, NULL, NULL, 0, NULL, NULL) ||
        !BIO_mem_contents(out, &data, &len)) {
        free(*chain_pem);
        *chain_pem = NULL;
        goto out;
    }
    *key_pem = moat_xstrndup((const char *)data, len);
    rc = 0;
out:
    if (rc == MOAT_ECRYPTO && err != NULL && err[0] == '\0')
        moat_errf(err, errlen, "%s: cannot process the certificate", cert_path);
    ERR_clear_error();
    sk_X509_pop_free(chain, X509_free);
    EVP_PKEY_free(key);
    BIO_free(out);
    return rc;
}

static int str_cmp(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The names one site needs a certificate for: the hosts of its TLS addresses, in the order
 * written, without duplicates. Returns the count; *out is an array of borrowed strings. */
static size_t site_names(const moat_site_t *s, const char ***out)
{
    const char **names = moat_xcalloc(s->naddrs ? s->naddrs : 1, sizeof *names);
    size_t n = 0;
    for (size_t i = 0; i < s->naddrs; i++) {
        const moat_site_addr_t *a = &s->addrs[i];
        if (a->plain_http || a->host == NULL || a->host[0] == '\0')
            continue;
        int dup = 0;
        for (size_t j = 0; j < n && !dup; j++)
            dup = strcmp(names[j], a->host) == 0;
        if (!dup)
            names[n++] = a->host;
    }
    *out = names;
    return n;
}

static char *join(const char *const *names, size_t n, const char *prefix)
{
    moat_buf_t b = {0};
    /* Reserve up front: appending zero bytes to an empty buffer reports no memory. */
    if (moat_buf_reserve(&b, 64) == NULL || moat_buf_append(&b, prefix, strlen(prefix)) != 0)
        abort();
    for (size_t i = 0; i < n; i++)
        if ((i && moat_buf_append(&b, ",", 1) != 0) ||
            moat_buf_append(&b, names[i], strlen(names[i])) != 0)
            abort();
    char *s = moat_xstrndup(moat_buf_data(&b), moat_buf_size(&b));
    moat_buf_free(&b);
    return s;
}

static int64_t renew_at(int64_t nb, int64_t na)
{
    return nb + (na - nb) * 2 / 3;
}

static int site_files(moat_storage_t *st, const moat_site_t *s, const char *const *names, size_t n,
                      moat_certs_builder_t *b, int64_t *next, char *err, size_t errlen)
{
    if (s->tls_cert == NULL || s->tls_key == NULL) {
        moat_errf(err, errlen, "%s: tls=files needs both tls_cert and tls_key", names[0]);
        return MOAT_EINVAL;
    }
    char *chain = NULL, *key = NULL;
    int64_t nb = 0, na = 0;
    int rc = moat_certmgr_load_files(s->tls_cert, s->tls_key, &chain, &key, &nb, &na, err, errlen);
    if (rc != 0)
        return rc;
    char *id = join(names, 1, "files:"), *all = join(names, n, "");

    /* The file may not cover every name the site answers on: warn, do not refuse, since the
     * operator may know better (a client pinned to another name, say). */
    BIO *bio = BIO_new_mem_buf(chain, -1);
    X509 *leaf = bio ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;
    BIO_free(bio);
    char issuer[256] = "";
    if (leaf != NULL) {
        X509_NAME_get_text_by_NID(X509_get_issuer_name(leaf), NID_commonName, issuer,
                                  sizeof issuer);
        for (size_t i = 0; i < n; i++) {
            int ip = strchr(names[i], ':') != NULL || moat_host_is_internal(names[i]);
            int ok = X509_check_host(leaf, names[i], strlen(names[i]), 0, NULL) == 1 ||
                     (ip && X509_check_ip_asc(leaf, names[i], 0) == 1);
            if (!ok)
                MOAT_WARN("%s: the certificate does not cover the name %s", s->tls_cert, names[i]);
        }
    }
    X509_free(leaf);
    ERR_clear_error();

    moat_cert_record_t rec = {
        .id = id,
        .names = all,
        .issuer = issuer,
        .source = (char *)"files",
        .not_before = nb,
        .not_after = na,
        .cert_pem = chain,
        .key_pem = key,
        .updated_at = (int64_t)time(NULL),
    };
    rc = st->ops->put_cert(st, &rec);
    if (rc != 0)
        moat_errf(err, errlen, "%s: cannot store the certificate: %s", s->tls_cert,
                  moat_storage_last_error(st));
    if (rc == 0)
        rc = moat_certs_builder_add(b, id, names, n, chain, key, err, errlen);
    if (rc == 0) {
        /* Files are re-read at the next check: warn daily once inside the warning window. */
        int64_t now = (int64_t)time(NULL), warn = na - MOAT_CERTS_FILES_WARN_DAYS * 86400LL;
        int64_t t = warn > now ? warn : now + 86400;
        *next = MOAT_MIN(*next, t);
    }
    free(id);
    free(all);
    free(chain);
    moat_secret_free(key);
    return rc;
}

static int site_internal(moat_storage_t *st, moat_ca_t *ca, const moat_site_t *s,
                         const char *const *names, size_t n, moat_certs_builder_t *b, int64_t *next,
                         char *err, size_t errlen)
{
    (void)s;
    if (ca == NULL) {
        moat_errf(err, errlen, "%s: no internal CA is available to issue a certificate", names[0]);
        return MOAT_EINVAL;
    }
    const char **sorted = moat_xcalloc(n, sizeof *sorted);
    memcpy(sorted, names, n * sizeof *sorted);
    qsort(sorted, n, sizeof *sorted, str_cmp);
    char *id = join(sorted, n, "internal:"), *all = join(sorted, n, "");
    int64_t now = (int64_t)time(NULL);

    moat_cert_record_t rec;
    int rc = st->ops->get_cert(st, id, &rec);
    int found = rc == 0;
    if (rc != 0 && rc != MOAT_ENOT_FOUND) {
        moat_errf(err, errlen, "%s: cannot read the stored certificate: %s", names[0],
                  moat_storage_last_error(st));
        goto out;
    }
    if (found && rec.cert_pem && rec.key_pem && now < renew_at(rec.not_before, rec.not_after)) {
        rc = moat_certs_builder_add(b, id, names, n, rec.cert_pem, rec.key_pem, NULL, 0);
        if (rc == 0) {
            *next = MOAT_MIN(*next, renew_at(rec.not_before, rec.not_after));
            goto out;
        }
        MOAT_WARN("%s: the stored certificate cannot be parsed; issuing a new one", id);
    }

    char *chain = NULL, *key = NULL;
    int renewed = 0;
    rc = moat_ca_maintain(ca, &renewed, err, errlen);
    if (rc == 0)
        rc = moat_ca_issue(ca, sorted, n, MOAT_CA_LEAF_LIFETIME, &chain, &key);
    if (rc != 0) {
        if (err && err[0] == '\0')
            moat_errf(err, errlen, "%s: the internal CA could not issue a certificate: %s",
                      names[0], moat_strerror(rc));
        goto out;
    }
    moat_cert_record_t nrec = {
        .id = id,
        .names = all,
        .issuer = (char *)moat_ca_intermediate_name(ca),
        .source = (char *)"internal",
        .not_before = now - 300,
        .not_after = now + MOAT_CA_LEAF_LIFETIME,
        .cert_pem = chain,
        .key_pem = key,
        .updated_at = now,
    };
    /* Read the real validity back: the CA clamps not_after to its intermediate's expiry. */
    BIO *bio = BIO_new_mem_buf(chain, -1);
    X509 *leaf = bio ? PEM_read_bio_X509(bio, NULL, NULL, NULL) : NULL;
    BIO_free(bio);
    if (leaf != NULL) {
        nrec.not_before = asn1_time_unix(X509_get0_notBefore(leaf));
        nrec.not_after = asn1_time_unix(X509_get0_notAfter(leaf));
        X509_free(leaf);
    }
    const char *kind = found ? "renewed" : "issued";
    rc = st->ops->begin(st);
    if (rc == 0)
        rc = st->ops->put_cert(st, &nrec);
    if (rc == 0)
        rc = st->ops->add_event(st, kind, all, nrec.issuer);
    if (rc == 0)
        rc = st->ops->commit(st);
    if (rc != 0) {
        st->ops->rollback(st);
        moat_errf(err, errlen, "%s: cannot store the new certificate: %s", names[0],
                  moat_storage_last_error(st));
    } else {
        MOAT_INFO("%s a certificate for %s from the internal CA (valid until %lld)", kind, all,
                  (long long)nrec.not_after);
        rc = moat_certs_builder_add(b, id, names, n, chain, key, err, errlen);
        *next = MOAT_MIN(*next, renew_at(nrec.not_before, nrec.not_after));
    }
    free(chain);
    if (key != NULL) {
        moat_secret_free(key);
    }
out:
    if (found)
        moat_cert_record_clear(&rec);
    free(sorted);
    free(id);
    free(all);
    return rc;
}

int moat_certs_site_uses_acme(const moat_site_t *s, const char *name)
{
    if (s->tls == MOAT_TLS_ACME)
        return 1;
    return s->tls == MOAT_TLS_AUTO && !moat_host_is_internal(name);
}

size_t moat_certs_site_acme_names(const moat_site_t *s, const char ***out)
{
    const char **all;
    size_t n = site_names(s, &all), k = 0;
    if (s->tls != MOAT_TLS_FILES)
        for (size_t i = 0; i < n; i++)
            if (moat_certs_site_uses_acme(s, all[i]))
                all[k++] = all[i];
    *out = all;
    return k;
}

char *moat_certs_acme_id(const char *const *names, size_t n)
{
    const char **sorted = moat_xcalloc(n ? n : 1, sizeof *sorted);
    memcpy(sorted, names, n * sizeof *sorted);
    qsort(sorted, n, sizeof *sorted, str_cmp);
    char *id = join(sorted, n, "acme:");
    free(sorted);
    return id;
}

/* A stored ACME certificate serves until it expires; renewing it is the ACME manager's job.
 * Without one the names are pending: they get no certificate, so their handshakes are refused
 * rather than answered with a stand-in that would teach users to click through warnings. */
static void site_acme(moat_storage_t *st, const char *const *names, size_t n,
                      moat_certs_builder_t *b, int64_t *next)
{
    char *id = moat_certs_acme_id(names, n);
    moat_cert_record_t rec;
    int64_t now = (int64_t)time(NULL);
    int rc = st->ops->get_cert(st, id, &rec);
    if (rc == 0 && rec.cert_pem && rec.key_pem && now < rec.not_after) {
        char err[256] = "";
        if (moat_certs_builder_add(b, id, names, n, rec.cert_pem, rec.key_pem, err, sizeof err) ==
            0)
            *next = MOAT_MIN(*next, rec.not_after);
        else
            MOAT_WARN("%s: the stored certificate cannot be used: %s", id, err);
    } else {
        MOAT_INFO("%s: certificate pending (ACME); HTTPS handshakes for %s%s are refused until "
                  "it is issued",
                  id, names[0], n > 1 ? " and its other names" : "");
    }
    if (rc == 0)
        moat_cert_record_clear(&rec);
    free(id);
}

int moat_certmgr_build(moat_storage_t *st, moat_ca_t *ca, const moat_config_t *cfg,
                       moat_certs_t **out, int64_t *next_check_unix, char *err, size_t errlen)
{
    *out = NULL;
    if (err && errlen)
        err[0] = '\0';
    int64_t next = INT64_MAX;
    moat_certs_builder_t *b = moat_certs_builder_new();
    int rc = 0;
    for (size_t i = 0; rc == 0 && i < cfg->nsites; i++) {
        const moat_site_t *s = &cfg->sites[i];
        const char **names;
        size_t n = site_names(s, &names);
        if (n > 0 && s->tls == MOAT_TLS_FILES) {
            rc = site_files(st, s, names, n, b, &next, err, errlen);
        } else if (n > 0) {
            /* One site line may mix public and internal names: the public ones share an ACME
             * certificate, the rest one from the internal CA. */
            const char **acme = moat_xcalloc(n, sizeof *acme),
                       **internal = moat_xcalloc(n, sizeof *acme);
            size_t na = 0, ni = 0;
            for (size_t k = 0; k < n; k++) {
                if (moat_certs_site_uses_acme(s, names[k]))
                    acme[na++] = names[k];
                else
                    internal[ni++] = names[k];
            }
            if (ni > 0)
                rc = site_internal(st, ca, s, internal, ni, b, &next, err, errlen);
            if (rc == 0 && na > 0)
                site_acme(st, acme, na, b, &next);
            free(acme);
            free(internal);
        }
        free(names);
    }
    if (rc != 0) {
        moat_certs_builder_free(b);
        return rc;
    }
    if (ca != NULL)
        next = MOAT_MIN(next, moat_ca_next_renewal(ca));
    *out = moat_certs_builder_finish(b);
    *next_check_unix = next;
    return 0;
}
