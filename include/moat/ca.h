/* The internal certificate authority: a long-lived root (10 years) and a short-lived
 * intermediate (180 days) that signs leaf certificates for the names no public CA issues for
 * (local names, IP literals: moat_host_is_internal) and for sites with tls=internal; public
 * names get theirs over ACME. ECDSA P-256 keys and SHA-256 signatures throughout.
 *
 * Both CA certificates and their keys live in storage under the ids "internal-root" and
 * "internal-intermediate". The root is created once and never overwritten; the intermediate is
 * renewed when two thirds of its lifetime has passed. A moat_ca_t is used from the control
 * thread only (it may block on storage). */
#ifndef MOAT_CA_H
#define MOAT_CA_H

#include "moat/storage.h"
#include <stddef.h>
#include <stdint.h>

typedef struct moat_ca moat_ca_t;

#define MOAT_CA_ROOT_ID         "internal-root"
#define MOAT_CA_INTERMEDIATE_ID "internal-intermediate"
#define MOAT_CA_ROOT_LIFETIME   (3650 * 86400LL)
#define MOAT_CA_INTER_LIFETIME  (180 * 86400LL)
/* Default lifetime of a leaf the CA issues; renewed when two thirds has passed. */
#define MOAT_CA_LEAF_LIFETIME (7 * 86400LL)

/* Load the root and intermediate from `st` (borrowed; it must outlive the CA), creating them
 * on first run (both in one transaction, with a "ca-created" event) and renewing the
 * intermediate when due ("intermediate-renewed" event). An existing root that cannot be parsed
 * is an error, never replaced. Returns 0 or a negative MOAT_E* code with a sentence in err. */
int moat_ca_open(moat_storage_t *st, moat_ca_t **out, char *err, size_t errlen);

/* Renew the intermediate if two thirds of its life has passed. Sets *renewed (if not NULL) to
 * 1 when it did. The control thread calls it before issuing; moat_ca_open calls it too. */
int moat_ca_maintain(moat_ca_t *ca, int *renewed, char *err, size_t errlen);

/* The Unix time at which the intermediate becomes due for renewal. */
int64_t moat_ca_next_renewal(const moat_ca_t *ca);

/* The root certificate as PEM (owned by the CA). */
const char *moat_ca_root_pem(const moat_ca_t *ca);
/* The current intermediate's common name (owned by the CA; changes when it is renewed). */
const char *moat_ca_intermediate_name(const moat_ca_t *ca);

/* Issue a leaf for `names` (n >= 1): a new P-256 key; subjectAltName DNS entries for names
 * and IP entries for IPv4/IPv6 literals; EKU serverAuth; not_before = now - 5 minutes;
 * not_after = now + lifetime_s, but never past the intermediate's own expiry.
 * *chain_pem gets the leaf followed by the intermediate, *key_pem the PKCS#8 key; the caller
 * frees both with free(). Nothing is stored: the caller records the result. */
int moat_ca_issue(moat_ca_t *ca, const char *const *names, size_t n, int64_t lifetime_s,
                  char **chain_pem, char **key_pem);

void moat_ca_free(moat_ca_t *ca);

#endif
