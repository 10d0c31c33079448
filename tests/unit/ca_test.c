/* Unit tests for the internal CA (acme/ca.c) against the SQLite storage in a temporary folder. */
#include "moat/ca.h"
#include "moat/common.h"
#include "moat/log.h"
#include "moat/storage.h"
#include "test.h"

#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static char dir[] = "/tmp/moat-ca-test-XXXXXX";

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

static int64_t asn1_unix(const ASN1_TIME *t)
{
    int d = 0, s = 0;
    ASN1_TIME *epoch = ASN1_TIME_set(NULL, 0);
    ASN1_TIME_diff(&d, &s, epoch, t);
    ASN1_TIME_free(epoch);
    return (int64_t)d * 86400 + s;
}

/* All certificates of a PEM text, in order. */
static STACK_OF(X509) * parse_all(const char *pem)
{
    STACK_OF(X509) *sk = sk_X509_new_null();
    BIO *b = BIO_new_mem_buf(pem, -1);
    X509 *x;
    while ((x = PEM_read_bio_X509(b, NULL, NULL, NULL)) != NULL)
        sk_X509_push(sk, x);
    BIO_free(b);
    ERR_clear_error();
    return sk;
}

static int verify_chain(const char *root_pem, const char *chain_pem)
{
    STACK_OF(X509) *roots = parse_all(root_pem), *chain = parse_all(chain_pem);
    X509_STORE *store = X509_STORE_new();
    X509_STORE_add_cert(store, sk_X509_value(roots, 0));
    X509 *leaf = sk_X509_shift(chain);
    X509_STORE_CTX *ctx = X509_STORE_CTX_new();
    X509_STORE_CTX_init(ctx, store, leaf, chain);
    X509_STORE_CTX_set_purpose(ctx, X509_PURPOSE_SSL_SERVER);
    int ok = X509_verify_cert(ctx);
    if (ok != 1)
        fprintf(stderr, "verify: %s\n",
                X509_verify_cert_error_string(X509_STORE_CTX_get_error(ctx)));
    X509_STORE_CTX_free(ctx);
    X509_STORE_free(store);
    X509_free(leaf);
    sk_X509_pop_free(chain, X509_free);
    sk_X509_pop_free(roots, X509_free);
    ERR_clear_error();
    return ok == 1;
}

static size_t count_events(moat_storage_t *st, const char *kind)
{
    moat_event_t *ev = NULL;
    size_t n = 0, hits = 0;
    st->ops->list_events(st, 100, &ev, &n);
    for (size_t i = 0; i < n; i++) {
        hits += strcmp(ev[i].kind, kind) == 0;
        moat_event_clear(&ev[i]);
    }
    free(ev);
    return hits;
}

