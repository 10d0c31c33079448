/* Upstream connections and the per-worker pool (server/upstream.h). */
#include "upstream.h"
#include "worker.h"

#include "moat/log.h"

#include <arpa/inet.h>
#include <stdlib.h>
#include <time.h>

uint64_t moat_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000 + (uint64_t)ts.tv_nsec / 1000000;
}

static void upconn_drop(moat_upconn_t *u)
{
    if (--u->refs == 0)
        free(u);
}

static void timer_closed(uv_handle_t *h)
{
    upconn_drop(h->data);
}

static void pool_unlink(moat_upconn_t *u)
{
    if (!u->in_pool)
        return;
    moat_worker_t *w = u->w;
    if (u->prev)
        u->prev->next = u->next;
    else
        w->pool = u->next;
    if (u->next)
        u->next->prev = u->prev;
    u->next = u->prev = NULL;
    u->in_pool = 0;
    if (w->metrics)
        moat_mc_dec(&w->metrics->ups[u->mslot].pooled);
}

static void upconn_close(moat_upconn_t *u)
{
    if (u->closing)
        return;
    u->closing = 1;
    u->owner = NULL;
    pool_unlink(u);
    if (u->w->metrics)
        moat_mc_dec(&u->w->metrics->ups[u->mslot].open);
    uv_close((uv_handle_t *)&u->timer, timer_closed);
    moat_sock_close(&u->sock);
}

/* ---- socket events: to the owner, or handled here while idle ---- */

static void on_connect(moat_sock_t *s, int err)
{
    moat_upconn_t *u = s->data;
    if (err == 0)
        u->connected = 1;
    if (u->owner == NULL)
        upconn_close(u);
    else
        u->cb->on_connect(u->owner, err);
}

static void on_read(moat_sock_t *s)
{
    moat_upconn_t *u = s->data;
    if (u->owner == NULL)
        upconn_close(u); /* an idle pooled connection must not speak: drop it */
    else
        u->cb->on_read(u->owner);
}

static void on_eof(moat_sock_t *s, int err)
{
    moat_upconn_t *u = s->data;
    if (u->owner == NULL)
        upconn_close(u); /* the app closed an idle keep-alive connection */
    else
        u->cb->on_eof(u->owner, err);
}

static void on_drain(moat_sock_t *s)
{
    moat_upconn_t *u = s->data;
    if (u->owner != NULL)
        u->cb->on_drain(u->owner);
}

static void on_sock_close(moat_sock_t *s)
{
    upconn_drop(s->data);
}

static const moat_sock_cb_t sock_cb = {
    .on_read = on_read,
    .on_eof = on_eof,
    .on_drain = on_drain,
    .on_connect = on_connect,
    .on_close = on_sock_close,
};

/* One timer per upstream connection serves every timeout it has (connect, idle read,
 * websocket idle, pool expiry). Moving a timeout only moves u->deadline: the timer fires at
 * the earlier time it was set for and re-arms itself for what is left. So a busy connection
 * costs no timer work per read or per request. */
static void timer_fired(uv_timer_t *t)
{
    moat_upconn_t *u = t->data;
    uint64_t now = uv_now(t->loop);
    if (now < u->deadline) {
        if (u->deadline != UINT64_MAX)
            uv_timer_start(t, timer_fired, u->deadline - now, 0);
        return;
    }
    if (u->owner == NULL)
        upconn_close(u); /* idle in the pool for pool_idle */
    else
        u->cb->on_timeout(u->owner);
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
        uv_timer_start(t, timer_fired, ms, 0);
}

/* ---- the owner's calls ---- */

moat_upconn_t *moat_upconn_take(moat_worker_t *w, const moat_upstream_t *up,
                                const moat_upconn_cb_t *cb, void *owner)
{
    for (moat_upconn_t *u = w->pool; u != NULL; u = u->next) {
        if (strcmp(u->key, up->label) == 0 && !u->sock.eof &&
            (!up->named ||
             (u->addrlen == up->addrlen && memcmp(&u->addr, &up->addr, up->addrlen) == 0))) {
            pool_unlink(u);
            u->cb = cb;
            u->owner = owner;
            return u; /* its timer runs on; the owner sets the next deadline */
        }
    }
    return NULL;
}

