/* The runtime snapshot (include/moat/runtime.h). */
#include "moat/runtime.h"
#include "moat/log.h"

#include <netdb.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/un.h>

#define SYSTEM_CA_BUNDLE "/etc/ssl/certs/ca-certificates.crt"

static pthread_mutex_t publish_lock = PTHREAD_MUTEX_INITIALIZER;
static moat_runtime_t *current;
static uint64_t generation;

static void runtime_free(moat_runtime_t *rt)
{
    for (size_t i = 0; i < rt->nsites; i++) {
        for (size_t j = 0; j < rt->sites[i].nupstreams; j++)
            free(rt->sites[i].upstreams[j].tls_name);
        free(rt->sites[i].upstreams);
    }
    free(rt->sites);
    if (rt->upstream_tls)
        SSL_CTX_free(rt->upstream_tls);
    moat_config_free(rt->config);
    free(rt);
}

static int resolve(const moat_upstream_addr_t *a, moat_upstream_t *u, char *err, size_t errlen)
{
    if (a->kind == MOAT_UPSTREAM_UNIX) {
        struct sockaddr_un *sun = (struct sockaddr_un *)&u->addr;
        if (strlen(a->path) >= sizeof sun->sun_path) {
            snprintf(err, errlen, "unix socket path too long: %s", a->path);
            return MOAT_EINVAL;
        }
        sun->sun_family = AF_UNIX;
        strcpy(sun->sun_path, a->path);
        u->addrlen = sizeof *sun;
        snprintf(u->label, sizeof u->label, "unix:%s", a->path);
        return 0;
    }
    char port[16];
    snprintf(port, sizeof port, "%d", a->port);
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_family = AF_UNSPEC};
    struct addrinfo *res = NULL;
    int r = getaddrinfo(a->host, port, &hints, &res);
    if (r != 0 || res == NULL) {
        snprintf(err, errlen, "cannot resolve upstream host '%s': %s", a->host, gai_strerror(r));
        return MOAT_ENOT_FOUND;
    }
    memcpy(&u->addr, res->ai_addr, res->ai_addrlen);
    u->addrlen = res->ai_addrlen;
    freeaddrinfo(res);
    int v6 = strchr(a->host, ':') != NULL;
    snprintf(u->label, sizeof u->label, "%s%s%s:%d", v6 ? "[" : "", a->host, v6 ? "]" : "",
             a->port);
    if (a->kind == MOAT_UPSTREAM_TLS) {
        u->tls = 1;
        u->tls_name = moat_xstrdup(a->host);
    }
    return 0;
}

moat_runtime_t *moat_runtime_new(moat_config_t *cfg, int http_port, int https_port, char *err,
                                 size_t errlen)
{
    moat_runtime_t *rt = moat_xcalloc(1, sizeof *rt);
    rt->config = cfg;
    rt->http_port = http_port;
    rt->https_port = https_port;
    rt->nsites = cfg->nsites;
    rt->sites = moat_xcalloc(cfg->nsites, sizeof *rt->sites);
    int need_tls = 0;
    for (size_t i = 0; i < cfg->nsites; i++) {
        moat_site_rt_t *s = &rt->sites[i];
        s->site = &cfg->sites[i];
        rt->header_timeout_ms = MOAT_MAX(rt->header_timeout_ms, s->site->header_timeout_ms);
        rt->keepalive_timeout_ms =
            MOAT_MAX(rt->keepalive_timeout_ms, s->site->keepalive_timeout_ms);
        s->nupstreams = s->site->nupstreams;
        s->upstreams = moat_xcalloc(s->nupstreams, sizeof *s->upstreams);
        for (size_t j = 0; j < s->nupstreams; j++) {
            if (resolve(&s->site->upstreams[j], &s->upstreams[j], err, errlen) != 0) {
                runtime_free(rt);
                return NULL;
            }
            need_tls |= s->upstreams[j].tls;
        }
    }
    if (need_tls) {
        rt->upstream_tls = SSL_CTX_new(TLS_method());
        SSL_CTX_set_min_proto_version(rt->upstream_tls, TLS1_2_VERSION);
        if (SSL_CTX_load_verify_locations(rt->upstream_tls, SYSTEM_CA_BUNDLE, NULL) != 1)
            MOAT_WARN("cannot load %s: https:// upstreams will fail verification "
                      "(install ca-certificates)",
                      SYSTEM_CA_BUNDLE);
    }
    return rt;
}

