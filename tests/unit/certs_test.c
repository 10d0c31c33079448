/* Unit tests for the certificate snapshot, the certificate manager, the TLS context and the
 * certificate commands: SQLite storage in a temporary folder, handshakes over a BIO pair. */
#include "certcmd.h"
#include "moat/ca.h"
#include "moat/certs.h"
#include "moat/common.h"
#include "moat/config.h"
#include "moat/log.h"
#include "moat/storage.h"
#include "moat/tls.h"
#include "test.h"

#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

#include <arpa/inet.h>
#include <ftw.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static char dir[] = "/tmp/moat-certs-test-XXXXXX";
static moat_storage_t *st;
static moat_ca_t *ca;

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

static char *path_of(const char *name)
{
    char *p = moat_xmalloc(strlen(dir) + strlen(name) + 2);
    sprintf(p, "%s/%s", dir, name);
    return p;
}

static void write_text(const char *name, const char *a, const char *b)
{
    char *p = path_of(name);
    FILE *f = fopen(p, "w");
    fputs(a, f);
    if (b)
        fputs(b, f);
    fclose(f);
    free(p);
}

static void issue(const char *name, char **chain, char **key)
{
    const char *names[] = {name};
    CHECK_INT(moat_ca_issue(ca, names, 1, MOAT_CA_LEAF_LIFETIME, chain, key), 0);
}

/* The first certificate of a PEM chain, as its own PEM. */
static char *first_pem(const char *chain)
{
    const char *end = strstr(chain, "-----END CERTIFICATE-----\n");
    return moat_xstrndup(chain, (size_t)(end - chain) + strlen("-----END CERTIFICATE-----\n"));
}

/* A self-signed P-256 certificate for name valid over [nb, na]; with ku, a keyUsage extension
 * whose value is those bytes exactly (well-formed or not). */
static void selfsigned_ku(const char *name, int64_t nb, int64_t na, const char *ku, size_t ku_len,
                          char **cert_pem, char **key_pem)
{
    EVP_PKEY_CTX *kc = EVP_PKEY_CTX_new_id(EVP_PKEY_EC, NULL);
    EVP_PKEY *k = NULL;
    EVP_PKEY_keygen_init(kc);
    EVP_PKEY_CTX_set_ec_paramgen_curve_nid(kc, NID_X9_62_prime256v1);
    EVP_PKEY_keygen(kc, &k);
    EVP_PKEY_CTX_free(kc);
    X509 *x = X509_new();
    X509_set_version(x, X509_VERSION_3);
    ASN1_INTEGER_set(X509_get_serialNumber(x), 7);
    X509_NAME *n = X509_get_subject_name(x);
    X509_NAME_add_entry_by_txt(n, "CN", MBSTRING_UTF8, (const uint8_t *)name, -1, -1, 0);
    X509_set_issuer_name(x, n);
    ASN1_TIME_set(X509_getm_notBefore(x), (time_t)nb);
    ASN1_TIME_set(X509_getm_notAfter(x), (time_t)na);
    X509_set_pubkey(x, k);
    if (ku != NULL) {
        ASN1_OCTET_STRING *v = ASN1_OCTET_STRING_new();
        ASN1_OCTET_STRING_set(v, (const uint8_t *)ku, (int)ku_len);
        X509_EXTENSION *e = X509_EXTENSION_create_by_NID(NULL, NID_key_usage, 1, v);
        X509_add_ext(x, e, -1);
        X509_EXTENSION_free(e);
        ASN1_OCTET_STRING_free(v);
    }
    X509_sign(x, k, EVP_sha256());
    BIO *b = BIO_new(BIO_s_mem());
    const uint8_t *d;
    size_t len;
    PEM_write_bio_X509(b, x);
    BIO_mem_contents(b, &d, &len);
    *cert_pem = moat_xstrndup((const char *)d, len);
    BIO_reset(b);
    PEM_write_bio_PrivateKey(b, k, NULL, NULL, 0, NULL, NULL);
    BIO_mem_contents(b, &d, &len);
    *key_pem = moat_xstrndup((const char *)d, len);
    BIO_free(b);
    X509_free(x);
    EVP_PKEY_free(k);
}

static void selfsigned(const char *name, int64_t nb, int64_t na, char **cert_pem, char **key_pem)
{
    selfsigned_ku(name, nb, na, NULL, 0, cert_pem, key_pem);
}

static size_t count_events(const char *kind)
{
    moat_event_t *ev = NULL;
    size_t n = 0, hits = 0;
    st->ops->list_events(st, 1000, &ev, &n);
    for (size_t i = 0; i < n; i++) {
        hits += strcmp(ev[i].kind, kind) == 0;
        moat_event_clear(&ev[i]);
    }
    free(ev);
    return hits;
}

/* --- snapshot ----------------------------------------------------------------------------- */

