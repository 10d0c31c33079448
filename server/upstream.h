/* Upstream connections and the per-worker pool (server/upstream.c). upstream.c owns an
 * upstream connection's whole life: it dials (TCP, unix or TLS), keeps idle ones in the
 * worker's pool, runs the one timer each has, and closes and frees them. While one is
 * attached to an owner (a proxy exchange), its socket events and its timeout go to the
 * owner through the callbacks it was attached with; while idle in the pool, upstream.c
 * handles them itself. */
#ifndef MOAT_UPSTREAM_H
#define MOAT_UPSTREAM_H

#include "moat/runtime.h"
#include "moat/sock.h"

#include <uv.h>

typedef struct moat_worker moat_worker_t;
typedef struct moat_upconn moat_upconn_t;

typedef struct {
    void (*on_connect)(void *owner, int err); /* connected (and TLS done), or failed */
    void (*on_read)(void *owner);             /* bytes in moat_sock_input(&u->sock) */
    void (*on_eof)(void *owner, int err);
    void (*on_drain)(void *owner);
    void (*on_timeout)(void *owner); /* the timeout set with moat_upconn_set_timeout passed */
} moat_upconn_cb_t;

struct moat_upconn {
    moat_sock_t sock; /* the owner reads and writes it; upstream.c closes it */
    uv_timer_t timer; /* connect and idle-read timeouts; pool expiry while idle */
    int refs;         /* open handles: freed when both have closed */
    moat_worker_t *w;
    const moat_upconn_cb_t *cb;
    void *owner;    /* NULL while idle in the pool */
    char key[128];  /* the upstream's label */
    unsigned mslot; /* the upstream's counters (server/metrics.h) */
    /* The address dialled: a pooled connection serves a named upstream only while the name
     * still points there. */
    struct sockaddr_storage addr;
    socklen_t addrlen;
    uint64_t deadline; /* loop time the current timeout expires (the timer may fire early) */
    moat_upconn_t *next, *prev; /* pool list */
    unsigned connected : 1;
    unsigned in_pool : 1;
    unsigned closing : 1;
};

/* Passive health and load of one upstream on this worker. */
typedef struct moat_upstream_state {
    struct moat_upstream_state *next; /* nodes never move: exchanges keep pointers */
    char label[128];
    uint64_t down_until_ms; /* passive health: skip until then */
    unsigned active;        /* requests in flight, for least_conn */
} moat_upstream_state_t;

/* An idle pooled connection to this upstream (at its current address), attached to owner;
 * NULL when none. */
moat_upconn_t *moat_upconn_take(moat_worker_t *w, const moat_upstream_t *up,
                                const moat_upconn_cb_t *cb, void *owner);
/* Dial a new connection (TLS with verification for https:// upstreams, using tls_ctx);
 * on_connect reports the result, never from inside this call. 0 or a negative code (nothing
 * is left open then; *connect_errno says why when known, else 0). */
int moat_upconn_dial(moat_worker_t *w, const moat_upstream_t *up, SSL_CTX *tls_ctx,
                     const moat_upconn_cb_t *cb, void *owner, moat_upconn_t **out,
                     int *connect_errno);
/* The owner is done with u: back into the pool for idle_ms when reusable (a whole response
 * read, nothing unread, not closed), closed otherwise. No callback reaches the owner after. */
void moat_upconn_release(moat_upconn_t *u, int reusable, uint64_t idle_ms);
/* What was written to a connection whose connect failed: all of it, since nothing leaves
 * before the connect completes (empty once connected). For the owner to keep a request that
 * never reached the app. */
moat_slice_t moat_upconn_unsent(const moat_upconn_t *u);
/* The connection's current timeout from now (0: none); only moves a deadline. */
void moat_upconn_set_timeout(moat_upconn_t *u, uint64_t ms);

void moat_pool_close_all(moat_worker_t *w);
/* "app:8080 (dialled 10.0.0.5:8080)" for a named upstream, the label alone for an address
 * or unix one (it is what is dialled). For error lines only: every one names the address. */
const char *moat_upstream_describe(const moat_upstream_t *up, char *buf, size_t n);
moat_upstream_state_t *moat_upstream_state(moat_worker_t *w, const char *label);
void moat_upstream_states_free(moat_worker_t *w);

#endif
