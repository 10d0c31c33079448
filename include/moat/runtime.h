/* The runtime snapshot: a parsed site file plus what the workers need to act on it
 * (resolved upstream addresses, the upstream TLS context). Immutable once published and
 * reference-counted: a worker acquires it at the start of a request and releases it at the
 * end, so a reload never changes the rules under a request in flight. */
#ifndef MOAT_RUNTIME_H
#define MOAT_RUNTIME_H

#include "moat/common.h"
#include "moat/config.h"
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <sys/socket.h>

typedef struct {
    struct sockaddr_storage addr;
    socklen_t addrlen;
    int tls;         /* https:// upstream: TLS, verified against the system store */
    char *tls_name;  /* name to verify and send as SNI */
    char label[128]; /* "127.0.0.1:8080" or "unix:/run/app.sock", for logs and pool keys */
} moat_upstream_t;

typedef struct {
    const moat_site_t *site;
    moat_upstream_t *upstreams;
    size_t nupstreams;
} moat_site_rt_t;

typedef struct moat_runtime {
    int refs; /* guarded by the publish lock */
    moat_config_t *config;
    moat_site_rt_t *sites; /* same order as config->sites */
    size_t nsites;
    SSL_CTX *upstream_tls;
    int http_port, https_port;
    /* Before a request names its site, a connection lives by the most generous of the
     * sites' header and keep-alive timeouts. */
    uint64_t header_timeout_ms, keepalive_timeout_ms;
    uint64_t generation;
} moat_runtime_t;

/* Build a snapshot from a parsed config (takes ownership of cfg). Resolves upstream host
 * names with getaddrinfo: it may block, so only the control thread calls it. On failure
 * returns NULL and writes a sentence into err. */
moat_runtime_t *moat_runtime_new(moat_config_t *cfg, int http_port, int https_port, char *err,
                                 size_t errlen);
/* Swap in a new current snapshot; the old one is freed when its last user releases it. */
void moat_runtime_publish(moat_runtime_t *rt);
moat_runtime_t *moat_runtime_acquire(void);
/* Drop the current snapshot (at exit). */
void moat_runtime_clear(void);
void moat_runtime_release(moat_runtime_t *rt);

/* The site that serves `host` (a Host header or :authority value, port included or not) on a
 * listener of this port and kind. NULL when none does. */
const moat_site_rt_t *moat_runtime_find_site(const moat_runtime_t *rt, moat_slice_t host, int port,
                                             int tls);
/* The HTTPS address, on any port, whose host is that of `host` (port ignored): where the
 * HTTP listener redirects a request for it. NULL when no TLS site has the name. */
const moat_site_addr_t *moat_runtime_find_tls_addr(const moat_runtime_t *rt, moat_slice_t host);
/* Effective port of a site address on this runtime's listeners. */
int moat_runtime_addr_port(const moat_runtime_t *rt, const moat_site_addr_t *a);

#endif
