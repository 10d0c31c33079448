/* Upstream names followed on the control thread (server/resolver.h). */
#include "resolver.h"
#include "moat/log.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <stdatomic.h>
#include <stdlib.h>

/* One named upstream of the runtime being followed, by position (site, upstream). */
typedef struct {
    uv_getaddrinfo_t req;
    moat_resolver_t *r;
    size_t site, up;
    uint64_t due; /* loop time of its next periodic lookup; UINT64_MAX: none */
    struct sockaddr_storage addr;
    socklen_t addrlen;
    int status;
    unsigned busy : 1;    /* a lookup runs */
    unsigned looked : 1;  /* looked up in the current round */
    unsigned failing : 1; /* the last lookup failed (said once, until it works again) */
} name_t;

struct moat_resolver {
    uv_loop_t *loop;
    moat_snapmgr_t *snap;
    uv_async_t kick;
    uv_timer_t timer;
    moat_runtime_t *rt; /* the runtime `names` describes (one reference) */
    name_t *names;
    size_t nnames, pending;
    uint64_t last_kicked_round; /* loop time a round asked for by a kick last began */
    int handles;                /* open handles; freed when 0 and no lookup pending */
    unsigned kicked : 1;        /* a kick arrived since the last kicked round began */
    unsigned closing : 1;
};

static _Atomic(uv_async_t *) kick_handle;

void moat_resolver_kick(void)
{
    uv_async_t *a = atomic_load_explicit(&kick_handle, memory_order_acquire);
    if (a != NULL)
        uv_async_send(a);
}

static void format_ip(const struct sockaddr_storage *ss, char *buf, size_t n)
{
    const void *a = ss->ss_family == AF_INET6
                        ? (const void *)&((const struct sockaddr_in6 *)ss)->sin6_addr
                        : (const void *)&((const struct sockaddr_in *)ss)->sin_addr;
    if (inet_ntop(ss->ss_family, a, buf, (socklen_t)n) == NULL)
        snprintf(buf, n, "?");
}

/* Same address and port. */
static int same_addr(const struct sockaddr_storage *a, socklen_t alen,
                     const struct sockaddr_storage *b, socklen_t blen)
{
    return alen == blen && memcmp(a, b, alen) == 0;
}

/* Follow the names of the current runtime (a reload replaced it), keeping what is known of
 * names at the same position with the same label. Only between rounds. */
static void sync_runtime(moat_resolver_t *r)
{
    moat_runtime_t *cur = moat_snapmgr_current(r->snap)->rt;
    if (cur == r->rt || r->pending > 0)
        return;
    uint64_t now = uv_now(r->loop);
    size_t n = 0;
    for (size_t i = 0; i < cur->nsites; i++)
        for (size_t j = 0; j < cur->sites[i].nupstreams; j++)
            n += cur->sites[i].upstreams[j].named;
    name_t *names = moat_xcalloc(n ? n : 1, sizeof *names);
    size_t k = 0;
    for (size_t i = 0; i < cur->nsites; i++) {
        const moat_site_rt_t *s = &cur->sites[i];
        uint64_t every = s->site->resolve_interval_ms;
        for (size_t j = 0; j < s->nupstreams; j++) {
            if (!s->upstreams[j].named)
                continue;
            name_t *nm = &names[k++];
            nm->r = r;
            nm->site = i;
            nm->up = j;
            nm->due = every ? now + every : UINT64_MAX;
            /* A derived runtime keeps its config: a name keeps its "failing" state. */
            for (size_t o = 0; r->rt != NULL && r->rt->config == cur->config && o < r->nnames; o++)
                if (r->names[o].site == i && r->names[o].up == j)
                    nm->failing = r->names[o].failing;
        }
    }
    free(r->names);
    r->names = names;
    r->nnames = n;
    moat_runtime_unref(r->rt);
    r->rt = moat_runtime_ref(cur);
}

static void on_timer(uv_timer_t *t);

/* Arm the timer for the next thing to do: a kicked round (not sooner than the gap after the
 * last one) or the earliest periodic lookup. */
static void schedule(moat_resolver_t *r)
{
    if (r->closing || r->pending > 0)
        return; /* the round's end schedules */
    uint64_t now = uv_now(r->loop), at = UINT64_MAX;
    if (r->kicked)
        at = MOAT_MAX(now, r->last_kicked_round + MOAT_RESOLVE_KICK_GAP_MS);
    for (size_t i = 0; i < r->nnames; i++)
        at = MOAT_MIN(at, r->names[i].due);
    if (at == UINT64_MAX) {
        uv_timer_stop(&r->timer);
        return;
    }
    uv_timer_start(&r->timer, on_timer, at > now ? at - now : 0, 0);
}

