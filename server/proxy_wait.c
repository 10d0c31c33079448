/* Waiting for the app (upstream_wait=): when every upstream of the site refuses the
 * connection (refused, unreachable, connect timeout), nothing of the request has reached the
 * app, so any request may wait and be sent whole later. It joins the worker's waiting list;
 * one timer per worker dials again for each with a backoff of 100 ms doubling to 1 s, and at
 * once when a new runtime arrives (the app's name now points elsewhere: server/resolver.c).
 * A request's first dial to a named upstream is on that list too while it dials (not due):
 * a recreated container's old address gets no ARP answer, so that dial would hang for
 * connect_timeout; when the name moves it is dropped and dialled again at the new address.
 * While a request waits its body stays with the client (paused). What had been written to
 * the refused connection (it sends nothing before its connect completes) and what arrives
 * anyway (HTTP/2 DATA inside the stream window) is kept in `pending`, bounded by flow control
 * and the high-water mark, and goes first on the next connection. So a healthy upstream
 * costs nothing extra: the body goes to the socket as it always did.
 * After upstream_wait the answer is 502 with Retry-After (a page that retries by itself for a
 * browser page load); beyond MOAT_PROXY_MAX_WAITING waiting requests per site on a worker,
 * 503 at once. */
#include "proxy_internal.h"
#include "moat/log.h"

#include <stdint.h>

/* Per site and per worker: more waiting requests get 503 at once. */
#define MOAT_PROXY_MAX_WAITING 1000
/* Dialling again backs off from WAIT_FIRST_MS, doubling up to this. */
#define WAIT_MAX_MS 1000
/* What a client that got 502/503 for an app that is away is told to wait (seconds). */
#define RETRY_AFTER "5"

/* The app stayed away for upstream_wait (502), or too many wait already (503): nothing
 * reached it, so the client is told when to ask again. A browser loading a page gets one
 * that asks again by itself. */
static void unavailable(moat_exchange_t *x, int status, const char *why)
{
    char w[320];
    MOAT_DEBUG("upstream %s: %s; answering %d", moat__proxy_who(x, w, sizeof w), why, status);
    x->resp_head_done = 1;
    x->resp_done = 1;
    x->up_keep_alive = 0;
    moat_header_t h[MOAT_HTTP_PAGE_NHEADERS + 1];
    memcpy(h, moat_http_page_headers, sizeof moat_http_page_headers);
    h[MOAT_HTTP_PAGE_NHEADERS] =
        (moat_header_t){MOAT_SLICE_LIT("retry-after"), MOAT_SLICE_LIT(RETRY_AFTER)};
    const char *body = status == 503 ? moat_http_busy_page()
                       : x->html     ? moat_http_retry_page()
                                     : moat_http_error_page(status);
    moat__proxy_send_page(x, status, body, h, MOAT_ARRAY_LEN(h));
    moat__proxy_complete(x, 0);
}

static void on_wait_timer(uv_timer_t *t);

static void arm_wait_timer(moat_worker_t *w)
{
    uint64_t next = UINT64_MAX, now = uv_now(&w->loop);
    for (moat_exchange_t *x = w->waiting; x != NULL; x = x->wnext)
        next = MOAT_MIN(next, x->retry_at);
    if (next == UINT64_MAX)
        uv_timer_stop(&w->wait_timer);
    else
        uv_timer_start(&w->wait_timer, on_wait_timer, next > now ? next - now : 0, 0);
}

/* On the worker's waiting list, if not yet. */
static void list_add(moat_exchange_t *x)
{
    moat_worker_t *w = x->w;
    if (x->waiting)
        return;
    x->wprev = NULL;
    x->wnext = w->waiting;
    if (w->waiting != NULL)
        w->waiting->wprev = x;
    w->waiting = x;
    x->waiting = 1;
}

/* On the list, and the timer armed for x->retry_at. */
static void wait_link(moat_exchange_t *x)
{
    moat_worker_t *w = x->w;
    list_add(x);
    uint64_t now = uv_now(&w->loop);
    uint64_t in = x->retry_at > now ? x->retry_at - now : 0;
    if (!uv_is_active((uv_handle_t *)&w->wait_timer) || uv_timer_get_due_in(&w->wait_timer) > in)
        uv_timer_start(&w->wait_timer, on_wait_timer, in, 0);
}

void moat__proxy_dial_link(moat_exchange_t *x)
{
    if (x->waiting)
        return;
    x->retry_at = UINT64_MAX; /* not due: only a moved name or its own failure dials again */
    list_add(x);
}

void moat__proxy_wait_unlink(moat_exchange_t *x)
{
    if (!x->waiting)
        return;
    if (x->wprev != NULL)
        x->wprev->wnext = x->wnext;
    else
        x->w->waiting = x->wnext;
    if (x->wnext != NULL)
        x->wnext->wprev = x->wprev;
    x->wnext = x->wprev = NULL;
    x->waiting = 0;
}

