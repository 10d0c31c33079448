/* Certificates: the immutable in-memory snapshot the TLS handshake reads, and the certificate
 * manager that builds it on the control thread. (The certificate CLI commands that use them
 * are server-internal: server/certcmd.h.)
 *
 * Snapshot. A moat_certs_t maps host names (and IP literals) to certificates. Each certificate
 * is held ready for BoringSSL: the chain as CRYPTO_BUFFERs (DER) and the key as an EVP_PKEY,
 * parsed once when the snapshot is built. A handshake then costs a binary search and
 * SSL_set_chain_and_key, which only takes references: no parsing, no PEM, no copies of the
 * certificate bytes. The snapshot is reference-counted and never changes after it is built;
 * the control thread publishes a new one together with the runtime (server/worker.h), each
 * worker swaps it in between events, and its handshakes read it without a lock
 * (moat_tls_thread_use).
 *
 * Which certificate a ClientHello gets (the choice is deliberate):
 *   - SNI present: the certificate whose names contain it exactly (ASCII case-insensitive),
 *     else one with the wildcard for its parent ("*.example.com" for a.example.com; one label
 *     only, never example.com itself), so a more specific site line wins over a wildcard one.
 *     An SNI name no site serves is refused: the handshake fails with an unrecognized_name
 *     alert rather than presenting some other site's certificate, which would only produce a
 *     name-mismatch warning and reveal which names this server hosts.
 *   - no SNI (clients never send SNI for IP literals, and some old clients never do): the
 *     certificate for the connection's local IP address when one covers it, else the default
 *     certificate, which is the first TLS site's in the site file.
 */
#ifndef MOAT_CERTS_H
#define MOAT_CERTS_H

#include "moat/ca.h"
#include "moat/config.h"
#include "moat/storage.h"
#include <stddef.h>
#include <stdint.h>

typedef struct ssl_st SSL;

typedef struct moat_certs moat_certs_t;
typedef struct moat_cert moat_cert_t; /* one chain + key inside a snapshot */
typedef struct moat_certs_builder moat_certs_builder_t;

/* --- building a snapshot (control thread) --- */

moat_certs_builder_t *moat_certs_builder_new(void);
/* Add a certificate for `names` (host names or IP literals, matched case-insensitively).
 * `chain_pem` holds the leaf first, then its issuers; `key_pem` the leaf's private key. The
 * first certificate added is the default one (no SNI). A name already claimed by an earlier
 * certificate keeps the earlier one. `id` is a label for logs and tests (the storage id).
 * Returns 0, or MOAT_ECRYPTO with a sentence in err when the PEM cannot be parsed. */
int moat_certs_builder_add(moat_certs_builder_t *b, const char *id, const char *const *names,
                           size_t n, const char *chain_pem, const char *key_pem, char *err,
                           size_t errlen);
/* Finish: the builder is consumed and the snapshot returned with one reference (never NULL). */
moat_certs_t *moat_certs_builder_finish(moat_certs_builder_t *b);
/* Abandon a builder that will not be finished. */
void moat_certs_builder_free(moat_certs_builder_t *b);

/* --- references (any thread; atomic, taken only where threads meet: publish and retire) --- */

moat_certs_t *moat_certs_ref(moat_certs_t *c);
/* Drop a reference; the last one frees the snapshot. NULL is ignored. */
void moat_certs_release(moat_certs_t *c);

/* --- lookup (any thread; no allocation) --- */

/* The certificate for a ClientHello, following the rules at the top of this file. `sni` is
 * the server name (NULL when absent); `local_ip` the textual local address of the connection
 * (NULL when unknown), used only without SNI. NULL means refuse the handshake. The result is
 * owned by the snapshot. */
const moat_cert_t *moat_certs_lookup(const moat_certs_t *c, const char *sni, const char *local_ip);
const moat_cert_t *moat_certs_default(const moat_certs_t *c);
size_t moat_certs_count(const moat_certs_t *c);
/* The i-th certificate (0: the default), NULL past the end; for status and metrics. */
const moat_cert_t *moat_certs_at(const moat_certs_t *c, size_t i);
/* When the managers renew a stored certificate (unix time; 0: never, tls=files): ACME ones
 * with a third of their life left, internal ones after two thirds. For `moat certs` and
 * `moat status`. */
int64_t moat_cert_next_renewal(const moat_cert_record_t *r);
/* Install the certificate on a server connection (takes references only). 0 or MOAT_ETLS. */
int moat_cert_install(const moat_cert_t *cert, SSL *ssl);
const char *moat_cert_id(const moat_cert_t *cert);
int64_t moat_cert_not_after(const moat_cert_t *cert);

/* --- the certificate manager (control thread; may block on storage) --- */

/* Days before expiry at which a certificate from files starts to be warned about. */
#define MOAT_CERTS_FILES_WARN_DAYS 14

/* Build a snapshot for every TLS site of `cfg` (sites/addresses with plain_http == 0):
 *   names that use ACME (moat_certs_site_uses_acme): the stored "acme:<sorted names>"
 *     certificate until it expires; none while it is pending (their handshakes are refused).
 *     Issuing and renewing it is the ACME manager's job, not this module's.
 *   tls=files: load the site's tls_cert/tls_key PEM files and check them (key matches the
 *     leaf, each certificate issued by the next, none expired; a warning when the leaf expires
 *     within 14 days); stored as "files:<first name>" with source "files".
 *   other names (internal, or auto with an internal name): the stored "internal:<sorted names
 *     joined by ,>" certificate while it has more than a third of its life left, else a new
 *     one from the internal CA, stored with an "issued" or "renewed" event.
 * On success *out holds the snapshot (one reference, not published) and *next_check_unix the
 * earliest time anything needs renewing or re-checking. On failure (the message names the site
 * or file) nothing is published and the caller keeps its current snapshot. */
int moat_certmgr_build(moat_storage_t *st, moat_ca_t *ca, const moat_config_t *cfg,
                       moat_certs_t **out, int64_t *next_check_unix, char *err, size_t errlen);

/* Whether `name` of site s gets its certificate over ACME: tls=acme, or tls=auto and a name
 * that is not internal (moat_host_is_internal; names under .test count as public). */
int moat_certs_site_uses_acme(const moat_site_t *s, const char *name);
/* The site's TLS names that use ACME, in the order written: returns the count; *out is an array
 * of borrowed strings (free() the array). */
size_t moat_certs_site_acme_names(const moat_site_t *s, const char ***out);
/* The storage id of the ACME certificate for these names: "acme:" + sorted names joined by ","
 * (free()). */
char *moat_certs_acme_id(const char *const *names, size_t n);

/* Check a certificate chain file and key file the way tls=files does, without storing
 * anything. On success *chain_pem and *key_pem (free()) hold the normalized PEM and
 * *not_before and *not_after the leaf's validity. Exposed for tests and `moat check`. */
int moat_certmgr_load_files(const char *cert_path, const char *key_path, char **chain_pem,
                            char **key_pem, int64_t *not_before, int64_t *not_after, char *err,
                            size_t errlen);

#endif