static void finish_round(moat_resolver_t *r)
{
    moat_runtime_t *rt = r->rt;
    uint64_t now = uv_now(r->loop);
    moat_runtime_t *cur = moat_snapmgr_current(r->snap)->rt;
    moat_runtime_t *next = NULL;
    for (size_t i = 0; i < r->nnames; i++) {
        name_t *nm = &r->names[i];
        if (!nm->looked)
            continue;
        nm->looked = 0;
        const moat_site_rt_t *s = &rt->sites[nm->site];
        const moat_upstream_t *u = &s->upstreams[nm->up];
        uint64_t every = s->site->resolve_interval_ms;
        nm->due = every ? now + every : UINT64_MAX;
        char was[INET6_ADDRSTRLEN], now_ip[INET6_ADDRSTRLEN];
        format_ip(&u->addr, was, sizeof was);
        if (nm->status != 0) {
            /* The last good answer stays: a DNS hiccup must not take a working app away. */
            if (!nm->failing)
                MOAT_WARN("upstream %s: cannot look the name up again (%s); still using %s",
                          u->label, uv_strerror(nm->status), was);
            nm->failing = 1;
            continue;
        }
        if (nm->failing)
            MOAT_INFO("upstream %s: the name resolves again", u->label);
        nm->failing = 0;
        if (cur != rt || same_addr(&nm->addr, nm->addrlen, &u->addr, u->addrlen))
            continue;
        if (next == NULL)
            next = moat_runtime_readdress(rt);
        moat_upstream_t *nu = &next->sites[nm->site].upstreams[nm->up];
        memcpy(&nu->addr, &nm->addr, nm->addrlen);
        nu->addrlen = nm->addrlen;
        format_ip(&nm->addr, now_ip, sizeof now_ip);
        MOAT_INFO("upstream %s now resolves to %s (was %s)", u->label, now_ip, was);
    }
    if (next != NULL && moat_snapmgr_readdress(r->snap, next) == 0) {
        /* Same config, same positions: the names carry over as they are. */
        moat_runtime_unref(r->rt);
        r->rt = moat_runtime_ref(next);
    }
    sync_runtime(r); /* a reload that ended meanwhile: its names from now on */
    schedule(r);
}

static void on_lookup(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    name_t *nm = MOAT_CONTAINER_OF(req, name_t, req);
    moat_resolver_t *r = nm->r;
    nm->busy = 0;
    nm->status = status == 0 && res == NULL ? UV_EAI_NODATA : status;
    if (nm->status == 0 && res->ai_addrlen <= sizeof nm->addr) {
        /* The first answer, as a reload takes it. */
        memset(&nm->addr, 0, sizeof nm->addr);
        memcpy(&nm->addr, res->ai_addr, res->ai_addrlen);
        nm->addrlen = res->ai_addrlen;
    } else if (nm->status == 0) {
        nm->status = UV_EAI_FAMILY;
    }
    uv_freeaddrinfo(res);
    if (--r->pending == 0 && !r->closing)
        finish_round(r);
}

/* Look up every name (a failed connect asked), or only those due. */
static void start_round(moat_resolver_t *r, int all)
{
    uint64_t now = uv_now(r->loop);
    if (all) {
        r->kicked = 0;
        r->last_kicked_round = now;
    }
    for (size_t i = 0; i < r->nnames; i++) {
        name_t *nm = &r->names[i];
        if (nm->busy || (!all && nm->due > now))
            continue;
        const moat_upstream_addr_t *a = &r->rt->sites[nm->site].site->upstreams[nm->up];
        char port[16];
        snprintf(port, sizeof port, "%d", a->port);
        struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_family = AF_UNSPEC};
        if (uv_getaddrinfo(r->loop, &nm->req, on_lookup, a->host, port, &hints) != 0) {
            nm->due = now + 1000; /* the thread pool refused the job: try again in a while */
            continue;
        }
        nm->busy = 1;
        nm->looked = 1;
        r->pending++;
    }
    if (r->pending == 0)
        schedule(r);
}

static void on_timer(uv_timer_t *t)
{
    moat_resolver_t *r = t->data;
    sync_runtime(r);
    uint64_t now = uv_now(r->loop);
    start_round(r, r->kicked && now >= r->last_kicked_round + MOAT_RESOLVE_KICK_GAP_MS);
}

static void on_kick(uv_async_t *a)
{
    moat_resolver_t *r = a->data;
    r->kicked = 1;
    schedule(r);
}

moat_resolver_t *moat_resolver_new(uv_loop_t *loop, moat_snapmgr_t *snap)
{
    moat_resolver_t *r = moat_xcalloc(1, sizeof *r);
    r->loop = loop;
    r->snap = snap;
    uv_async_init(loop, &r->kick, on_kick);
    uv_timer_init(loop, &r->timer);
    r->kick.data = r->timer.data = r;
    r->handles = 2;
    sync_runtime(r);
    schedule(r);
    atomic_store_explicit(&kick_handle, &r->kick, memory_order_release);
    return r;
}

void moat_resolver_update(moat_resolver_t *r)
{
    sync_runtime(r);
    schedule(r);
}

static void handle_closed(uv_handle_t *h)
{
    moat_resolver_t *r = h->data;
    r->handles--;
}

void moat_resolver_free(moat_resolver_t *r)
{
    if (r == NULL)
        return;
    atomic_store_explicit(&kick_handle, NULL, memory_order_release);
    r->closing = 1;
    for (size_t i = 0; i < r->nnames; i++)
        if (r->names[i].busy)
            uv_cancel((uv_req_t *)&r->names[i].req);
    uv_close((uv_handle_t *)&r->kick, handle_closed);
    uv_close((uv_handle_t *)&r->timer, handle_closed);
    /* A lookup already running in the thread pool cannot be interrupted: wait for it. */
    while (r->handles > 0 || r->pending > 0)
        uv_run(r->loop, UV_RUN_ONCE);
    moat_runtime_unref(r->rt);
    free(r->names);
    free(r);
}