int moat_upconn_dial(moat_worker_t *w, const moat_upstream_t *up, SSL_CTX *tls_ctx,
                     const moat_upconn_cb_t *cb, void *owner, moat_upconn_t **out,
                     int *connect_errno)
{
    *connect_errno = 0;
    SSL *ssl = NULL;
    if (up->tls) {
        ssl = tls_ctx ? SSL_new(tls_ctx) : NULL;
        if (ssl == NULL)
            return MOAT_ENOMEM;
        SSL_set_tlsext_host_name(ssl, up->tls_name);
        SSL_set1_host(ssl, up->tls_name);
        SSL_set_verify(ssl, SSL_VERIFY_PEER, NULL);
    }
    moat_upconn_t *u = moat_xcalloc(1, sizeof *u);
    /* moat_sock_connect frees ssl and leaves nothing open when it fails. */
    int r = moat_sock_connect(&u->sock, &w->loop, (const struct sockaddr *)&up->addr, up->addrlen,
                              ssl, &sock_cb, u);
    if (r != 0) {
        *connect_errno = u->sock.connect_errno;
        free(u);
        return r;
    }
    u->w = w;
    u->cb = cb;
    u->owner = owner;
    snprintf(u->key, sizeof u->key, "%s", up->label);
    u->mslot = up->mslot;
    if (w->metrics)
        moat_mc_inc(&w->metrics->ups[u->mslot].open);
    memcpy(&u->addr, &up->addr, up->addrlen);
    u->addrlen = up->addrlen;
    uv_timer_init(&w->loop, &u->timer);
    u->timer.data = u;
    u->deadline = UINT64_MAX;
    u->refs = 2; /* the timer and the socket's poll handle */
    *out = u;
    return 0;
}

void moat_upconn_release(moat_upconn_t *u, int reusable, uint64_t idle_ms)
{
    moat_worker_t *w = u->w;
    u->owner = NULL;
    if (!reusable || idle_ms == 0 || w->draining || moat_sock_input(&u->sock).len > 0 ||
        u->sock.eof) {
        upconn_close(u);
        return;
    }
    u->next = w->pool;
    u->prev = NULL;
    if (w->pool)
        w->pool->prev = u;
    w->pool = u;
    u->in_pool = 1;
    if (w->metrics)
        moat_mc_inc(&w->metrics->ups[u->mslot].pooled);
    moat_upconn_set_timeout(u, idle_ms);
    moat_sock_read_start(&u->sock); /* to notice the app closing it */
}

moat_slice_t moat_upconn_unsent(const moat_upconn_t *u)
{
    if (u->connected)
        return (moat_slice_t){0};
    return moat_slice(moat_buf_data(&u->sock.out), moat_buf_size(&u->sock.out));
}

const char *moat_upstream_describe(const moat_upstream_t *up, char *buf, size_t n)
{
    char ip[INET6_ADDRSTRLEN] = "?", at[INET6_ADDRSTRLEN + 16];
    if (up->addr.ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)&up->addr;
        inet_ntop(AF_INET, &sin->sin_addr, ip, sizeof ip);
        snprintf(at, sizeof at, "%s:%u", ip, ntohs(sin->sin_port));
    } else if (up->addr.ss_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)&up->addr;
        inet_ntop(AF_INET6, &sin6->sin6_addr, ip, sizeof ip);
        snprintf(at, sizeof at, "[%s]:%u", ip, ntohs(sin6->sin6_port));
    } else {
        at[0] = 0; /* unix: the label is the path dialled */
    }
    /* An address upstream's label already is the address: say it once. */
    if (at[0] == 0 || strcmp(at, up->label) == 0)
        snprintf(buf, n, "%s", up->label);
    else
        snprintf(buf, n, "%s (dialled %s)", up->label, at);
    return buf;
}

void moat_pool_close_all(moat_worker_t *w)
{
    while (w->pool != NULL)
        upconn_close(w->pool);
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

void moat_upstream_states_free(moat_worker_t *w)
{
    for (moat_upstream_state_t *st = w->ups, *next; st != NULL; st = next) {
        next = st->next;
        free(st);
    }
    w->ups = NULL;
}
