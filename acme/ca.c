/* The internal CA (include/moat/ca.h): root + intermediate kept in storage, leaves on demand. */
#include "moat/ca.h"
#include "moat/common.h"
#include "moat/log.h"

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/mem.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

struct moat_ca {
    moat_storage_t *st;
    X509 *root;
    EVP_PKEY *root_key;
    char *root_pem;
    X509 *inter;
    EVP_PKEY *inter_key;
    char *inter_pem;
    char *inter_cn;
    int64_t inter_nb, inter_na;
};

typedef enum { CERT_ROOT, CERT_INTERMEDIATE, CERT_LEAF } cert_kind_t;

static int64_t now_unix(void)
{
    return (int64_t)time(NULL);
}

/* Renewal is due once two thirds of the validity window has passed: that leaves a third of the
 * lifetime to retry if storage or issuance fails. */
static int64_t renew_at(int64_t nb, int64_t na)
{
    return nb + (na - nb) * 2 / 3;
}

static EVP_PKEY *new_p256_key(void)
{
    EVP_PKEY *key = NULL;
    EVP_PKEY_CTX *kctx = EVP_PKEY_CTX_new_id(EVP_PKEY_EC, NULL);
    if (kctx == NULL || !EVP_PKEY_keygen_init(kctx) ||
        !EVP_PKEY_CTX_set_ec_paramgen_curve_nid(kctx, NID_X9_62_prime256v1) ||
        !EVP_PKEY_keygen(kctx, &key))
        key = NULL;
    EVP_PKEY_CTX_free(kctx);
    return key;
}

static char *bio_to_string(BIO *b)
{
    const uint8_t *data;
    size_t len;
    if (!BIO_mem_contents(b, &data, &len))
        return NULL;
    return moat_xstrndup((const char *)data, len);
}

static char *cert_to_pem(X509 *x)
{
    BIO *b = BIO_new(BIO_s_mem());
    char *s = NULL;
    if (b != NULL && PEM_write_bio_X509(b, x))
        s = bio_to_string(b);
    BIO_free(b);
    return s;
}

static char *key_to_pem(EVP_PKEY *k)
{
    BIO *b = BIO_new(BIO_s_mem());
    char *s = NULL;
    if (b != NULL && PEM_write_bio_PrivateKey(b, k, NULL, NULL, 0, NULL, NULL))
        s = bio_to_string(b);
    BIO_free(b);
    return s;
}

static X509 *cert_from_pem(const char *pem)
{
    BIO *b = BIO_new_mem_buf(pem, -1);
    X509 *x = b ? PEM_read_bio_X509(b, NULL, NULL, NULL) : NULL;
    BIO_free(b);
    return x;
}

static EVP_PKEY *key_from_pem(const char *pem)
{
    BIO *b = BIO_new_mem_buf(pem, -1);
    EVP_PKEY *k = b ? PEM_read_bio_PrivateKey(b, NULL, NULL, NULL) : NULL;
    BIO_free(b);
    return k;
}

static char *subject_cn(X509 *x)
{
    char buf[256];
    int n = X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, buf, sizeof buf);
    return moat_xstrdup(n > 0 ? buf : "");
}

static int add_ext(X509 *x, X509V3_CTX *ctx, int nid, const char *value)
{
    X509_EXTENSION *ext = X509V3_EXT_nconf_nid(NULL, ctx, nid, value);
    if (ext == NULL)
        return 0;
    int ok = X509_add_ext(x, ext, -1);
    X509_EXTENSION_free(ext);
    return ok;
}

/* Names that parse as an IPv4/IPv6 literal become iPAddress entries, the rest dNSName. */
static int add_san(X509 *x, const char *const *names, size_t n)
{
    GENERAL_NAMES *gens = sk_GENERAL_NAME_new_null();
    int ok = gens != NULL;
    for (size_t i = 0; ok && i < n; i++) {
        GENERAL_NAME *gen = GENERAL_NAME_new();
        if (gen == NULL) {
            ok = 0;
            break;
        }
        ASN1_OCTET_STRING *ip = a2i_IPADDRESS(names[i]);
        if (ip != NULL) {
            GENERAL_NAME_set0_value(gen, GEN_IPADD, ip);
        } else {
            ASN1_IA5STRING *dns = ASN1_IA5STRING_new();
            if (dns == NULL || !ASN1_STRING_set(dns, names[i], (int)strlen(names[i]))) {
                ASN1_IA5STRING_free(dns);
                GENERAL_NAME_free(gen);
                ok = 0;
                break;
            }
            GENERAL_NAME_set0_value(gen, GEN_DNS, dns);
        }
        if (!sk_GENERAL_NAME_push(gens, gen)) {
            GENERAL_NAME_free(gen);
            ok = 0;
        }
    }
    ok = ok && X509_add1_ext_i2d(x, NID_subject_alt_name, gens, 0, X509V3_ADD_DEFAULT);
    GENERAL_NAMES_free(gens);
    return ok;
}

