/* The per-worker pool of idle upstream connections, and per-upstream health state. */
#include "moat/log.h"
#include "worker.h"

#include <stdlib.h>
#include <time.h>

uint64_t moat_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void handle_closed(uv_handle_t *h)
{
    moat_upconn_t *u = h->data;
    if (--u->open_handles == 0)
        free(u);
}

moat_upconn_t *moat_upconn_new(moat_worker_t *w, const char *key)
{
    moat_upconn_t *u = moat_xcalloc(1, sizeof *u);
    u->w = w;
    snprintf(u->key, sizeof u->key, "%s", key);
    uv_timer_init(&w->loop, &u->timer);
    u->timer.data = u;
    u->open_handles = 2; /* the timer and the socket's poll handle */
    return u;
}

static void pool_unlink(moat_worker_t *w, moat_upconn_t *u)
{
    if (!u->in_pool)
        return;
    if (u->prev)
        u->prev->next = u->next;
    else
        w->pool = u->next;
    if (u->next)
        u->next->prev = u->prev;
    u->next = u->prev = NULL;
    u->in_pool = 0;
}

void moat_upconn_close(moat_upconn_t *u)
{
    if (u->closing)
        return;
    u->closing = 1;
    pool_unlink(u->w, u);
    int sock_open = u->open_handles == 2;
    uv_close((uv_handle_t *)&u->timer, handle_closed);
    if (sock_open)
        moat_sock_close(&u->sock);
}

moat_upconn_t *moat_pool_take(moat_worker_t *w, const char *key)
{
    for (moat_upconn_t *u = w->pool; u != NULL; u = u->next) {
        if (strcmp(u->key, key) == 0 && !u->sock.eof) {
            pool_unlink(w, u);
            return u; /* its timer runs on; the new deadline is set by the exchange */
        }
    }
    return NULL;
}

/* One timer per upstream connection serves every timeout it has (connect, idle read,
 * websocket idle, pool expiry). Moving a timeout only moves u->deadline: the timer fires at
 * the earlier time it was set for and re-arms itself for what is left. So a busy connection
 * costs no timer work per read or per request. */
static void upconn_timer_fired(uv_timer_t *t)
{
    moat_upconn_t *u = t->data;
    uint64_t now = uv_now(t->loop);
    if (now < u->deadline) {
        if (u->deadline != UINT64_MAX)
            uv_timer_start(t, upconn_timer_fired, u->deadline - now, 0);
        return;
    }
    if (u->x == NULL)
        moat_upconn_close(u); /* idle in the pool for pool_idle */
    else
        moat_proxy_timeout(u->x);
}

void moat_upconn_set_timeout(moat_upconn_t *u, uint64_t ms)
{
    uv_timer_t *t = &u->timer;
    if (ms == 0) {
        u->deadline = UINT64_MAX;
        return;
    }
    u->deadline = uv_now(t->loop) + ms;
    if (!uv_is_active((uv_handle_t *)t) || uv_timer_get_due_in(t) > ms)
        uv_timer_start(t, upconn_timer_fired, ms, 0);
}

void moat_pool_put(moat_worker_t *w, moat_upconn_t *u, uint64_t idle_ms)
{
    if (w->draining || idle_ms == 0) {
        moat_upconn_close(u);
        return;
    }
    u->next = w->pool;
    u->prev = NULL;
    if (w->pool)
        w->pool->prev = u;
    w->pool = u;
    u->in_pool = 1;
    u->idle_since = moat_now_ms();
    moat_upconn_set_timeout(u, idle_ms);
    moat_sock_read_start(&u->sock); /* to notice the app closing it */
}

void moat_pool_close_all(moat_worker_t *w)
{
    while (w->pool != NULL)
        moat_upconn_close(w->pool);
}

moat_upstream_state_t *moat_upstream_state(moat_worker_t *w, const char *label)
{
    for (moat_upstream_state_t *st = w->ups; st != NULL; st = st->next)
        if (strcmp(st->label, label) == 0)
            return st;
    moat_upstream_state_t *st = moat_xcalloc(1, sizeof *st);
    snprintf(st->label, sizeof st->label, "%s", label);
    st->next = w->ups;
    w->ups = st;
    return st;
}
