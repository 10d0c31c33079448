/* ACME DNS-01 records (server/dns01.c), on the control thread: create and delete the TXT record
 * _acme-challenge.<name> through a provider, and wait until every authoritative server of the
 * zone answers it. Server-internal: the ACME manager drives it through moat_acme_io_t.
 *
 * Providers: rfc2136 (UPDATE signed with TSIG to dns_server, over UDP with TCP when the answer
 * is truncated) and cloudflare (API v4 through the control plane's HTTP client,
 * server/dns01_cloudflare.c). DNS messages are built and read by acme/dnsmsg.c.
 *
 * Every record made is remembered in storage before the update is sent, as the kv row
 *   dns01-record:<fqdn>|<value>   {"owner","provider","name","value","zone", and for rfc2136
 *                                 "server","port","tsig", for cloudflare "token_file","api",
 *                                 "zone_id"; "resolver" when set} (JSON)
 * and the row is removed once the record is deleted, so a record a crash or restart left
 * behind is deleted by moat_dns01_cleanup (at start and before each order) once its owner
 * process is known to be gone. The row holds the key file's
 * path, never the key. What a name's DNS-01 is doing is kept, for `moat certs`, as
 *   dns01-state:<name>            a sentence ("waiting for ... since ...", "failed: ...") */
#ifndef MOAT_DNS01_H
#define MOAT_DNS01_H

#include "moat/acme.h"
#include "moat/storage.h"
#include <stdint.h>

typedef struct moat_dns01 moat_dns01_t;
typedef struct uv_loop_s uv_loop_t;

#define MOAT_DNS01_RECORD_PREFIX "dns01-record:"
#define MOAT_DNS01_STATE_PREFIX  "dns01-state:"

/* A site's DNS-01 settings (moat_site_t's dns_* fields), borrowed for the call. */
typedef struct {
    int provider; /* moat_dns_provider_t */
    const char *server, *tsig, *token_file, *resolver, *api;
    uint64_t wait_ms;
} moat_dns01_cfg_t;

/* owner: this process's name in the rows it writes (moat_acmeshare_owner). */
moat_dns01_t *moat_dns01_new(uv_loop_t *loop, moat_storage_t *st, const char *owner);
/* Create _acme-challenge.<name> TXT value and wait for it on the zone's authoritative servers
 * (at most cfg->wait_ms). cb runs exactly once, never inside this call. */
void moat_dns01_add(moat_dns01_t *d, const moat_dns01_cfg_t *cfg, const char *name,
                    const char *value, moat_acme_dns01_cb cb, void *arg);
/* Delete that record (whatever an add still under way made of it). A failure is logged and
 * the storage row kept, so moat_dns01_cleanup tries again at the next start. */
void moat_dns01_remove(moat_dns01_t *d, const char *name, const char *value);
/* Delete every record storage remembers whose owner gone(arg, owner) says has stopped (a
 * process killed mid-order); rows of live processes, this one included, are left alone. */
void moat_dns01_cleanup(moat_dns01_t *d, int (*gone)(void *arg, const char *owner), void *arg);
/* Stop: adds under way report MOAT_ECLOSED; handles close on the loop, so run it once. */
void moat_dns01_free(moat_dns01_t *d);

#endif