/* Build and sign one certificate. `issuer` NULL means self-signed (the root). */
static X509 *make_cert(cert_kind_t kind, const char *cn, EVP_PKEY *key, X509 *issuer,
                       EVP_PKEY *issuer_key, int64_t nb, int64_t na, const char *const *names,
                       size_t n)
{
    X509 *x = X509_new();
    X509_NAME *name = X509_NAME_new();
    BIGNUM *bn = BN_new();
    int ok = x != NULL && name != NULL && bn != NULL;

    /* 16 random bytes with the top bit clear: positive, and unique enough that two CAs created
     * on different machines never hand a browser the same issuer+serial pair. */
    uint8_t serial[16];
    RAND_bytes(serial, sizeof serial);
    serial[0] = (uint8_t)((serial[0] & 0x7f) | 0x40);
    ok = ok && X509_set_version(x, X509_VERSION_3) && BN_bin2bn(serial, sizeof serial, bn) &&
         BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(x));

    if (ok && kind != CERT_LEAF)
        ok = X509_NAME_add_entry_by_txt(name, "O", MBSTRING_UTF8, (const uint8_t *)"moat", -1, -1,
                                        0);
    if (ok && cn != NULL)
        ok = X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8, (const uint8_t *)cn, -1, -1, 0);
    ok = ok && X509_set_subject_name(x, name) &&
         X509_set_issuer_name(x, issuer ? X509_get_subject_name(issuer) : name) &&
         ASN1_TIME_set(X509_getm_notBefore(x), (time_t)nb) &&
         ASN1_TIME_set(X509_getm_notAfter(x), (time_t)na) && X509_set_pubkey(x, key);

    X509V3_CTX ctx;
    X509V3_set_ctx(&ctx, issuer ? issuer : x, x, NULL, NULL, 0);
    switch (kind) {
    case CERT_ROOT:
        ok = ok && add_ext(x, &ctx, NID_basic_constraints, "critical,CA:TRUE") &&
             add_ext(x, &ctx, NID_key_usage, "critical,keyCertSign,cRLSign") &&
             add_ext(x, &ctx, NID_subject_key_identifier, "hash");
        break;
    case CERT_INTERMEDIATE:
        ok = ok && add_ext(x, &ctx, NID_basic_constraints, "critical,CA:TRUE,pathlen:0") &&
             add_ext(x, &ctx, NID_key_usage, "critical,digitalSignature,keyCertSign,cRLSign") &&
             add_ext(x, &ctx, NID_subject_key_identifier, "hash") &&
             add_ext(x, &ctx, NID_authority_key_identifier, "keyid:always");
        break;
    case CERT_LEAF:
        ok = ok && add_ext(x, &ctx, NID_basic_constraints, "critical,CA:FALSE") &&
             add_ext(x, &ctx, NID_key_usage, "critical,digitalSignature") &&
             add_ext(x, &ctx, NID_ext_key_usage, "serverAuth") &&
             add_ext(x, &ctx, NID_authority_key_identifier, "keyid:always") && add_san(x, names, n);
        break;
    }
    ok = ok && X509_sign(x, issuer_key, EVP_sha256());

    X509_NAME_free(name);
    BN_free(bn);
    if (!ok) {
        X509_free(x);
        ERR_clear_error();
        return NULL;
    }
    return x;
}

static void fill_record(moat_cert_record_t *r, const char *id, const char *names,
                        X509 *issuer_or_self, int64_t nb, int64_t na, char *cert_pem, char *key_pem)
{
    memset(r, 0, sizeof *r);
    r->id = (char *)id;
    r->names = (char *)names;
    r->issuer = subject_cn(issuer_or_self);
    r->source = (char *)"internal";
    r->not_before = nb;
    r->not_after = na;
    r->cert_pem = cert_pem;
    r->key_pem = key_pem;
    r->updated_at = now_unix();
}

