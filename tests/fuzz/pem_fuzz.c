/* Fuzz the PEM certificate and key loading moat does itself: the tls=CERT,KEY checks
 * (moat__certs_check_pem, what moat_certmgr_load_files runs on the files' text), the snapshot
 * builder that parses stored and issued chains and keys (moat_certs_builder_add, its chain
 * parser and name table), installing the result on an SSL, and the ARI certificate identifier
 * and account-key readers of acme/ (moat_acme_ari_cert_id_pem, moat_acme_key_from_pem).
 *
 * The input is the certificate text; when it holds a NUL byte, the part after the first one is
 * the key text, else the same text serves as both (a combined PEM file).
 *
 * Checked: what the tls=files checks accept, the builder accepts too (as written and as the
 * checks normalize it) and the result installs; a built snapshot serves its names (case,
 * trailing dot and IPv6 spellings included) and refuses others. */
#include "certs_internal.h"
#include "moat/acme.h"
#include "moat/certs.h"
#include "moat/log.h"

#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/ssl.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static SSL_CTX *ctx;
static int verbose; /* MOAT_FUZZ_VERBOSE=1: print what the checks said (to check seeds) */

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc, (void)argv;
    verbose = getenv("MOAT_FUZZ_VERBOSE") != NULL;
    moat_log_min_level = MOAT_LOG_ERROR;
    ctx = SSL_CTX_new(TLS_method());
    return ctx ? 0 : -1;
}

/* Build a snapshot of one certificate, look its names up and install it. Returns the
 * builder's result. */
static int build(const char *chain, const char *key, int must_install)
{
    static const char *const names[] = {"A.Example.COM.", "a.example.com", "::1", "127.0.0.1",
                                        "[bad"};
    char err[512] = "";
    moat_certs_builder_t *b = moat_certs_builder_new();
    int rc = moat_certs_builder_add(b, "fuzz", names, MOAT_ARRAY_LEN(names), chain, key, err,
                                    sizeof err);
    if (rc != 0) {
        if (err[0] == '\0')
            abort();
        if (verbose)
            fprintf(stderr, "builder: %s\n", err);
        moat_certs_builder_free(b);
        return rc;
    }
    moat_certs_t *c = moat_certs_builder_finish(b);
    const moat_cert_t *cert = moat_certs_lookup(c, "a.example.COM", NULL);
    if (moat_certs_count(c) != 1 || cert == NULL || moat_certs_default(c) != cert ||
        moat_certs_lookup(c, NULL, "0:0::1") != cert || moat_certs_lookup(c, "b.example", NULL))
        abort();
    moat_cert_not_after(cert);
    SSL *ssl = SSL_new(ctx);
    if (ssl != NULL && moat_cert_install(cert, ssl) != 0 && must_install)
        abort();
    SSL_free(ssl);
    ERR_clear_error();
    moat_certs_release(c);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size + 1);
    memcpy(text, data, size);
    text[size] = '\0';
    const char *cert_text = text;
    size_t clen = strlen(text);
    const char *key_text = clen < size ? text + clen + 1 : text;

    char *chain_pem, *key_pem, err[512] = "";
    int64_t nb = 0, na = 0;
    int rc = moat__certs_check_pem("cert.pem", cert_text, "key.pem", key_text, &chain_pem, &key_pem,
                                   &nb, &na, err, sizeof err);
    if (verbose)
        fprintf(stderr, "tls=files: %s\n", rc == 0 ? "accepted" : err);
    if (rc == 0) {
        if (chain_pem == NULL || key_pem == NULL)
            abort();
        /* The normalized PEM is what gets stored and later built into a snapshot. */
        if (build(chain_pem, key_pem, 1) != 0)
            abort();
        free(chain_pem);
        moat_secret_free(key_pem);
    } else if (chain_pem != NULL || key_pem != NULL || err[0] == '\0') {
        abort();
    }

    /* The files check reads the same texts the builder later parses (from storage): what it
     * accepts must build, or a damaged block it skipped would be served as a short chain. */
    if (build(cert_text, key_text, 0) != 0 && rc == 0)
        abort();

    char *id = moat_acme_ari_cert_id_pem(cert_text);
    if (verbose)
        fprintf(stderr, "ARI id: %s\n", id ? id : "(none)");
    free(id);
    EVP_PKEY *k = moat_acme_key_from_pem(key_text);
    if (k != NULL) {
        moat_secret_free(moat_acme_key_pem(k));
        free(moat_acme_thumbprint(k));
        EVP_PKEY_free(k);
    }
    ERR_clear_error();
    free(text);
    return 0;
}