static void test_issue_and_verify(moat_storage_t *st)
{
    char err[512] = "";
    moat_ca_t *ca = NULL;
    CHECK_INT(moat_ca_open(st, &ca, err, sizeof err), 0);
    if (ca == NULL) {
        fprintf(stderr, "%s\n", err);
        return;
    }
    CHECK(strstr(moat_ca_root_pem(ca), "BEGIN CERTIFICATE") != NULL);
    CHECK_INT(count_events(st, "ca-created"), 1);

    /* Root: self-signed CA, certSign + cRLSign, ten years. */
    STACK_OF(X509) *rs = parse_all(moat_ca_root_pem(ca));
    X509 *root = sk_X509_value(rs, 0);
    char cn[256];
    X509_NAME_get_text_by_NID(X509_get_subject_name(root), NID_commonName, cn, sizeof cn);
    CHECK(strncmp(cn, "moat Local Root CA - ", 21) == 0 && strlen(cn) == 21 + 16);
    CHECK(X509_check_ca(root) >= 1);
    uint32_t ku = X509_get_key_usage(root);
    CHECK((ku & KU_KEY_CERT_SIGN) && (ku & KU_CRL_SIGN));
    int64_t life = asn1_unix(X509_get0_notAfter(root)) - asn1_unix(X509_get0_notBefore(root));
    CHECK_INT(life, MOAT_CA_ROOT_LIFETIME);

    const char *names[] = {"localhost", "app.localhost", "127.0.0.1", "::1"};
    char *chain = NULL, *key = NULL;
    CHECK_INT(moat_ca_issue(ca, names, 4, MOAT_CA_LEAF_LIFETIME, &chain, &key), 0);
    CHECK(chain != NULL && key != NULL);
    CHECK(verify_chain(moat_ca_root_pem(ca), chain));

    STACK_OF(X509) *cs = parse_all(chain);
    CHECK_INT(sk_X509_num(cs), 2);
    X509 *leaf = sk_X509_value(cs, 0), *inter = sk_X509_value(cs, 1);
    CHECK_INT(X509_check_host(leaf, "localhost", 9, 0, NULL), 1);
    CHECK_INT(X509_check_host(leaf, "APP.localhost", 13, 0, NULL), 1);
    CHECK_INT(X509_check_host(leaf, "other.localhost", 15, 0, NULL), 0);
    CHECK_INT(X509_check_ip_asc(leaf, "127.0.0.1", 0), 1);
    CHECK_INT(X509_check_ip_asc(leaf, "::1", 0), 1);
    CHECK_INT(X509_check_ip_asc(leaf, "127.0.0.2", 0), 0);
    /* IPs are iPAddress entries, not DNS names. */
    CHECK_INT(X509_check_host(leaf, "127.0.0.1", 9, 0, NULL), 0);
    ku = X509_get_key_usage(leaf);
    CHECK((ku & KU_DIGITAL_SIGNATURE) && !(ku & KU_KEY_CERT_SIGN));
    CHECK(X509_get_extended_key_usage(leaf) & XKU_SSL_SERVER);
    CHECK_INT(X509_check_ca(leaf), 0);
    int64_t now = (int64_t)time(NULL);
    int64_t nb = asn1_unix(X509_get0_notBefore(leaf)), na = asn1_unix(X509_get0_notAfter(leaf));
    CHECK(nb <= now - 295 && nb >= now - 310);
    CHECK(na >= now + MOAT_CA_LEAF_LIFETIME - 10 && na <= now + MOAT_CA_LEAF_LIFETIME + 5);
    /* The intermediate: CA with pathlen 0, issued by the root. */
    BASIC_CONSTRAINTS *bc = X509_get_ext_d2i(inter, NID_basic_constraints, NULL, NULL);
    CHECK(bc != NULL && bc->ca && bc->pathlen != NULL && ASN1_INTEGER_get(bc->pathlen) == 0);
    BASIC_CONSTRAINTS_free(bc);
    CHECK_INT(X509_check_issued(root, inter), X509_V_OK);
    life = asn1_unix(X509_get0_notAfter(inter)) - asn1_unix(X509_get0_notBefore(inter));
    CHECK_INT(life, MOAT_CA_INTER_LIFETIME);
    /* The key belongs to the leaf. */
    BIO *kb = BIO_new_mem_buf(key, -1);
    EVP_PKEY *pk = PEM_read_bio_PrivateKey(kb, NULL, NULL, NULL);
    CHECK(pk != NULL && X509_check_private_key(leaf, pk));
    CHECK(pk != NULL && EVP_PKEY_id(pk) == EVP_PKEY_EC);
    EVP_PKEY_free(pk);
    BIO_free(kb);

    /* A lifetime longer than the intermediate has left is cut to the intermediate's expiry. */
    char *c2, *k2;
    CHECK_INT(moat_ca_issue(ca, names, 1, 3650 * 86400LL, &c2, &k2), 0);
    STACK_OF(X509) *c2s = parse_all(c2);
    CHECK_INT(asn1_unix(X509_get0_notAfter(sk_X509_value(c2s, 0))),
              asn1_unix(X509_get0_notAfter(inter)));
    sk_X509_pop_free(c2s, X509_free);
    free(c2);
    free(k2);
    /* Bad arguments. */
    CHECK_INT(moat_ca_issue(ca, names, 0, 100, &c2, &k2), MOAT_EINVAL);
    const char *empty[] = {""};
    CHECK_INT(moat_ca_issue(ca, empty, 1, 100, &c2, &k2), MOAT_EINVAL);

    sk_X509_pop_free(cs, X509_free);
    sk_X509_pop_free(rs, X509_free);
    free(chain);
    free(key);
    moat_ca_free(ca);
}

static void test_reopen_same_root(moat_storage_t *st)
{
    char err[512] = "";
    moat_ca_t *a = NULL, *b = NULL;
    CHECK_INT(moat_ca_open(st, &a, err, sizeof err), 0);
    CHECK_INT(moat_ca_open(st, &b, err, sizeof err), 0);
    if (a == NULL || b == NULL)
        return;
    CHECK_STR(moat_ca_root_pem(a), moat_ca_root_pem(b));
    CHECK_STR(moat_ca_intermediate_name(a), moat_ca_intermediate_name(b));
    CHECK_INT(count_events(st, "ca-created"), 1);
    CHECK_INT(count_events(st, "intermediate-renewed"), 0);
    /* A leaf from one handle verifies against the root of the other. */
    const char *names[] = {"localhost"};
    char *chain, *key;
    CHECK_INT(moat_ca_issue(b, names, 1, 3600, &chain, &key), 0);
    CHECK(verify_chain(moat_ca_root_pem(a), chain));
    free(chain);
    free(key);
    moat_ca_free(a);
    moat_ca_free(b);
}

