/* The Cloudflare API v4 calls DNS-01 needs (server/dns01_cloudflare.c), on the control loop,
 * through the control plane's HTTP client. Server-internal: server/dns01.c drives them.
 *
 *   zone:   GET zones?name=<candidate> from the record's parent name upwards until a zone
 *           matches
 *   create: POST zones/<id>/dns_records {type TXT, name, content, ttl 60}
 *   remove: GET zones/<id>/dns_records?type=TXT&name=<fqdn>, DELETE each one whose content is
 *           the value (so a record whose creation answer was lost is found too)
 *
 * Every request carries "Authorization: Bearer <token>"; the token needs Zone:Read and
 * DNS:Edit on the zone. Errors come back as a sentence with Cloudflare's errors array. */
#ifndef MOAT_DNS01_CLOUDFLARE_H
#define MOAT_DNS01_CLOUDFLARE_H

#include "moat/httpclient.h"

#define MOAT_CF_API_DEFAULT "https://api.cloudflare.com/client/v4"

/* zone_id and zone (the zone's name) are set on a successful zone lookup; NULL otherwise. */
typedef void (*moat_cf_cb)(void *arg, int rc, const char *error, const char *zone_id,
                           const char *zone);

/* Start a call; cb runs exactly once (also when the client is freed first: then with
 * MOAT_ECLOSED), inside the call only when the request cannot even be sent. The strings are
 * copied; the token is wiped when done. */
void moat_cf_zone(moat_httpc_t *h, const char *api, const char *token, const char *fqdn,
                  moat_cf_cb cb, void *arg);
void moat_cf_create(moat_httpc_t *h, const char *api, const char *token, const char *zone_id,
                    const char *fqdn, const char *value, moat_cf_cb cb, void *arg);
void moat_cf_remove(moat_httpc_t *h, const char *api, const char *token, const char *zone_id,
                    const char *fqdn, const char *value, moat_cf_cb cb, void *arg);

#endif