/* Requests of this site waiting on this worker (dialling again included). Only counted when
 * one more would wait, and bounded by the limit: the list is empty while the app is up. */
static size_t count_waiting(const moat_exchange_t *x)
{
    size_t n = 0;
    for (const moat_exchange_t *y = x->w->waiting; y != NULL; y = y->wnext)
        n += y->site->site == x->site->site && !y->deferred && y->waited;
    return n;
}

/* Every upstream refused this request: wait and dial again, or answer. Inside
 * moat_proxy_start nothing may complete, so an answer found there is given by the timer. */
void moat__proxy_wait_or_fail(moat_exchange_t *x, const char *why)
{
    uint64_t now = uv_now(&x->w->loop);
    uint64_t wait = x->site->site->upstream_wait_ms;
    int status = 0;
    if (!x->waited) {
        x->waited = 1;
        x->wait_until = x->t_start + wait;
        x->backoff_ms = WAIT_FIRST_MS;
        if (wait > 0 && count_waiting(x) >= MOAT_PROXY_MAX_WAITING)
            status = 503;
    } else {
        x->backoff_ms = MOAT_MIN(x->backoff_ms * 2, WAIT_MAX_MS);
    }
    if (status == 0 && now >= x->wait_until)
        status = 502;
    if (status != 0 && !x->starting) {
        unavailable(x, status, why);
        return;
    }
    x->deferred = status;
    x->retry_at = status ? now : MOAT_MIN(now + x->backoff_ms, x->wait_until);
    wait_link(x);
    moat__proxy_pause_client(x); /* the body waits with the client */
}

/* A newer runtime of the same config (the resolver moved a name) is what the next dial must
 * use; one from a reload is not taken up (its sites may differ), the request finishes on the
 * one it started with. */
static void take_current_runtime(moat_exchange_t *x)
{
    moat_runtime_t *cur = x->w->rts->rt;
    if (cur == x->rt || cur->config != x->rt->config)
        return;
    size_t i = (size_t)(x->site - x->rt->sites);
    moat_runtime_t *held = moat_worker_runtime_acquire(x->w);
    if (x->rt_held != NULL)
        moat_worker_runtime_release(x->w, x->rt_held);
    x->rt_held = held;
    x->rt = held;
    x->site = &held->sites[i];
    x->upstream = NULL;
}

static void retry(moat_exchange_t *x)
{
    if (x->deferred) {
        unavailable(x, x->deferred, "every upstream refused the connection");
        return;
    }
    take_current_runtime(x);
    x->tries = 0;
    int r = moat__proxy_connect(x);
    if (r != 0)
        moat__proxy_wait_or_fail(x, moat_strerror(r));
}

static void on_wait_timer(uv_timer_t *t)
{
    moat_worker_t *w = MOAT_CONTAINER_OF(t, moat_worker_t, wait_timer);
    uint64_t now = uv_now(t->loop);
    /* The due ones are gathered first (each under a reference): a retry may end other
     * exchanges, which leave the waiting list. They stay on it while they dial: they still
     * count against the limit. */
    moat_exchange_t *due = NULL;
    for (moat_exchange_t *x = w->waiting; x != NULL; x = x->wnext) {
        if (x->retry_at > now)
            continue;
        x->retry_at = UINT64_MAX;
        moat__proxy_hold(x);
        x->dnext = due;
        due = x;
    }
    while (due != NULL) {
        moat_exchange_t *x = due;
        due = x->dnext;
        x->dnext = NULL;
        if (!x->over)
            retry(x);
        moat__proxy_leave(x);
    }
    arm_wait_timer(w);
}

void moat_proxy_waiting_init(moat_worker_t *w)
{
    w->waiting = NULL;
    uv_timer_init(&w->loop, &w->wait_timer);
}

void moat_proxy_waiting_wake(moat_worker_t *w)
{
    if (w->waiting == NULL)
        return;
    uint64_t now = uv_now(&w->loop);
    const moat_runtime_t *cur = w->rts->rt;
    for (moat_exchange_t *x = w->waiting; x != NULL; x = x->wnext) {
        /* A first dial is only dropped when a name moved (a runtime of the same config), not
         * on a reload, which it finishes on the runtime it started with. */
        if (!x->waited && (cur == x->rt || cur->config != x->rt->config))
            continue;
        /* One still dialling may be dialling the old address: a vanished container's address
         * can take seconds to fail (no ARP answer). Nothing was sent: drop that attempt. */
        if (x->up != NULL && !x->up->connected && moat__proxy_keep_unsent(x) == 0)
            moat__proxy_release_upstream(x, 0);
        if (x->up == NULL)
            x->retry_at = now;
    }
    uv_timer_start(&w->wait_timer, on_wait_timer, 0, 0);
}