/* A new intermediate signed by the root; the caller stores it. */
static int make_intermediate(moat_ca_t *ca, X509 **out, EVP_PKEY **out_key, int64_t *nb,
                             int64_t *na)
{
    EVP_PKEY *key = new_p256_key();
    if (key == NULL)
        return MOAT_ECRYPTO;
    char *root_cn = subject_cn(ca->root);
    const char *dash = strstr(root_cn, " - ");
    char cn[128];
    snprintf(cn, sizeof cn, "moat Local Intermediate CA%s", dash ? dash : "");
    free(root_cn);
    *nb = now_unix() - 3600;
    *na = *nb + MOAT_CA_INTER_LIFETIME;
    X509 *x = make_cert(CERT_INTERMEDIATE, cn, key, ca->root, ca->root_key, *nb, *na, NULL, 0);
    if (x == NULL) {
        EVP_PKEY_free(key);
        return MOAT_ECRYPTO;
    }
    *out = x;
    *out_key = key;
    return 0;
}

static void set_intermediate(moat_ca_t *ca, X509 *x, EVP_PKEY *key, int64_t nb, int64_t na)
{
    X509_free(ca->inter);
    EVP_PKEY_free(ca->inter_key);
    free(ca->inter_pem);
    free(ca->inter_cn);
    ca->inter = x;
    ca->inter_key = key;
    ca->inter_pem = cert_to_pem(x);
    ca->inter_cn = subject_cn(x);
    ca->inter_nb = nb;
    ca->inter_na = na;
}

/* Store recs and an event in one transaction. With `absent_id`, fail with MOAT_EEXISTS (and
 * change nothing) when that record already exists: another moat process created the CA first. */
static int store_records(moat_ca_t *ca, moat_cert_record_t *recs, size_t n, const char *event,
                         const char *detail, const char *absent_id, char *err, size_t errlen)
{
    moat_storage_t *st = ca->st;
    int rc = st->ops->begin(st);
    if (rc == 0 && absent_id != NULL) {
        moat_cert_record_t old;
        int grc = st->ops->get_cert(st, absent_id, &old);
        if (grc == 0) {
            moat_cert_record_clear(&old);
            st->ops->rollback(st);
            return MOAT_EEXISTS;
        }
        if (grc != MOAT_ENOT_FOUND)
            rc = grc;
    }
    for (size_t i = 0; rc == 0 && i < n; i++)
        rc = st->ops->put_cert(st, &recs[i]);
    if (rc == 0)
        rc = st->ops->add_event(st, event, NULL, detail);
    if (rc == 0)
        rc = st->ops->commit(st);
    if (rc != 0) {
        moat_errf(err, errlen, "cannot store the internal CA: %s", moat_storage_last_error(st));
        st->ops->rollback(st);
    }
    return rc;
}

/* First run: a new root and intermediate, stored together so that a crash never leaves a root
 * without its intermediate (or an intermediate whose root was lost). */
static int create_ca(moat_ca_t *ca, char *err, size_t errlen)
{
    int rc = MOAT_ECRYPTO;
    X509 *inter = NULL;
    EVP_PKEY *inter_key = NULL;
    char *root_key_pem = NULL, *inter_key_pem = NULL;
    int64_t inb, ina;

    uint8_t rnd[8];
    RAND_bytes(rnd, sizeof rnd);
    char cn[64];
    int o = snprintf(cn, sizeof cn, "moat Local Root CA - ");
    for (size_t i = 0; i < sizeof rnd; i++)
        o += snprintf(cn + o, sizeof cn - (size_t)o, "%02x", rnd[i]);

    ca->root_key = new_p256_key();
    int64_t nb = now_unix() - 3600, na = nb + MOAT_CA_ROOT_LIFETIME;
    if (ca->root_key == NULL)
        goto out;
    ca->root = make_cert(CERT_ROOT, cn, ca->root_key, NULL, ca->root_key, nb, na, NULL, 0);
    if (ca->root == NULL)
        goto out;
    ca->root_pem = cert_to_pem(ca->root);
    if (make_intermediate(ca, &inter, &inter_key, &inb, &ina) != 0)
        goto out;
    root_key_pem = key_to_pem(ca->root_key);
    inter_key_pem = key_to_pem(inter_key);
    char *inter_pem = cert_to_pem(inter);
    if (ca->root_pem == NULL || root_key_pem == NULL || inter_key_pem == NULL ||
        inter_pem == NULL) {
        free(inter_pem);
        goto out;
    }
    moat_cert_record_t recs[2];
    fill_record(&recs[0], MOAT_CA_ROOT_ID, cn, ca->root, nb, na, ca->root_pem, root_key_pem);
    fill_record(&recs[1], MOAT_CA_INTERMEDIATE_ID, "", ca->root, inb, ina, inter_pem,
                inter_key_pem);
    char *inter_cn = subject_cn(inter);
    recs[1].names = inter_cn;
    rc = store_records(ca, recs, 2, "ca-created", cn, MOAT_CA_ROOT_ID, err, errlen);
    free(recs[0].issuer);
    free(recs[1].issuer);
    free(inter_cn);
    free(inter_pem);
    if (rc == 0) {
        set_intermediate(ca, inter, inter_key, inb, ina);
        inter = NULL;
        inter_key = NULL;
        MOAT_INFO("created the internal CA \"%s\"", cn);
    }
out:
    if (rc == MOAT_ECRYPTO)
        moat_errf(err, errlen,
                  "cannot create the internal CA: key or certificate generation failed");
    X509_free(inter);
    EVP_PKEY_free(inter_key);
    moat_secret_free(root_key_pem);
    moat_secret_free(inter_key_pem);
    return rc;
}