static void test_snapshot_lookup(void)
{
    char *c1, *k1, *c2, *k2, err[256] = "";
    issue("localhost", &c1, &k1);
    issue("b.localhost", &c2, &k2);
    moat_certs_builder_t *b = moat_certs_builder_new();
    const char *n1[] = {"localhost", "127.0.0.1", "0:0::1"};
    const char *n2[] = {"B.Localhost", "localhost", "10.1.2.3"};
    CHECK_INT(moat_certs_builder_add(b, "one", n1, 3, c1, k1, err, sizeof err), 0);
    CHECK_INT(moat_certs_builder_add(b, "two", n2, 3, c2, k2, err, sizeof err), 0);
    CHECK(moat_certs_builder_add(b, "bad", n2, 1, "garbage", k2, err, sizeof err) < 0);
    CHECK(strstr(err, "bad:") != NULL);
    CHECK(moat_certs_builder_add(b, "badkey", n2, 1, c2, "garbage", err, sizeof err) < 0);
    moat_certs_t *c = moat_certs_builder_finish(b);
    CHECK_INT(moat_certs_count(c), 2);

    const moat_cert_t *r;
    r = moat_certs_lookup(c, "localhost", NULL);
    CHECK(r != NULL && strcmp(moat_cert_id(r), "one") == 0);
    r = moat_certs_lookup(c, "LOCALHOST", NULL);
    CHECK(r != NULL && strcmp(moat_cert_id(r), "one") == 0);
    r = moat_certs_lookup(c, "localhost.", NULL);
    CHECK(r != NULL && strcmp(moat_cert_id(r), "one") == 0);
    r = moat_certs_lookup(c, "b.LOCALHOST", NULL);
    CHECK(r != NULL && strcmp(moat_cert_id(r), "two") == 0);
    /* Unknown SNI: refused, even though a default exists. */
    CHECK(moat_certs_lookup(c, "unknown.localhost", NULL) == NULL);
    CHECK(moat_certs_lookup(c, "unknown.localhost", "127.0.0.1") == NULL);
    /* No SNI: the local IP when a certificate covers it, else the first one added. */
    r = moat_certs_lookup(c, NULL, NULL);
    CHECK(r != NULL && strcmp(moat_cert_id(r), "one") == 0);
    r = moat_certs_lookup(c, NULL, "10.1.2.3");
    CHECK(r != NULL && strcmp(moat_cert_id(r), "two") == 0);
    r = moat_certs_lookup(c, NULL, "::1");
    CHECK(r != NULL && strcmp(moat_cert_id(r), "one") == 0);
    r = moat_certs_lookup(c, NULL, "192.0.2.1");
    CHECK(r != NULL && strcmp(moat_cert_id(r), "one") == 0);
    CHECK(moat_cert_not_after(r) > (int64_t)time(NULL) + 6 * 86400);
    CHECK(moat_certs_lookup(NULL, "localhost", NULL) == NULL);

    /* References: a snapshot lives while someone holds it (publishing one to the workers is
     * tested in runtime_test.c). */
    moat_certs_t *held = moat_certs_ref(c);
    moat_certs_release(c);
    CHECK(moat_certs_lookup(held, "localhost", NULL) != NULL);
    moat_certs_release(held);
    moat_certs_t *empty = moat_certs_builder_finish(moat_certs_builder_new());
    CHECK(moat_certs_lookup(empty, NULL, NULL) == NULL);
    CHECK(moat_certs_count(empty) == 0);
    moat_certs_release(empty);
    moat_certs_release(NULL);
    free(c1);
    free(k1);
    free(c2);
    free(k2);
}

/* A wildcard certificate serves one label under its domain; an exact name wins over it. */
static void test_snapshot_wildcard(void)
{
    char *c1, *k1, *c2, *k2, err[256] = "";
    issue("ai.example.com", &c1, &k1);
    issue("chat.ai.example.com", &c2, &k2);
    moat_certs_builder_t *b = moat_certs_builder_new();
    const char *n1[] = {"*.ai.example.com", "ai.example.com"};
    const char *n2[] = {"chat.ai.example.com"};
    CHECK_INT(moat_certs_builder_add(b, "wild", n1, 2, c1, k1, err, sizeof err), 0);
    CHECK_INT(moat_certs_builder_add(b, "chat", n2, 1, c2, k2, err, sizeof err), 0);
    moat_certs_t *c = moat_certs_builder_finish(b);
    const moat_cert_t *r = moat_certs_lookup(c, "a.ai.example.com", NULL);
    CHECK(r != NULL && strcmp(moat_cert_id(r), "wild") == 0);
    r = moat_certs_lookup(c, "A.AI.Example.com.", NULL);
    CHECK(r != NULL && strcmp(moat_cert_id(r), "wild") == 0);
    r = moat_certs_lookup(c, "ai.example.com", NULL);
    CHECK(r != NULL && strcmp(moat_cert_id(r), "wild") == 0);
    r = moat_certs_lookup(c, "chat.ai.example.com", NULL);
    CHECK(r != NULL && strcmp(moat_cert_id(r), "chat") == 0);
    CHECK(moat_certs_lookup(c, "a.b.ai.example.com", NULL) == NULL);
    CHECK(moat_certs_lookup(c, "example.com", NULL) == NULL);
    CHECK(moat_certs_lookup(c, ".ai.example.com", NULL) == NULL);
    moat_certs_release(c);
    free(c1);
    free(k1);
    free(c2);
    free(k2);
}

