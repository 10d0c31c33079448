/* Upstream names followed on the control thread (server/resolver.h). */
#include "resolver.h"
#include "moat/log.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <stdatomic.h>
#include <stdlib.h>

/* A lookup running longer than this is presumed lost: a DNS packet dropped (a container
 * network's DNS server reloads while containers come and go), and glibc waits 5 s per try,
 * tens of seconds in all. A kick then starts another lookup beside it; whichever was begun
 * last and has answered is what counts. */
#define STUCK_MS 700
/* At most this many lookups of one name at a time: a DNS server that stops answering for a
 * few seconds (aardvark-dns while podman recreates a container) loses every lookup begun
 * meanwhile, and each holds a thread-pool thread (server/main.c sizes the pool) for glibc's
 * timeouts. */
#define MAX_INFLIGHT 6

/* One named upstream of the runtime being followed, by position (site, upstream). */
typedef struct {
    size_t site, up;
    uint64_t due; /* loop time of its next periodic lookup; UINT64_MAX: none (or one runs) */
    struct sockaddr_storage addr;
    socklen_t addrlen;
    int status;
    uint64_t started;     /* loop time the newest lookup began */
    uint64_t seq;         /* lookups begun */
    uint64_t applied;     /* the newest lookup whose answer was taken */
    unsigned inflight;    /* lookups running */
    unsigned failing : 1; /* the last lookup failed (said once, until it works again) */
} name_t;

/* One uv_getaddrinfo in the thread pool; answers for a replaced names array (a reload) or
 * older than one already taken are dropped. */
typedef struct lookup {
    uv_getaddrinfo_t req;
    moat_resolver_t *r;
    struct lookup *next, *prev;
    size_t idx;
    uint64_t gen, seq;
} lookup_t;

