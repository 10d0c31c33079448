/* The runtime snapshot: a parsed site file plus what the workers need to act on it
 * (resolved upstream addresses, the upstream TLS context). Immutable once built and
 * reference-counted on two levels: an atomic count for the threads that hold it (the control
 * thread and each worker that has it as current or still serves a request with it), changed
 * only at publish and retire; and, on each worker, a plain worker-local count for the requests
 * using it (server/worker.h moat_worker_runtime_acquire). A reload never changes the rules
 * under a request in flight. */
#ifndef MOAT_RUNTIME_H
#define MOAT_RUNTIME_H

#include "moat/common.h"
#include "moat/config.h"
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <stdatomic.h>
#include <sys/socket.h>
#include <uv.h>

typedef struct {
    struct sockaddr_storage addr;
    socklen_t addrlen;
    int tls;         /* https:// upstream: TLS, verified against the system store */
    char *tls_name;  /* name to verify and send as SNI */
    char label[128]; /* "127.0.0.1:8080" or "unix:/run/app.sock", for logs and pool keys */
    int named;       /* host is a name (not an IP literal): its address may change */
    unsigned mslot;  /* its counters' slot (server/metrics.h) */
} moat_upstream_t;

typedef struct {
    const moat_site_t *site;
    moat_upstream_t *upstreams;
    size_t nupstreams;
    unsigned mslot; /* its counters' slot (server/metrics.h) */
} moat_site_rt_t;

typedef struct moat_runtime {
    atomic_int refs;       /* threads holding it; see moat_runtime_ref */
    moat_config_t *config; /* owned, unless `base` is set */
    /* A re-addressed copy (moat_runtime_readdress) shares its config with the runtime that
     * owns it, and holds a reference on that one instead. */
    struct moat_runtime *base;
    moat_site_rt_t *sites; /* same order as config->sites */
    size_t nsites;
    SSL_CTX *upstream_tls;
    int http_port, https_port;
    /* Before a request names its site, a connection lives by the most generous of the
     * sites' header and keep-alive timeouts. */
    uint64_t header_timeout_ms, keepalive_timeout_ms;
    uint64_t generation;
} moat_runtime_t;

/* Called once, on the loop, when a build ends: `rt` is the new snapshot (one reference, not
 * published), or NULL with a sentence in err (the config is freed then). */
typedef void (*moat_runtime_built_cb)(moat_runtime_t *rt, const char *err, void *data);
typedef struct moat_runtime_build moat_runtime_build_t;

/* Build a snapshot from a parsed config (takes ownership of cfg) on the control loop: every
 * upstream host name is looked up with uv_getaddrinfo, all at once and never blocking the
 * loop, then the snapshot is assembled. An upstream that does not resolve fails the build with
 * "cannot resolve upstream host 'NAME': REASON" (the first such upstream in file order). `cb`
 * runs exactly once, on `loop`, never inside this call. The handle is valid until then. */
moat_runtime_build_t *moat_runtime_build(uv_loop_t *loop, moat_config_t *cfg, int http_port,
                                         int https_port, moat_runtime_built_cb cb, void *data);
/* Abandon a build in flight (at stop): cb still runs, soon, with NULL and "cancelled". A
 * lookup already running in the thread pool cannot be interrupted; cb waits for it. */
void moat_runtime_build_cancel(moat_runtime_build_t *b);

/* A copy of rt for new upstream addresses (the names moved; see server/resolver.c): same
 * config (shared, not copied), same TLS context, its own upstream arrays, which the caller
 * fills before publishing it. One reference; never published yet. */
moat_runtime_t *moat_runtime_readdress(moat_runtime_t *rt);

/* Atomic references, for handing a snapshot from one thread to another (publish, retire).
 * Requests never call these: they use their worker's local count. The last unref frees. */
moat_runtime_t *moat_runtime_ref(moat_runtime_t *rt);
void moat_runtime_unref(moat_runtime_t *rt);

/* 1 when the bare host h is pattern (ASCII case-insensitive) or, for a pattern "*.example.com",
 * one label of letters, digits, '-' or '_' followed by ".example.com". */
int moat_runtime_host_matches(moat_slice_t h, const char *pattern);
/* The site that serves `host` (a Host header or :authority value, port included or not) on a
 * listener of this port and kind: an exact address first, then a wildcard one. NULL when none
 * does. */
const moat_site_rt_t *moat_runtime_find_site(const moat_runtime_t *rt, moat_slice_t host, int port,
                                             int tls);
/* The HTTPS address, on any port, whose host is that of `host` (port ignored): where the
 * HTTP listener redirects a request for it. NULL when no TLS site has the name. */
const moat_site_addr_t *moat_runtime_find_tls_addr(const moat_runtime_t *rt, moat_slice_t host);
/* A site's name for status and metrics: its first address ("chat.example.com", with ":PORT"
 * when the line names one). */
const char *moat_runtime_site_name(const moat_site_t *s, char *buf, size_t n);
/* Effective port of a site address on this runtime's listeners. */
int moat_runtime_addr_port(const moat_runtime_t *rt, const moat_site_addr_t *a);

#endif