/* --- certificate manager ------------------------------------------------------------------ */

static moat_site_addr_t addr(const char *host, moat_host_kind_t kind, int plain)
{
    return (moat_site_addr_t){.host = (char *)host, .kind = kind, .plain_http = plain};
}

static void test_certmgr_internal(void)
{
    moat_site_addr_t a1[] = {addr("localhost", MOAT_HOST_LOCALHOST, 0),
                             addr("127.0.0.1", MOAT_HOST_IPV4, 0),
                             addr("plain.localhost", MOAT_HOST_LOCALHOST, 1)};
    moat_site_addr_t a2[] = {addr("chat.example.com", MOAT_HOST_NAME, 0)};
    moat_site_addr_t a3[] = {addr("only-http.localhost", MOAT_HOST_LOCALHOST, 1)};
    moat_site_t sites[3] = {{0}};
    sites[0].addrs = a1;
    sites[0].naddrs = 3;
    sites[0].tls = MOAT_TLS_AUTO;
    sites[1].addrs = a2;
    sites[1].naddrs = 1;
    sites[1].tls = MOAT_TLS_ACME;
    sites[2].addrs = a3;
    sites[2].naddrs = 1;
    moat_config_t cfg = {.sites = sites, .nsites = 3};

    char err[512] = "";
    moat_certs_t *c = NULL;
    int64_t next = 0, now = (int64_t)time(NULL);
    size_t issued0 = count_events("issued");
    CHECK_INT(moat_certmgr_build(st, ca, &cfg, &c, &next, err, sizeof err), 0);
    /* tls=acme: pending until the ACME manager stores a certificate, so not in the snapshot. */
    CHECK_INT(moat_certs_count(c), 1);
    CHECK_INT(count_events("issued"), issued0 + 1);
    /* Renewal due at two thirds of the validity window [now - 5 min, now + 7 days]. */
    int64_t want = now - 300 + (MOAT_CA_LEAF_LIFETIME + 300) * 2 / 3;
    CHECK(next >= want - 5 && next <= want + 5);
    const moat_cert_t *r = moat_certs_lookup(c, "127.0.0.1", NULL);
    CHECK(r != NULL && strcmp(moat_cert_id(r), "internal:127.0.0.1,localhost") == 0);
    CHECK(moat_certs_lookup(c, "plain.localhost", NULL) == NULL);
    CHECK(moat_certs_lookup(c, "only-http.localhost", NULL) == NULL);
    r = moat_certs_lookup(c, NULL, NULL);
    CHECK(r != NULL && strcmp(moat_cert_id(r), "internal:127.0.0.1,localhost") == 0);
    CHECK(moat_certs_lookup(c, "chat.example.com", NULL) == NULL);
    moat_cert_record_t rec;
    CHECK_INT(st->ops->get_cert(st, "internal:127.0.0.1,localhost", &rec), 0);
    CHECK_STR(rec.source, "internal");
    CHECK_STR(rec.names, "127.0.0.1,localhost");
    CHECK(rec.not_after - rec.not_before == MOAT_CA_LEAF_LIFETIME + 300);
    moat_certs_release(c);

    /* A second build reuses the stored certificates. */
    CHECK_INT(moat_certmgr_build(st, ca, &cfg, &c, &next, err, sizeof err), 0);
    CHECK_INT(count_events("issued"), issued0 + 1);
    moat_cert_record_t again;
    CHECK_INT(st->ops->get_cert(st, "internal:127.0.0.1,localhost", &again), 0);
    CHECK_STR(again.cert_pem, rec.cert_pem);
    moat_cert_record_clear(&again);
    moat_certs_release(c);

    /* Past two thirds of its life, it is renewed. */
    moat_cert_record_t aged = rec;
    aged.not_before = now - 5 * 86400;
    aged.not_after = now + 2 * 86400;
    CHECK_INT(st->ops->put_cert(st, &aged), 0);
    size_t renewed0 = count_events("renewed");
    CHECK_INT(moat_certmgr_build(st, ca, &cfg, &c, &next, err, sizeof err), 0);
    CHECK_INT(count_events("renewed"), renewed0 + 1);
    CHECK_INT(st->ops->get_cert(st, "internal:127.0.0.1,localhost", &again), 0);
    CHECK(strcmp(again.cert_pem, rec.cert_pem) != 0);
    CHECK(again.not_before >= now - 310);
    moat_cert_record_clear(&again);
    moat_cert_record_clear(&rec);
    moat_certs_release(c);
}

