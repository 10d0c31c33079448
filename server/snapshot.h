/* Snapshots: what the workers serve from, and how the control thread makes and publishes it.
 *
 * A snapshot is three immutable, reference-counted objects that travel together: the runtime
 * (parsed site file, resolved upstreams), the certificate snapshot built for that runtime and
 * the session-ticket keys. The snapshot manager, on the control thread, holds the current one
 * and replaces it on a reload, a certificate renewal or a ticket-key rotation. Everything that
 * can fail happens before anything is published: a reload first resolves every upstream name
 * (uv_getaddrinfo, never blocking the loop), builds the runtime, then the certificates, and
 * only when all of it succeeded hands the new snapshot to its publish callback
 * (moat_workers_publish in the server). A failed reload leaves the current snapshot, and what
 * the workers see, untouched. */
#ifndef MOAT_SNAPSHOT_H
#define MOAT_SNAPSHOT_H

#include "moat/ca.h"
#include "moat/certs.h"
#include "moat/config.h"
#include "moat/runtime.h"
#include "moat/storage.h"
#include "moat/tls.h"
#include <stdint.h>
#include <uv.h>

/* A value: whoever holds one owns one atomic reference on each non-NULL member. */
typedef struct moat_snapshot {
    moat_runtime_t *rt;
    moat_certs_t *certs; /* NULL: every handshake is refused */
    moat_tls_keys_t *keys;
} moat_snapshot_t;

/* *dst = src with one new reference on each member (atomic: done only at publish). */
void moat_snapshot_ref(moat_snapshot_t *dst, const moat_snapshot_t *src);
/* Drop the references of s and clear it. */
void moat_snapshot_release(moat_snapshot_t *s);

/* --- the snapshot manager (control thread) --- */

typedef struct moat_snapmgr moat_snapmgr_t;

/* Called with the new current snapshot, borrowed: take references to keep any of it. */
typedef void (*moat_snapshot_publish_cb)(const moat_snapshot_t *s, void *data);
/* A load ended: status 0 (published), or negative with a sentence in err (nothing changed). */
typedef void (*moat_snapmgr_done_cb)(int status, const char *err, void *data);

typedef struct {
    uv_loop_t *loop;
    moat_storage_t *storage; /* borrowed, for the certificate manager */
    moat_ca_t *ca;           /* borrowed; may be NULL */
    int http_port, https_port;
    moat_snapshot_publish_cb publish;
    void *publish_data;
} moat_snapmgr_opts_t;

/* A manager with no runtime yet and fresh ticket keys (nothing published). */
moat_snapmgr_t *moat_snapmgr_new(const moat_snapmgr_opts_t *o);
/* Free the manager and drop its references. No load may be in flight: cancel it and run the
 * loop until its done callback ran. */
void moat_snapmgr_free(moat_snapmgr_t *m);

/* Load a parsed config (ownership taken on 0): resolve, build the runtime and the
 * certificates, publish them together. `done` runs once on the loop, never inside this call.
 * MOAT_EAGAIN (cfg not taken) while another load is in flight. */
int moat_snapmgr_load(moat_snapmgr_t *m, moat_config_t *cfg, moat_snapmgr_done_cb done, void *data);
int moat_snapmgr_busy(const moat_snapmgr_t *m);
/* Abandon the load in flight, if any: its done callback still runs, with an error. */
void moat_snapmgr_cancel(moat_snapmgr_t *m);

/* Rebuild the certificates for the current runtime (a renewal, a new ACME certificate) and
 * publish them with it. 0, or negative with a sentence in err (nothing changed). May block on
 * storage. MOAT_EINVAL before the first load. */
int moat_snapmgr_recert(moat_snapmgr_t *m, char *err, size_t errlen);
/* Publish rt (a moat_runtime_readdress copy of the current runtime, reference taken over)
 * with the current certificates and keys: the same sites, upstreams at new addresses. A
 * reload in flight wins: it is looking every name up anyway, so rt is dropped and MOAT_EAGAIN
 * returned. */
int moat_snapmgr_readdress(moat_snapmgr_t *m, moat_runtime_t *rt);
/* New session-ticket keys (the previous two still decrypt), published with the current
 * runtime and certificates. */
void moat_snapmgr_rotate_keys(moat_snapmgr_t *m);
/* Serve these ticket keys from now on (taking over the reference): keys shared through the
 * store (server/tickets.c). */
void moat_snapmgr_set_keys(moat_snapmgr_t *m, moat_tls_keys_t *keys);

/* The current snapshot (rt NULL before the first load), borrowed. */
const moat_snapshot_t *moat_snapmgr_current(const moat_snapmgr_t *m);
/* When the current certificates need looking at again (unix time; INT64_MAX: never). */
int64_t moat_snapmgr_next_check(const moat_snapmgr_t *m);

#endif