static void test_intermediate_renewal(moat_storage_t *st)
{
    char err[512] = "";
    moat_cert_record_t old;
    CHECK_INT(st->ops->get_cert(st, MOAT_CA_INTERMEDIATE_ID, &old), 0);
    /* Pretend the intermediate is 130 of its 180 days old: past two thirds. */
    int64_t now = (int64_t)time(NULL);
    moat_cert_record_t aged = old;
    aged.not_before = now - 130 * 86400LL;
    aged.not_after = aged.not_before + MOAT_CA_INTER_LIFETIME;
    CHECK_INT(st->ops->put_cert(st, &aged), 0);

    moat_ca_t *ca = NULL;
    CHECK_INT(moat_ca_open(st, &ca, err, sizeof err), 0);
    CHECK_INT(count_events(st, "intermediate-renewed"), 1);
    moat_cert_record_t fresh;
    CHECK_INT(st->ops->get_cert(st, MOAT_CA_INTERMEDIATE_ID, &fresh), 0);
    CHECK(strcmp(fresh.cert_pem, old.cert_pem) != 0);
    CHECK(fresh.not_before > now - 7200 && fresh.not_before <= now);
    CHECK(moat_ca_next_renewal(ca) > now + 100 * 86400LL);
    /* Leaves chain to the new intermediate and still verify against the same root. */
    const char *names[] = {"localhost"};
    char *chain, *key;
    CHECK_INT(moat_ca_issue(ca, names, 1, 3600, &chain, &key), 0);
    CHECK(strstr(chain, fresh.cert_pem) != NULL);
    moat_cert_record_t root;
    CHECK_INT(st->ops->get_cert(st, MOAT_CA_ROOT_ID, &root), 0);
    CHECK(verify_chain(root.cert_pem, chain));
    CHECK_STR(moat_ca_root_pem(ca), root.cert_pem);
    /* Renewal is not repeated at the next open. */
    int renewed = -1;
    CHECK_INT(moat_ca_maintain(ca, &renewed, err, sizeof err), 0);
    CHECK_INT(renewed, 0);
    free(chain);
    free(key);
    moat_cert_record_clear(&root);
    moat_cert_record_clear(&fresh);
    moat_cert_record_clear(&old);
    moat_ca_free(ca);
}

static void test_damaged_root_kept(moat_storage_t *st)
{
    char err[512] = "";
    moat_cert_record_t root;
    CHECK_INT(st->ops->get_cert(st, MOAT_CA_ROOT_ID, &root), 0);
    moat_cert_record_t bad = root;
    bad.cert_pem = (char *)"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    CHECK_INT(st->ops->put_cert(st, &bad), 0);
    moat_ca_t *ca = NULL;
    CHECK(moat_ca_open(st, &ca, err, sizeof err) < 0);
    CHECK(ca == NULL);
    CHECK(strstr(err, "will not replace it") != NULL);
    moat_cert_record_t after;
    CHECK_INT(st->ops->get_cert(st, MOAT_CA_ROOT_ID, &after), 0);
    CHECK_STR(after.cert_pem, bad.cert_pem);
    moat_cert_record_clear(&after);
    /* Restore it for anything that follows. */
    CHECK_INT(st->ops->put_cert(st, &root), 0);
    moat_cert_record_clear(&root);
}

int main(void)
{
    moat_log_min_level = MOAT_LOG_ERROR;
    if (mkdtemp(dir) == NULL) {
        perror("mkdtemp");
        return 1;
    }
    char err[512] = "";
    moat_storage_t *st = NULL;
    if (moat_storage_open_sqlite(dir, &st, err, sizeof err) != 0) {
        fprintf(stderr, "storage: %s\n", err);
        return 1;
    }
    test_issue_and_verify(st);
    test_reopen_same_root(st);
    test_intermediate_renewal(st);
    test_damaged_root_kept(st);
    st->ops->close(st);
    nftw(dir, rm_cb, 8, FTW_DEPTH | FTW_PHYS);
    return test_summary("ca");
}