static void test_certmgr_files(void)
{
    char *chain, *key, *other_chain, *other_key, err[512];
    issue("files.localhost", &chain, &key);
    issue("other.localhost", &other_chain, &other_key);
    char *leaf = first_pem(chain);
    moat_cert_record_t root, inter;
    CHECK_INT(st->ops->get_cert(st, MOAT_CA_ROOT_ID, &root), 0);
    CHECK_INT(st->ops->get_cert(st, MOAT_CA_INTERMEDIATE_ID, &inter), 0);
    char *cert_path = path_of("cert.pem"), *key_path = path_of("key.pem");
    char *cp, *kp;
    int64_t nb, na;

    /* Good files. */
    write_text("cert.pem", chain, NULL);
    write_text("key.pem", key, NULL);
    err[0] = '\0';
    CHECK_INT(moat_certmgr_load_files(cert_path, key_path, &cp, &kp, &nb, &na, err, sizeof err), 0);
    CHECK_STR(cp, chain);
    CHECK(na > nb);
    free(cp);
    free(kp);

    /* Missing file: the message names it. */
    char *missing = path_of("missing.pem");
    CHECK(moat_certmgr_load_files(missing, key_path, &cp, &kp, &nb, &na, err, sizeof err) < 0);
    CHECK(strstr(err, missing) != NULL && strstr(err, "cannot read") != NULL);
    free(missing);

    /* Key of another certificate. */
    write_text("key.pem", other_key, NULL);
    CHECK(moat_certmgr_load_files(cert_path, key_path, &cp, &kp, &nb, &na, err, sizeof err) < 0);
    CHECK(strstr(err, "does not match") != NULL && strstr(err, key_path) != NULL);

    /* Wrong order: the intermediate first (with its own key so the key check passes). */
    write_text("cert.pem", inter.cert_pem, leaf);
    write_text("key.pem", inter.key_pem, NULL);
    CHECK(moat_certmgr_load_files(cert_path, key_path, &cp, &kp, &nb, &na, err, sizeof err) < 0);
    CHECK(strstr(err, "is not issued by certificate 2") != NULL && strstr(err, cert_path));
    /* A gap: leaf followed by the root (the intermediate missing). */
    write_text("cert.pem", leaf, root.cert_pem);
    write_text("key.pem", key, NULL);
    CHECK(moat_certmgr_load_files(cert_path, key_path, &cp, &kp, &nb, &na, err, sizeof err) < 0);
    CHECK(strstr(err, "certificate 1") != NULL && strstr(err, "not issued by") != NULL);

    /* A damaged block after the leaf (found by pem_fuzz): refused, not served as a chain of
     * the leaf alone. One base64 character of the intermediate made invalid. */
    char *bad_inter = moat_xstrdup(inter.cert_pem);
    bad_inter[strlen("-----BEGIN CERTIFICATE-----\n") + 10] = '!';
    write_text("cert.pem", leaf, bad_inter);
    write_text("key.pem", key, NULL);
    err[0] = '\0';
    CHECK(moat_certmgr_load_files(cert_path, key_path, &cp, &kp, &nb, &na, err, sizeof err) < 0);
    CHECK(strstr(err, "certificate 2 cannot be parsed") != NULL && strstr(err, cert_path));
    CHECK(cp == NULL && kp == NULL);
    /* Truncated: the END line missing. */
    *strstr(bad_inter, "-----END") = '\0';
    memcpy(bad_inter, inter.cert_pem, strlen(bad_inter));
    write_text("cert.pem", leaf, bad_inter);
    CHECK(moat_certmgr_load_files(cert_path, key_path, &cp, &kp, &nb, &na, err, sizeof err) < 0);
    CHECK(strstr(err, "certificate 2 cannot be parsed") != NULL);
    free(bad_inter);

    /* Expired. */
    int64_t now = (int64_t)time(NULL);
    char *ec, *ek;
    selfsigned("old.localhost", now - 90 * 86400, now - 86400, &ec, &ek);
    write_text("cert.pem", ec, NULL);
    write_text("key.pem", ek, NULL);
    CHECK(moat_certmgr_load_files(cert_path, key_path, &cp, &kp, &nb, &na, err, sizeof err) < 0);
    CHECK(strstr(err, "expired on") != NULL && strstr(err, cert_path) != NULL);
    free(ec);
    free(ek);
    /* Not a certificate at all, and a missing key. */
    write_text("cert.pem", "hello\n", NULL);
    CHECK(moat_certmgr_load_files(cert_path, key_path, &cp, &kp, &nb, &na, err, sizeof err) < 0);
    CHECK(strstr(err, "no PEM certificate") != NULL);
    write_text("cert.pem", chain, NULL);
    write_text("key.pem", "nope\n", NULL);
    CHECK(moat_certmgr_load_files(cert_path, key_path, &cp, &kp, &nb, &na, err, sizeof err) < 0);
    CHECK(strstr(err, "no usable private key") != NULL);

    /* A keyUsage extension that is not a BIT STRING (found by pem_fuzz): the X509 parser reads
     * the file, but BoringSSL refuses the leaf when it is installed for a handshake, so every
     * handshake would fail. Refused up front, naming the certificate; a well-formed keyUsage
     * (digitalSignature) is accepted. */
    selfsigned_ku("ku.localhost", now - 86400, now + 90 * 86400, "\x04\x02\xab\xcd", 4, &ec, &ek);
    write_text("cert.pem", ec, NULL);
    write_text("key.pem", ek, NULL);
    err[0] = '\0';
    CHECK(moat_certmgr_load_files(cert_path, key_path, &cp, &kp, &nb, &na, err, sizeof err) < 0);
    CHECK(strstr(err, "cannot be used for TLS") != NULL && strstr(err, "ku.localhost") != NULL);
    free(ec);
    free(ek);
    selfsigned_ku("ku.localhost", now - 86400, now + 90 * 86400, "\x03\x02\x07\x80", 4, &ec, &ek);
    write_text("cert.pem", ec, NULL);
    write_text("key.pem", ek, NULL);
    CHECK_INT(moat_certmgr_load_files(cert_path, key_path, &cp, &kp, &nb, &na, err, sizeof err), 0);
    free(cp);
    free(kp);
    free(ec);
    free(ek);

    /* Expiring soon: accepted (with a warning in the log). */
    selfsigned("soon.localhost", now - 86400, now + 5 * 86400, &ec, &ek);
    write_text("cert.pem", ec, NULL);
    write_text("key.pem", ek, NULL);
    CHECK_INT(moat_certmgr_load_files(cert_path, key_path, &cp, &kp, &nb, &na, err, sizeof err), 0);
    free(cp);
    free(kp);
    free(ec);
    free(ek);

    /* Through the manager: a files site stored as "files:<first name>". */
    write_text("cert.pem", chain, NULL);
    write_text("key.pem", key, NULL);
    moat_site_addr_t a[] = {addr("files.localhost", MOAT_HOST_LOCALHOST, 0)};
    moat_site_t site = {.addrs = a, .naddrs = 1, .tls = MOAT_TLS_FILES};
    site.tls_cert = cert_path;
    site.tls_key = key_path;
    moat_config_t cfg = {.sites = &site, .nsites = 1};
    moat_certs_t *c = NULL;
    int64_t next;
    CHECK_INT(moat_certmgr_build(st, NULL, &cfg, &c, &next, err, sizeof err), 0);
    const moat_cert_t *r = moat_certs_lookup(c, "files.localhost", NULL);
    CHECK(r != NULL && strcmp(moat_cert_id(r), "files:files.localhost") == 0);
    CHECK(next > now);
    moat_certs_release(c);
    moat_cert_record_t rec;
    CHECK_INT(st->ops->get_cert(st, "files:files.localhost", &rec), 0);
    CHECK_STR(rec.source, "files");
    CHECK_STR(rec.cert_pem, chain);
    moat_cert_record_clear(&rec);
    /* A broken file fails the whole build, naming the file. */
    write_text("key.pem", other_key, NULL);
    CHECK(moat_certmgr_build(st, NULL, &cfg, &c, &next, err, sizeof err) < 0);
    CHECK(c == NULL && strstr(err, key_path) != NULL);

    moat_cert_record_clear(&root);
    moat_cert_record_clear(&inter);
    free(cert_path);
    free(key_path);
    free(leaf);
    free(chain);
    free(key);
    free(other_chain);
    free(other_key);
}

