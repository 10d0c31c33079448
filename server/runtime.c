/* The runtime snapshot (include/moat/runtime.h). */
#include "moat/runtime.h"
#include "moat/log.h"
#include "metrics.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <stdlib.h>
#include <sys/un.h>

#define SYSTEM_CA_BUNDLE "/etc/ssl/certs/ca-certificates.crt"

/* Publish order, for logs; only the control thread builds, but tests build from others. */
static atomic_uint_fast64_t generation;

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
    if (rt->base != NULL)
        moat_runtime_unref(rt->base);
    else
        moat_config_free(rt->config);
    free(rt);
}

moat_runtime_t *moat_runtime_ref(moat_runtime_t *rt)
{
    if (rt != NULL)
        atomic_fetch_add_explicit(&rt->refs, 1, memory_order_relaxed);
    return rt;
}

void moat_runtime_unref(moat_runtime_t *rt)
{
    if (rt != NULL && atomic_fetch_sub_explicit(&rt->refs, 1, memory_order_acq_rel) == 1)
        runtime_free(rt);
}

/* --- the asynchronous build ------------------------------------------------------------- */

/* One upstream being looked up. */
typedef struct {
    uv_getaddrinfo_t req;
    moat_runtime_build_t *b;
    const moat_upstream_addr_t *a;
    moat_upstream_t *u;
    int status; /* 0 or a libuv error */
    unsigned done : 1;
    unsigned path_too_long : 1;
} lookup_t;

struct moat_runtime_build {
    moat_runtime_t *rt;
    moat_runtime_built_cb cb;
    void *data;
    lookup_t *lookups; /* one per upstream, in file order */
    size_t nlookups, pending;
    uv_work_t nothing; /* completes a build that has no host name to look up */
    int cancelled;
};

/* The resolver's reason as getaddrinfo itself words it ("Name or service not known"): the
 * same sentence moat printed when it still called getaddrinfo directly. */
static const char *lookup_reason(int status)
{
    static const struct {
        int uv, eai;
    } map[] = {
        {UV_EAI_NONAME, EAI_NONAME}, {UV_EAI_AGAIN, EAI_AGAIN},
        {UV_EAI_FAIL, EAI_FAIL},     {UV_EAI_NODATA, EAI_NODATA},
        {UV_EAI_FAMILY, EAI_FAMILY}, {UV_EAI_SERVICE, EAI_SERVICE},
        {UV_EAI_MEMORY, EAI_MEMORY}, {UV_EAI_ADDRFAMILY, EAI_ADDRFAMILY},
    };
    for (size_t i = 0; i < MOAT_ARRAY_LEN(map); i++)
        if (map[i].uv == status)
            return gai_strerror(map[i].eai);
    return uv_strerror(status);
}

static void unix_upstream(lookup_t *l)
{
    struct sockaddr_un *sun = (struct sockaddr_un *)&l->u->addr;
    if (strlen(l->a->path) >= sizeof sun->sun_path) {
        l->path_too_long = 1;
        return;
    }
    sun->sun_family = AF_UNIX;
    strcpy(sun->sun_path, l->a->path);
    l->u->addrlen = sizeof *sun;
    snprintf(l->u->label, sizeof l->u->label, "unix:%s", l->a->path);
}

static void tcp_upstream(lookup_t *l, const struct addrinfo *res)
{
    const moat_upstream_addr_t *a = l->a;
    moat_upstream_t *u = l->u;
    memcpy(&u->addr, res->ai_addr, res->ai_addrlen);
    u->addrlen = res->ai_addrlen;
    int v6 = strchr(a->host, ':') != NULL;
    snprintf(u->label, sizeof u->label, "%s%s%s:%d", v6 ? "[" : "", a->host, v6 ? "]" : "",
             a->port);
    unsigned char bin[sizeof(struct in6_addr)];
    u->named = inet_pton(AF_INET, a->host, bin) != 1 && inet_pton(AF_INET6, a->host, bin) != 1;
    if (a->kind == MOAT_UPSTREAM_TLS) {
        u->tls = 1;
        u->tls_name = moat_xstrdup(a->host);
    }
}

/* Counter slots for the sites (named by their first address) and upstreams (by label); the
 * control thread builds runtimes, and the slots travel to the workers with the runtime. */
static void assign_slots(moat_runtime_t *rt)
{
    for (size_t i = 0; i < rt->nsites; i++) {
        moat_site_rt_t *s = &rt->sites[i];
        char name[300];
        moat_runtime_site_name(s->site, name, sizeof name);
        s->mslot = moat_metrics_site_slot(name);
        for (size_t j = 0; j < s->nupstreams; j++)
            s->upstreams[j].mslot = moat_metrics_upstream_slot(s->upstreams[j].label);
    }
}