int moat_ca_maintain(moat_ca_t *ca, int *renewed, char *err, size_t errlen)
{
    if (renewed)
        *renewed = 0;
    if (ca->inter != NULL && now_unix() < renew_at(ca->inter_nb, ca->inter_na))
        return 0;
    X509 *x;
    EVP_PKEY *key;
    int64_t nb, na;
    int rc = make_intermediate(ca, &x, &key, &nb, &na);
    if (rc != 0) {
        moat_errf(err, errlen, "cannot renew the internal CA's intermediate certificate");
        return rc;
    }
    char *pem = cert_to_pem(x), *key_pem = key_to_pem(key), *cn = subject_cn(x);
    moat_cert_record_t rec;
    fill_record(&rec, MOAT_CA_INTERMEDIATE_ID, cn, ca->root, nb, na, pem, key_pem);
    rc = (pem && key_pem)
             ? store_records(ca, &rec, 1, "intermediate-renewed", cn, NULL, err, errlen)
             : MOAT_ECRYPTO;
    free(rec.issuer);
    free(pem);
    moat_secret_free(key_pem);
    free(cn);
    if (rc != 0) {
        X509_free(x);
        EVP_PKEY_free(key);
        return rc;
    }
    set_intermediate(ca, x, key, nb, na);
    MOAT_INFO("renewed the internal CA's intermediate certificate \"%s\"", ca->inter_cn);
    if (renewed)
        *renewed = 1;
    return 0;
}

/* Load the stored intermediate; anything unusable (missing, unparsable, not signed by this
 * root, key mismatch) leaves ca->inter NULL so that moat_ca_maintain issues a fresh one. */
static int load_intermediate(moat_ca_t *ca, char *err, size_t errlen)
{
    moat_cert_record_t rec;
    int rc = ca->st->ops->get_cert(ca->st, MOAT_CA_INTERMEDIATE_ID, &rec);
    if (rc == MOAT_ENOT_FOUND)
        return 0;
    if (rc != 0) {
        moat_errf(err, errlen, "cannot read the internal CA: %s", moat_storage_last_error(ca->st));
        return rc;
    }
    X509 *x = rec.cert_pem ? cert_from_pem(rec.cert_pem) : NULL;
    EVP_PKEY *key = rec.key_pem ? key_from_pem(rec.key_pem) : NULL;
    if (x != NULL && key != NULL && X509_check_issued(ca->root, x) == X509_V_OK &&
        X509_verify(x, ca->root_key) == 1 && X509_check_private_key(x, key)) {
        set_intermediate(ca, x, key, rec.not_before, rec.not_after);
    } else {
        MOAT_WARN("the stored intermediate CA certificate is unusable; issuing a new one");
        X509_free(x);
        EVP_PKEY_free(key);
    }
    ERR_clear_error();
    moat_cert_record_clear(&rec);
    return 0;
}

static int load_root(moat_ca_t *ca, moat_cert_record_t *rec, char *err, size_t errlen)
{
    ca->root = rec->cert_pem ? cert_from_pem(rec->cert_pem) : NULL;
    ca->root_key = rec->key_pem ? key_from_pem(rec->key_pem) : NULL;
    if (ca->root == NULL || ca->root_key == NULL ||
        !X509_check_private_key(ca->root, ca->root_key)) {
        ERR_clear_error();
        /* Replacing the root would silently break every trust store it was installed in, so a
         * damaged root is reported, never regenerated. */
        moat_errf(err, errlen,
                  "the stored internal root CA (\"%s\") cannot be read; moat will not replace it. "
                  "Delete that record (or the database) to start a new CA, then run `moat trust` "
                  "again",
                  MOAT_CA_ROOT_ID);
        return MOAT_ECRYPTO;
    }
    ca->root_pem = cert_to_pem(ca->root);
    return ca->root_pem ? 0 : MOAT_ECRYPTO;
}