/* --- TLS handshakes in memory ------------------------------------------------------------- */

typedef struct {
    SSL *client, *server;
    int ok;
} hs_t;

/* Drive both ends until both finish or one fails. */
static int handshake(SSL *client, SSL *server)
{
    int cdone = 0, sdone = 0;
    for (int i = 0; i < 100 && !(cdone && sdone); i++) {
        if (!cdone) {
            int r = SSL_do_handshake(client);
            if (r == 1)
                cdone = 1;
            else if (SSL_get_error(client, r) != SSL_ERROR_WANT_READ)
                return 0;
        }
        if (!sdone) {
            int r = SSL_do_handshake(server);
            if (r == 1)
                sdone = 1;
            else if (SSL_get_error(server, r) != SSL_ERROR_WANT_READ)
                return -1;
        }
    }
    return cdone && sdone;
}

static void pair(SSL_CTX *sctx, SSL_CTX *cctx, SSL **c, SSL **s)
{
    *c = SSL_new(cctx);
    *s = SSL_new(sctx);
    BIO *b1, *b2;
    BIO_new_bio_pair(&b1, 0, &b2, 0);
    SSL_set_bio(*c, b1, b1);
    SSL_set_bio(*s, b2, b2);
    SSL_set_connect_state(*c);
    SSL_set_accept_state(*s);
}