const char *moat_runtime_site_name(const moat_site_t *s, char *buf, size_t n)
{
    const moat_site_addr_t *a = &s->addrs[0];
    int v6 = a->kind == MOAT_HOST_IPV6;
    if (a->port)
        snprintf(buf, n, "%s%s%s:%d", v6 ? "[" : "", a->host, v6 ? "]" : "", a->port);
    else
        snprintf(buf, n, "%s%s%s", v6 ? "[" : "", a->host, v6 ? "]" : "");
    return buf;
}

static void build_finish(moat_runtime_build_t *b)
{
    moat_runtime_t *rt = b->rt;
    char err[512] = "";
    if (b->cancelled)
        snprintf(err, sizeof err, "cancelled");
    for (size_t i = 0; err[0] == '\0' && i < b->nlookups; i++) {
        const lookup_t *l = &b->lookups[i];
        if (l->path_too_long)
            snprintf(err, sizeof err, "unix socket path too long: %s", l->a->path);
        else if (l->status != 0)
            snprintf(err, sizeof err, "cannot resolve upstream host '%s': %s", l->a->host,
                     lookup_reason(l->status));
    }
    int need_tls = 0;
    for (size_t i = 0; i < b->nlookups; i++)
        need_tls |= b->lookups[i].u->tls;
    moat_runtime_built_cb cb = b->cb;
    void *data = b->data;
    free(b->lookups);
    free(b);
    if (err[0] != '\0') {
        runtime_free(rt);
        cb(NULL, err, data);
        return;
    }
    if (need_tls) {
        rt->upstream_tls = SSL_CTX_new(TLS_method());
        SSL_CTX_set_min_proto_version(rt->upstream_tls, TLS1_2_VERSION);
        if (SSL_CTX_load_verify_locations(rt->upstream_tls, SYSTEM_CA_BUNDLE, NULL) != 1)
            MOAT_WARN("cannot load %s: https:// upstreams will fail verification "
                      "(install ca-certificates)",
                      SYSTEM_CA_BUNDLE);
    }
    assign_slots(rt);
    rt->generation = atomic_fetch_add(&generation, 1) + 1;
    cb(rt, NULL, data);
}

static void on_lookup(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    lookup_t *l = MOAT_CONTAINER_OF(req, lookup_t, req);
    moat_runtime_build_t *b = l->b;
    l->done = 1;
    if (status == 0 && res == NULL)
        status = UV_EAI_NODATA;
    l->status = status;
    if (status == 0)
        tcp_upstream(l, res);
    uv_freeaddrinfo(res);
    if (--b->pending == 0)
        build_finish(b);
}

static void nothing_work(uv_work_t *w)
{
    (void)w;
}

static void nothing_done(uv_work_t *w, int status)
{
    (void)status;
    build_finish(MOAT_CONTAINER_OF(w, moat_runtime_build_t, nothing));
}

moat_runtime_build_t *moat_runtime_build(uv_loop_t *loop, moat_config_t *cfg, int http_port,
                                         int https_port, moat_runtime_built_cb cb, void *data)
{
    moat_runtime_t *rt = moat_xcalloc(1, sizeof *rt);
    atomic_init(&rt->refs, 1);
    rt->config = cfg;
    rt->http_port = http_port;
    rt->https_port = https_port;
    rt->nsites = cfg->nsites;
    rt->sites = moat_xcalloc(cfg->nsites, sizeof *rt->sites);
    moat_runtime_build_t *b = moat_xcalloc(1, sizeof *b);
    b->rt = rt;
    b->cb = cb;
    b->data = data;
    for (size_t i = 0; i < cfg->nsites; i++)
        b->nlookups += cfg->sites[i].nupstreams;
    b->lookups = moat_xcalloc(b->nlookups ? b->nlookups : 1, sizeof *b->lookups);
    size_t k = 0;
    for (size_t i = 0; i < cfg->nsites; i++) {
        moat_site_rt_t *s = &rt->sites[i];
        s->site = &cfg->sites[i];
        rt->header_timeout_ms = MOAT_MAX(rt->header_timeout_ms, s->site->header_timeout_ms);
        rt->keepalive_timeout_ms =
            MOAT_MAX(rt->keepalive_timeout_ms, s->site->keepalive_timeout_ms);
        s->nupstreams = s->site->nupstreams;
        s->upstreams = moat_xcalloc(s->nupstreams, sizeof *s->upstreams);
        for (size_t j = 0; j < s->nupstreams; j++, k++)
            b->lookups[k] = (lookup_t){.b = b, .a = &s->site->upstreams[j], .u = &s->upstreams[j]};
    }
    /* Every lookup is started before any can complete (completions run on the loop, never
     * inside uv_getaddrinfo), so `pending` only reaches zero from a callback. */
    b->pending = 1;
    for (size_t i = 0; i < b->nlookups; i++) {
        lookup_t *l = &b->lookups[i];
        if (l->a->kind == MOAT_UPSTREAM_UNIX) {
            l->done = 1;
            unix_upstream(l);
            continue;
        }
        char port[16];
        snprintf(port, sizeof port, "%d", l->a->port);
        struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_family = AF_UNSPEC};
        int r = uv_getaddrinfo(loop, &l->req, on_lookup, l->a->host, port, &hints);
        if (r != 0) {
            l->done = 1;
            l->status = r;
        } else {
            b->pending++;
        }
    }
    if (--b->pending == 0 && uv_queue_work(loop, &b->nothing, nothing_work, nothing_done) != 0)
        abort(); /* only fails for a NULL callback */
    return b;
}