struct moat_resolver {
    uv_loop_t *loop;
    moat_snapmgr_t *snap;
    uv_async_t kick;
    uv_timer_t timer;
    moat_runtime_t *rt; /* the runtime `names` describes (one reference) */
    name_t *names;
    size_t nnames, pending;
    uint64_t gen;               /* bumped when `names` is replaced */
    lookup_t *lookups;          /* running */
    uint64_t last_kicked_round; /* loop time a round asked for by a kick last began */
    uint64_t kick_not_before;   /* a kicked round that found a name's lookup running: when
                                   that one counts as stuck */
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
 * names at the same position with the same label. Lookups still running for the old names
 * are dropped when they answer. */
static void sync_runtime(moat_resolver_t *r)
{
    moat_runtime_t *cur = moat_snapmgr_current(r->snap)->rt;
    if (cur == r->rt)
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
    r->gen++;
    moat_runtime_unref(r->rt);
    r->rt = moat_runtime_ref(cur);
}

static void on_timer(uv_timer_t *t);

/* Arm the timer for the next thing to do: a kicked round (not sooner than the gap after the
 * last one) or the earliest periodic lookup. */
static void schedule(moat_resolver_t *r)
{
    if (r->closing)
        return;
    uint64_t now = uv_now(r->loop), at = UINT64_MAX;
    if (r->kicked)
        at = MOAT_MAX(
            now, MOAT_MAX(r->last_kicked_round + MOAT_RESOLVE_KICK_GAP_MS, r->kick_not_before));
    for (size_t i = 0; i < r->nnames; i++)
        at = MOAT_MIN(at, r->names[i].due);
    if (at == UINT64_MAX) {
        uv_timer_stop(&r->timer);
        return;
    }
    uv_timer_start(&r->timer, on_timer, at > now ? at - now : 0, 0);
}

/* An answer for nm was taken: say what changed, and publish a re-addressed runtime when its
 * address moved. */
static void apply(moat_resolver_t *r, name_t *nm)
{
    moat_runtime_t *rt = r->rt;
    uint64_t now = uv_now(r->loop);
    moat_runtime_t *cur = moat_snapmgr_current(r->snap)->rt;
    const moat_site_rt_t *s = &rt->sites[nm->site];
    const moat_upstream_t *u = &s->upstreams[nm->up];
    uint64_t every = s->site->resolve_interval_ms;
    if (nm->inflight == 0)
        nm->due = every ? now + every : UINT64_MAX;
    char was[INET6_ADDRSTRLEN], now_ip[INET6_ADDRSTRLEN];
    format_ip(&u->addr, was, sizeof was);
    if (nm->status != 0) {
        /* The last good answer stays: a DNS hiccup must not take a working app away. */
        if (!nm->failing)
            MOAT_WARN("upstream %s: cannot look the name up again (%s); still using %s", u->label,
                      uv_strerror(nm->status), was);
        nm->failing = 1;
        return;
    }
    if (nm->failing)
        MOAT_INFO("upstream %s: the name resolves again", u->label);
    nm->failing = 0;
    if (cur != rt || same_addr(&nm->addr, nm->addrlen, &u->addr, u->addrlen))
        return;
    moat_runtime_t *next = moat_runtime_readdress(rt);
    moat_upstream_t *nu = &next->sites[nm->site].upstreams[nm->up];
    memcpy(&nu->addr, &nm->addr, nm->addrlen);
    nu->addrlen = nm->addrlen;
    format_ip(&nm->addr, now_ip, sizeof now_ip);
    MOAT_INFO("upstream %s now resolves to %s (was %s)", u->label, now_ip, was);
    if (moat_snapmgr_readdress(r->snap, next) == 0) {
        /* Same config, same positions: the names carry over as they are. */
        moat_runtime_unref(r->rt);
        r->rt = moat_runtime_ref(next);
    }
}

static void on_lookup(uv_getaddrinfo_t *req, int status, struct addrinfo *res)
{
    lookup_t *lk = MOAT_CONTAINER_OF(req, lookup_t, req);
    moat_resolver_t *r = lk->r;
    if (lk->prev != NULL)
        lk->prev->next = lk->next;
    else
        r->lookups = lk->next;
    if (lk->next != NULL)
        lk->next->prev = lk->prev;
    r->pending--;
    if (!r->closing && lk->gen == r->gen) {
        name_t *nm = &r->names[lk->idx];
        nm->inflight--;
        if (lk->seq > nm->applied) {
            /* The newest answer yet; one begun earlier that answers later is not taken. */
            nm->applied = lk->seq;
            nm->status = status == 0 && res == NULL ? UV_EAI_NODATA : status;
            if (nm->status == 0 && res->ai_addrlen <= sizeof nm->addr) {
                /* The first answer, as a reload takes it. */
                memset(&nm->addr, 0, sizeof nm->addr);
                memcpy(&nm->addr, res->ai_addr, res->ai_addrlen);
                nm->addrlen = res->ai_addrlen;
            } else if (nm->status == 0) {
                nm->status = UV_EAI_FAMILY;
            }
            apply(r, nm);
        } else if (nm->inflight == 0 && nm->due == UINT64_MAX) {
            uint64_t every = r->rt->sites[nm->site].site->resolve_interval_ms;
            nm->due = every ? uv_now(r->loop) + every : UINT64_MAX;
        }
    }
    uv_freeaddrinfo(res);
    free(lk);
    if (!r->closing) {
        sync_runtime(r); /* a reload that ended meanwhile: its names from now on */
        schedule(r);
    }
}

/* Look up every name (a failed connect asked), or only those due. A name whose lookup runs
 * is looked up again only when asked and that one is stuck (STUCK_MS). */
static void start_round(moat_resolver_t *r, int all)
{
    uint64_t now = uv_now(r->loop);
    uint64_t stuck_at = UINT64_MAX;
    for (size_t i = 0; i < r->nnames; i++) {
        name_t *nm = &r->names[i];
        if (!all && nm->due > now)
            continue;
        if (nm->inflight > 0) {
            if (!all || nm->inflight >= MAX_INFLIGHT)
                continue;
            if (now < nm->started + STUCK_MS) {
                stuck_at = MOAT_MIN(stuck_at, nm->started + STUCK_MS);
                continue;
            }
        }
        const moat_upstream_addr_t *a = &r->rt->sites[nm->site].site->upstreams[nm->up];
        char port[16];
        snprintf(port, sizeof port, "%d", a->port);
        struct addrinfo hints = {.ai_socktype = SOCK_STREAM, .ai_family = AF_UNSPEC};
        lookup_t *lk = moat_xcalloc(1, sizeof *lk);
        lk->r = r;
        lk->idx = i;
        lk->gen = r->gen;
        lk->seq = nm->seq + 1;
        if (uv_getaddrinfo(r->loop, &lk->req, on_lookup, a->host, port, &hints) != 0) {
            free(lk);
            if (nm->inflight == 0)
                nm->due = now + 1000; /* the thread pool refused the job: try again soon */
            continue;
        }
        lk->next = r->lookups;
        if (r->lookups != NULL)
            r->lookups->prev = lk;
        r->lookups = lk;
        nm->seq = lk->seq;
        nm->started = now;
        nm->inflight++;
        nm->due = UINT64_MAX; /* its answer sets the next one */
        r->pending++;
    }
    if (all) {
        /* Asked while a lookup ran: ask again once it counts as stuck. */
        r->kicked = stuck_at != UINT64_MAX;
        r->kick_not_before = stuck_at != UINT64_MAX ? stuck_at : 0;
        r->last_kicked_round = now;
    }
    schedule(r);
}

static void on_timer(uv_timer_t *t)
{
    moat_resolver_t *r = t->data;
    sync_runtime(r);
    uint64_t now = uv_now(r->loop);
    start_round(r, r->kicked && now >= r->last_kicked_round + MOAT_RESOLVE_KICK_GAP_MS &&
                       now >= r->kick_not_before);
}

static void on_kick(uv_async_t *a)
{
    moat_resolver_t *r = a->data;
    if (!r->kicked)
        r->kick_not_before = 0;
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
    for (lookup_t *lk = r->lookups; lk != NULL; lk = lk->next)
        uv_cancel((uv_req_t *)&lk->req);
    uv_close((uv_handle_t *)&r->kick, handle_closed);
    uv_close((uv_handle_t *)&r->timer, handle_closed);
    /* A lookup already running in the thread pool cannot be interrupted: wait for it. */
    while (r->handles > 0 || r->pending > 0)
        uv_run(r->loop, UV_RUN_ONCE);
    moat_runtime_unref(r->rt);
    free(r->names);
    free(r);
}