/* Exchange a byte each way so that TLS 1.3 session tickets reach the client. */
static void ping(SSL *c, SSL *s)
{
    char ch = 'x';
    SSL_write(c, &ch, 1);
    SSL_read(s, &ch, 1);
    SSL_write(s, &ch, 1);
    SSL_read(c, &ch, 1);
}

static SSL_SESSION *last_session;

static int new_session_cb(SSL *ssl, SSL_SESSION *sess)
{
    (void)ssl;
    SSL_SESSION_free(last_session);
    last_session = sess;
    return 1;
}

static void test_tls(void)
{
    char err[512] = "";
    SSL_CTX *sctx = moat_tls_server_ctx_new(err, sizeof err);
    CHECK(sctx != NULL);
    if (sctx == NULL) {
        fprintf(stderr, "%s\n", err);
        return;
    }
    /* Snapshot: localhost first (the default), then other.localhost. */
    char *c1, *k1, *c2, *k2;
    issue("localhost", &c1, &k1);
    const char *n1[] = {"localhost"}, *n2[] = {"other.localhost", "127.0.0.1"};
    CHECK_INT(moat_ca_issue(ca, n2, 2, 3600, &c2, &k2), 0);
    moat_certs_builder_t *b = moat_certs_builder_new();
    moat_certs_builder_add(b, "one", n1, 1, c1, k1, err, sizeof err);
    moat_certs_builder_add(b, "two", n2, 2, c2, k2, err, sizeof err);
    /* Handshakes on this thread read these, as a worker's do after a swap. */
    moat_certs_t *certs = moat_certs_builder_finish(b);
    moat_tls_keys_t *keys = moat_tls_keys_new(NULL);
    moat_tls_thread_use(certs, keys);

    SSL_CTX *cctx = SSL_CTX_new(TLS_method());
    BIO *rb = BIO_new_mem_buf(moat_ca_root_pem(ca), -1);
    X509 *root = PEM_read_bio_X509(rb, NULL, NULL, NULL);
    BIO_free(rb);
    X509_STORE_add_cert(SSL_CTX_get_cert_store(cctx), root);
    SSL_CTX_set_verify(cctx, SSL_VERIFY_PEER, NULL);
    static const uint8_t alpn[] = "\x02h2\x08http/1.1";
    SSL_CTX_set_alpn_protos(cctx, alpn, sizeof alpn - 1);

    /* SNI localhost: verified against the root, the right certificate, ALPN http/1.1. */
    SSL *c, *s;
    pair(sctx, cctx, &c, &s);
    SSL_set_tlsext_host_name(c, "localhost");
    SSL_set1_host(c, "localhost");
    CHECK_INT(handshake(c, s), 1);
    CHECK_INT(SSL_get_verify_result(c), X509_V_OK);
    X509 *peer = SSL_get_peer_certificate(c);
    CHECK(peer != NULL && X509_check_host(peer, "localhost", 9, 0, NULL) == 1);
    X509_free(peer);
    CHECK_STR(moat_tls_selected_alpn(s), "http/1.1");
    CHECK_INT(SSL_version(s), TLS1_3_VERSION);
    SSL_free(c);
    SSL_free(s);

    /* SNI other.localhost gets the other certificate. */
    pair(sctx, cctx, &c, &s);
    SSL_set_tlsext_host_name(c, "OTHER.localhost");
    CHECK_INT(handshake(c, s), 1);
    peer = SSL_get_peer_certificate(c);
    CHECK(peer != NULL && X509_check_host(peer, "other.localhost", 15, 0, NULL) == 1);
    X509_free(peer);
    SSL_free(c);
    SSL_free(s);

    /* Unknown SNI: refused with unrecognized_name. */
    ERR_clear_error();
    pair(sctx, cctx, &c, &s);
    SSL_set_tlsext_host_name(c, "unknown.localhost");
    CHECK_INT(handshake(c, s), -1);
    /* Let the client read the alert the server queued. */
    CHECK(SSL_do_handshake(c) != 1);
    CHECK_INT(ERR_GET_REASON(ERR_peek_last_error()), SSL_R_TLSV1_ALERT_UNRECOGNIZED_NAME);
    ERR_clear_error();
    SSL_free(c);
    SSL_free(s);

    /* No SNI: the local address picks the certificate when given, else the default. */
    pair(sctx, cctx, &c, &s);
    struct sockaddr_in sin = {.sin_family = AF_INET};
    inet_pton(AF_INET, "127.0.0.1", &sin.sin_addr);
    moat_tls_set_local_addr(s, (struct sockaddr *)&sin);
    X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(c), "127.0.0.1");
    CHECK_INT(handshake(c, s), 1);
    CHECK_INT(SSL_get_verify_result(c), X509_V_OK);
    peer = SSL_get_peer_certificate(c);
    CHECK(peer != NULL && X509_check_host(peer, "other.localhost", 15, 0, NULL) == 1);
    X509_free(peer);
    SSL_free(c);
    SSL_free(s);
    pair(sctx, cctx, &c, &s);
    CHECK_INT(handshake(c, s), 1);
    peer = SSL_get_peer_certificate(c);
    CHECK(peer != NULL && X509_check_host(peer, "localhost", 9, 0, NULL) == 1);
    X509_free(peer);
    SSL_free(c);
    SSL_free(s);

    /* ALPN: the server's preference wins among what the client offers; no overlap means no
     * ALPN rather than a failed handshake. A context keeps the list it was made with. */
    const char *prefs[] = {"h2", "http/1.1"};
    moat_tls_set_alpn(prefs, 2);
    SSL_CTX *h2ctx = moat_tls_server_ctx_new(err, sizeof err);
    CHECK(h2ctx != NULL);
    const char *only[] = {"acme-tls/1"};
    moat_tls_set_alpn(only, 1);
    SSL_CTX *nonectx = moat_tls_server_ctx_new(err, sizeof err);
    CHECK(nonectx != NULL);
    const char *dflt[] = {"http/1.1"};
    moat_tls_set_alpn(dflt, 1);
    pair(h2ctx, cctx, &c, &s);
    SSL_set_tlsext_host_name(c, "localhost");
    CHECK_INT(handshake(c, s), 1);
    CHECK_STR(moat_tls_selected_alpn(s), "h2");
    SSL_free(c);
    SSL_free(s);
    pair(nonectx, cctx, &c, &s);
    SSL_set_tlsext_host_name(c, "localhost");
    CHECK_INT(handshake(c, s), 1);
    CHECK(moat_tls_selected_alpn(s) == NULL);
    SSL_free(c);
    SSL_free(s);
    pair(sctx, cctx, &c, &s); /* made before: still http/1.1 first */
    SSL_set_tlsext_host_name(c, "localhost");
    CHECK_INT(handshake(c, s), 1);
    CHECK_STR(moat_tls_selected_alpn(s), "http/1.1");
    SSL_free(c);
    SSL_free(s);
    SSL_CTX_free(h2ctx);
    SSL_CTX_free(nonectx);

    /* TLS 1.2 is accepted with an ECDHE-ECDSA AEAD suite; TLS 1.1 is not. */
    SSL_CTX_set_max_proto_version(cctx, TLS1_2_VERSION);
    pair(sctx, cctx, &c, &s);
    SSL_set_tlsext_host_name(c, "localhost");
    CHECK_INT(handshake(c, s), 1);
    CHECK_INT(SSL_version(s), TLS1_2_VERSION);
    const SSL_CIPHER *cipher = SSL_get_current_cipher(s);
    CHECK(cipher != NULL && SSL_CIPHER_is_aead(cipher) &&
          SSL_CIPHER_get_kx_nid(cipher) == NID_kx_ecdhe);

    /* Session tickets: resumption works, survives two rotations, not three. */
    SSL_SESSION *sess = SSL_get1_session(c);
    SSL_free(c);
    SSL_free(s);
    int expect[] = {1, 1, 1, 0};
    for (int round = 0; round < 4; round++) {
        if (round > 0) {
            /* What the control thread's hourly rotation publishes. */
            moat_tls_keys_t *next = moat_tls_keys_new(keys);
            moat_tls_keys_release(keys);
            keys = next;
            moat_tls_thread_use(certs, keys);
        }
        pair(sctx, cctx, &c, &s);
        SSL_set_tlsext_host_name(c, "localhost");
        SSL_set_session(c, sess);
        CHECK_INT(handshake(c, s), 1);
        CHECK_INT(SSL_session_reused(s), expect[round]);
        SSL_free(c);
        SSL_free(s);
    }
    SSL_SESSION_free(sess);
    SSL_CTX_set_max_proto_version(cctx, TLS1_3_VERSION);
    /* TLS 1.3 resumption too (BoringSSL hands TLS 1.3 tickets only to the new-session
     * callback). */
    SSL_CTX_set_session_cache_mode(cctx, SSL_SESS_CACHE_CLIENT);
    SSL_CTX_sess_set_new_cb(cctx, new_session_cb);
    pair(sctx, cctx, &c, &s);
    SSL_set_tlsext_host_name(c, "localhost");
    CHECK_INT(handshake(c, s), 1);
    ping(c, s);
    sess = last_session;
    last_session = NULL;
    CHECK(sess != NULL);
    SSL_free(c);
    SSL_free(s);
    pair(sctx, cctx, &c, &s);
    SSL_set_tlsext_host_name(c, "localhost");
    SSL_set_session(c, sess);
    CHECK_INT(handshake(c, s), 1);
    CHECK_INT(SSL_session_reused(s), 1);
    SSL_free(c);
    SSL_free(s);
    SSL_SESSION_free(sess);

    SSL_CTX_set_min_proto_version(cctx, TLS1_1_VERSION);
    SSL_CTX_set_max_proto_version(cctx, TLS1_1_VERSION);
    pair(sctx, cctx, &c, &s);
    SSL_set_tlsext_host_name(c, "localhost");
    CHECK(handshake(c, s) != 1);
    ERR_clear_error();
    SSL_free(c);
    SSL_free(s);

    /* No certificates: every handshake fails, nothing crashes. */
    moat_tls_thread_use(NULL, keys);
    SSL_CTX_set_max_proto_version(cctx, TLS1_3_VERSION);
    pair(sctx, cctx, &c, &s);
    CHECK(handshake(c, s) != 1);
    ERR_clear_error();
    SSL_free(c);
    SSL_free(s);

    /* No ticket keys: handshakes work, without tickets. */
    moat_tls_thread_use(certs, NULL);
    SSL_CTX_set_session_cache_mode(cctx, SSL_SESS_CACHE_OFF);
    pair(sctx, cctx, &c, &s);
    SSL_set_tlsext_host_name(c, "localhost");
    CHECK_INT(handshake(c, s), 1);
    SSL_free(c);
    SSL_free(s);
    SSL_CTX_set_max_proto_version(cctx, TLS1_2_VERSION);
    pair(sctx, cctx, &c, &s);
    SSL_set_tlsext_host_name(c, "localhost");
    CHECK_INT(handshake(c, s), 1);
    SSL_SESSION *plain = SSL_get1_session(c);
    CHECK(plain != NULL);
    size_t ticket_len = 0;
    const uint8_t *ticket = NULL;
    if (plain != NULL)
        SSL_SESSION_get0_ticket(plain, &ticket, &ticket_len);
    CHECK_INT(ticket_len, 0);
    SSL_SESSION_free(plain);
    SSL_free(c);
    SSL_free(s);
    moat_tls_thread_use(NULL, NULL);
    moat_certs_release(certs);
    moat_tls_keys_release(keys);

    SSL_SESSION_free(last_session);
    X509_free(root);
    SSL_CTX_free(cctx);
    SSL_CTX_free(sctx);
    free(c1);
    free(k1);
    free(c2);
    free(k2);
}