void moat_runtime_build_cancel(moat_runtime_build_t *b)
{
    b->cancelled = 1;
    for (size_t i = 0; i < b->nlookups; i++)
        if (!b->lookups[i].done)
            uv_cancel((uv_req_t *)&b->lookups[i].req);
}

moat_runtime_t *moat_runtime_readdress(moat_runtime_t *rt)
{
    moat_runtime_t *base = rt->base != NULL ? rt->base : rt;
    moat_runtime_t *n = moat_xcalloc(1, sizeof *n);
    *n = *rt;
    atomic_init(&n->refs, 1);
    n->base = moat_runtime_ref(base); /* one level: a copy of a copy shares the owner */
    n->sites = moat_xcalloc(rt->nsites ? rt->nsites : 1, sizeof *n->sites);
    for (size_t i = 0; i < rt->nsites; i++) {
        moat_site_rt_t *s = &n->sites[i];
        *s = rt->sites[i];
        s->upstreams = moat_xcalloc(s->nupstreams ? s->nupstreams : 1, sizeof *s->upstreams);
        for (size_t j = 0; j < s->nupstreams; j++) {
            s->upstreams[j] = rt->sites[i].upstreams[j];
            if (s->upstreams[j].tls_name != NULL)
                s->upstreams[j].tls_name = moat_xstrdup(s->upstreams[j].tls_name);
        }
    }
    if (n->upstream_tls != NULL)
        SSL_CTX_up_ref(n->upstream_tls);
    n->generation = atomic_fetch_add(&generation, 1) + 1;
    return n;
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

int moat_runtime_host_matches(moat_slice_t h, const char *pattern)
{
    if (pattern[0] != '*')
        return moat_slice_ieq(h, pattern);
    /* "*.example.com" covers exactly one more label, made of name characters only: the host
     * may end up in a redirect's Location, so nothing that could change the URL's meaning. */
    size_t plen = strlen(pattern + 1); /* ".example.com" */
    if (h.len <= plen || !moat_slice_ieq(moat_slice(h.base + h.len - plen, plen), pattern + 1))
        return 0;
    for (size_t i = 0; i < h.len - plen; i++) {
        char ch = h.base[i];
        if (!((ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
              ch == '-' || ch == '_'))
            return 0;
    }
    return 1;
}

/* Exact names first, then wildcards: a line for a.example.com wins over *.example.com. */
const moat_site_rt_t *moat_runtime_find_site(const moat_runtime_t *rt, moat_slice_t host, int port,
                                             int tls)
{
    if (rt == NULL)
        return NULL;
    moat_slice_t h = bare_host(host);
    for (int wild = 0; wild < 2; wild++)
        for (size_t i = 0; i < rt->nsites; i++) {
            const moat_site_t *s = rt->sites[i].site;
            for (size_t j = 0; j < s->naddrs; j++) {
                const moat_site_addr_t *a = &s->addrs[j];
                if (a->plain_http == tls || moat_runtime_addr_port(rt, a) != port ||
                    (a->host[0] == '*') != wild)
                    continue;
                if (moat_runtime_host_matches(h, a->host))
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
    for (int wild = 0; wild < 2; wild++)
        for (size_t i = 0; i < rt->nsites; i++) {
            const moat_site_t *s = rt->sites[i].site;
            for (size_t j = 0; j < s->naddrs; j++)
                if (!s->addrs[j].plain_http && (s->addrs[j].host[0] == '*') == wild &&
                    moat_runtime_host_matches(h, s->addrs[j].host))
                    return &s->addrs[j];
        }
    return NULL;
}