int moat_ca_open(moat_storage_t *st, moat_ca_t **out, char *err, size_t errlen)
{
    *out = NULL;
    moat_ca_t *ca = moat_xcalloc(1, sizeof *ca);
    ca->st = st;
    moat_cert_record_t rec;
    int rc = st->ops->get_cert(st, MOAT_CA_ROOT_ID, &rec);
    int created = 0;
    if (rc == MOAT_ENOT_FOUND) {
        rc = create_ca(ca, err, errlen);
        created = rc == 0;
        if (rc == MOAT_EEXISTS) {
            /* Lost the race to another moat process: use the root it stored. */
            moat_ca_free(ca);
            ca = moat_xcalloc(1, sizeof *ca);
            ca->st = st;
            rc = st->ops->get_cert(st, MOAT_CA_ROOT_ID, &rec);
            if (rc != 0)
                moat_errf(err, errlen, "cannot read the internal CA: %s",
                          moat_storage_last_error(st));
        }
    } else if (rc != 0) {
        moat_errf(err, errlen, "cannot read the internal CA: %s", moat_storage_last_error(st));
    }
    if (rc == 0 && !created) {
        rc = load_root(ca, &rec, err, errlen);
        moat_cert_record_clear(&rec);
        if (rc == 0)
            rc = load_intermediate(ca, err, errlen);
    }
    if (rc == 0)
        rc = moat_ca_maintain(ca, NULL, err, errlen);
    if (rc != 0) {
        moat_ca_free(ca);
        return rc;
    }
    *out = ca;
    return 0;
}

int64_t moat_ca_next_renewal(const moat_ca_t *ca)
{
    return renew_at(ca->inter_nb, ca->inter_na);
}

const char *moat_ca_root_pem(const moat_ca_t *ca)
{
    return ca->root_pem;
}

const char *moat_ca_intermediate_name(const moat_ca_t *ca)
{
    return ca->inter_cn;
}

int moat_ca_issue(moat_ca_t *ca, const char *const *names, size_t n, int64_t lifetime_s,
                  char **chain_pem, char **key_pem)
{
    *chain_pem = *key_pem = NULL;
    if (n == 0 || lifetime_s <= 0)
        return MOAT_EINVAL;
    for (size_t i = 0; i < n; i++)
        if (names[i] == NULL || names[i][0] == '\0')
            return MOAT_EINVAL;
    EVP_PKEY *key = new_p256_key();
    if (key == NULL)
        return MOAT_ECRYPTO;
    /* Five minutes of back-dating absorbs clock skew between this host and its clients. */
    int64_t now = now_unix(), nb = now - 300, na = now + lifetime_s;
    if (na > ca->inter_na)
        na = ca->inter_na;
    /* The CN is legacy (clients match the SAN) but many tools still display it; it is limited
     * to 64 characters by RFC 5280, so longer names get none. */
    const char *cn = strlen(names[0]) <= 64 ? names[0] : NULL;
    X509 *x = make_cert(CERT_LEAF, cn, key, ca->inter, ca->inter_key, nb, na, names, n);
    int rc = MOAT_ECRYPTO;
    char *leaf = x ? cert_to_pem(x) : NULL, *kp = key_to_pem(key);
    if (leaf != NULL && kp != NULL && ca->inter_pem != NULL) {
        size_t a = strlen(leaf), b = strlen(ca->inter_pem);
        char *chain = moat_xmalloc(a + b + 1);
        memcpy(chain, leaf, a);
        memcpy(chain + a, ca->inter_pem, b + 1);
        *chain_pem = chain;
        *key_pem = kp;
        kp = NULL;
        rc = 0;
    }
    free(leaf);
    moat_secret_free(kp);
    X509_free(x);
    EVP_PKEY_free(key);
    return rc;
}

void moat_ca_free(moat_ca_t *ca)
{
    if (ca == NULL)
        return;
    X509_free(ca->root);
    EVP_PKEY_free(ca->root_key);
    free(ca->root_pem);
    X509_free(ca->inter);
    EVP_PKEY_free(ca->inter_key);
    free(ca->inter_pem);
    free(ca->inter_cn);
    free(ca);
}