/* --- commands ----------------------------------------------------------------------------- */

static void test_commands(void)
{
    char *trust = path_of("trust");
    /* Silence the commands' stdout: the table and PEM are checked by the integration tests. */
    fflush(stdout);
    int saved = dup(1);
    FILE *devnull = freopen("/dev/null", "w", stdout);
    (void)devnull;
    int rc_root = moat_cmd_ca_root(dir);
    int rc_certs = moat_cmd_certs(dir, NULL);
    int rc_add = moat__cmd_trust_at(dir, 1, trust, "true");
    fflush(stdout);
    dup2(saved, 1);
    close(saved);
    CHECK_INT(rc_root, 0);
    CHECK_INT(rc_certs, 0);
    CHECK_INT(rc_add, 0);
    char *installed = path_of("trust/moat-root.crt");
    FILE *f = fopen(installed, "r");
    char buf[4096] = "";
    size_t n = f ? fread(buf, 1, sizeof buf - 1, f) : 0;
    buf[n] = '\0';
    if (f)
        fclose(f);
    CHECK_STR(buf, moat_ca_root_pem(ca));
    struct stat sb;
    CHECK(stat(installed, &sb) == 0 && (sb.st_mode & 0777) == 0644);
    /* A missing updater is an error that says what to install. */
    CHECK_INT(moat__cmd_trust_at(dir, 0, trust, "/nonexistent/update-ca-certificates"), 1);
    CHECK(access(installed, F_OK) != 0);
    CHECK_INT(moat__cmd_trust_at(dir, 0, trust, "true"), 0); /* already gone: fine */
    free(installed);
    free(trust);
}

int main(void)
{
    moat_log_min_level = MOAT_LOG_ERROR;
    if (mkdtemp(dir) == NULL) {
        perror("mkdtemp");
        return 1;
    }
    char err[512] = "";
    if (moat_storage_open_sqlite(dir, &st, err, sizeof err) != 0 ||
        moat_ca_open(st, &ca, err, sizeof err) != 0) {
        fprintf(stderr, "setup: %s\n", err);
        return 1;
    }
    test_snapshot_lookup();
    test_snapshot_wildcard();
    test_certmgr_internal();
    test_certmgr_files();
    test_tls();
    test_commands();
    moat_ca_free(ca);
    st->ops->close(st);
    nftw(dir, rm_cb, 8, FTW_DEPTH | FTW_PHYS);
    return test_summary("certs");
}