void moat_runtime_publish(moat_runtime_t *rt)
{
    pthread_mutex_lock(&publish_lock);
    moat_runtime_t *old = current;
    rt->refs++;
    rt->generation = ++generation;
    current = rt;
    int free_old = old != NULL && --old->refs == 0;
    pthread_mutex_unlock(&publish_lock);
    if (free_old)
        runtime_free(old);
}

void moat_runtime_clear(void)
{
    pthread_mutex_lock(&publish_lock);
    moat_runtime_t *old = current;
    current = NULL;
    int free_old = old != NULL && --old->refs == 0;
    pthread_mutex_unlock(&publish_lock);
    if (free_old)
        runtime_free(old);
}

moat_runtime_t *moat_runtime_acquire(void)
{
    pthread_mutex_lock(&publish_lock);
    moat_runtime_t *rt = current;
    if (rt)
        rt->refs++;
    pthread_mutex_unlock(&publish_lock);
    return rt;
}

void moat_runtime_release(moat_runtime_t *rt)
{
    if (rt == NULL)
        return;
    pthread_mutex_lock(&publish_lock);
    int last = --rt->refs == 0;
    pthread_mutex_unlock(&publish_lock);
    if (last)
        runtime_free(rt);
}

int moat_runtime_addr_port(const moat_runtime_t *rt, const moat_site_addr_t *a)
{
    if (a->port)
        return a->port;
    return a->plain_http ? rt->http_port : rt->https_port;
}

/* Split "name:port", "[v6]:port", "name" into the bare host. */
static moat_slice_t bare_host(moat_slice_t h)
{
    if (h.len && h.base[0] == '[') {
        const char *e = memchr(h.base, ']', h.len);
        if (e == NULL)
            return (moat_slice_t){0};
        return moat_slice(h.base + 1, (size_t)(e - h.base) - 1);
    }
    const char *colon = memchr(h.base, ':', h.len);
    if (colon)
        h.len = (size_t)(colon - h.base);
    if (h.len && h.base[h.len - 1] == '.')
        h.len--; /* "example.com." is the same name */
    return h;
}

const moat_site_rt_t *moat_runtime_find_site(const moat_runtime_t *rt, moat_slice_t host, int port,
                                             int tls)
{
    if (rt == NULL)
        return NULL;
    moat_slice_t h = bare_host(host);
    for (size_t i = 0; i < rt->nsites; i++) {
        const moat_site_t *s = rt->sites[i].site;
        for (size_t j = 0; j < s->naddrs; j++) {
            const moat_site_addr_t *a = &s->addrs[j];
            if (a->plain_http == tls || moat_runtime_addr_port(rt, a) != port)
                continue;
            if (moat_slice_ieq(h, a->host))
                return &rt->sites[i];
        }
    }
    return NULL;
}

const moat_site_addr_t *moat_runtime_find_tls_addr(const moat_runtime_t *rt, moat_slice_t host)
{
    if (rt == NULL)
        return NULL;
    moat_slice_t h = bare_host(host);
    for (size_t i = 0; i < rt->nsites; i++) {
        const moat_site_t *s = rt->sites[i].site;
        for (size_t j = 0; j < s->naddrs; j++)
            if (!s->addrs[j].plain_http && moat_slice_ieq(h, s->addrs[j].host))
                return &s->addrs[j];
    }
    return NULL;
}
