/* What moat processes sharing one store share for ACME (server/acmeshare.c), on the control
 * thread: the issuing lock of each certificate, a beat that tells how many other live
 * processes there are, and the pending challenge tokens, mirrored from the store into this
 * process's in-memory answer tables (acme/challenge.c) so that whichever process the CA's
 * validator reaches can answer. Workers never touch the store; they read those tables.
 *
 * Storage: the issuing lock of <id> is the lease <id> (storage.h, lease_take: fencing token,
 * the store's clock), renewed while the order runs; the certificate is written only while its
 * token holds (put_cert_fenced). In the kv table:
 *   acme-token:<token>         a pending HTTP-01 key authorization
 *   acme-token-alpn:<name>     a pending TLS-ALPN-01 key authorization
 *   acme-instance:<owner>      "<expiry unix>": a live process sharing this store */
#ifndef MOAT_ACMESHARE_H
#define MOAT_ACMESHARE_H

#include "moat/acme.h"
#include "moat/storage.h"

/* How often moat_acmeshare_refresh should run, and how long an order placer waits after
 * storing a token before telling the CA when other processes share the store. */
#define MOAT_ACMESHARE_POLL_MS        1000
#define MOAT_ACMESHARE_PROPAGATION_MS (2 * MOAT_ACMESHARE_POLL_MS)

typedef struct moat_acmeshare moat_acmeshare_t;

/* A new participant with a unique owner name (host/pid/random); st is borrowed. Refreshes
 * once, so the first order already knows whether other processes must see its tokens. */
moat_acmeshare_t *moat_acmeshare_new(moat_storage_t *st);
/* Leave: the beat row is removed and this process's answer tables cleared. */
void moat_acmeshare_free(moat_acmeshare_t *s);

/* Take (or renew) the issuing lock for id: 1 taken, 0 held by another live process (or, when
 * this process held it, taken over by another since: said once in the log), < 0 a storage
 * error. A lock left by a process of this host that is gone (killed mid-order) is taken over
 * at once instead of when it runs out. The lease lasts 120 s (MOAT_ACME_LOCK_TTL seconds when
 * set, for tests) and is renewed every moat_acmeshare_heartbeat_ms while the order runs. */
int moat_acmeshare_lock_take(moat_acmeshare_t *s, const char *id);
/* This process's owner name, and whether the process that wrote another owner name is gone
 * (on this host: its pid no longer exists; anywhere: its beat row ran out or is missing). Used
 * to clean up what a stopped process left (DNS-01 records, server/dns01.h). */
const char *moat_acmeshare_owner(const moat_acmeshare_t *s);
int moat_acmeshare_owner_gone(const moat_acmeshare_t *s, const char *owner);
/* The fencing token of the lock this process holds for id (for put_cert_fenced), 0 if none. */
int64_t moat_acmeshare_lock_token(moat_acmeshare_t *s, const char *id);
uint64_t moat_acmeshare_heartbeat_ms(const moat_acmeshare_t *s);
/* Release it, if this process holds it. */
void moat_acmeshare_lock_release(moat_acmeshare_t *s, const char *id);

/* One of this process's orders publishes (key_auth non-NULL) or withdraws a token: stored
 * for the other processes and applied to this one's answer tables. */
void moat_acmeshare_publish(moat_acmeshare_t *s, moat_acme_chal_t type, const char *name,
                            const char *token, const char *key_auth);
/* Every MOAT_ACMESHARE_POLL_MS: beat, count the peers, mirror the other processes' tokens. */
void moat_acmeshare_refresh(moat_acmeshare_t *s);
/* Other live processes on the store at the last refresh. */
int moat_acmeshare_peers(const moat_acmeshare_t *s);

#endif
