/* Worker internals shared by the files of server/: the per-thread state, the worker's own
 * pointer to the current snapshot, the per-worker upstream pool and the list of client
 * connections (for a graceful stop). */
#ifndef MOAT_WORKER_H
#define MOAT_WORKER_H

#include "moat/common.h"
#include "moat/proxy.h"
#include "moat/runtime.h"
#include "metrics.h"
#include "server.h"
#include "upstream.h"
#include "moat/sock.h"
#include "snapshot.h"
#include <stdatomic.h>
#include <uv.h>

typedef struct moat_conn moat_conn_t;

/* Work put off to the end of the loop turn: an HTTP/2 connection whose streams got output
 * from several upstream events in one turn writes it once, in one TLS record where it fits,
 * instead of once per event. Embedded in its owner; run() is called once per deferral. */
typedef struct moat_deferred {
    struct moat_deferred *next, *prev;
    void (*run)(struct moat_deferred *d);
    int queued;
} moat_deferred_t;

/* A worker's hold on one runtime: one atomic reference on it, and a plain worker-local count
 * of its users (each request, plus one while it is the worker's current runtime). The worker
 * keeps one node per runtime, the current one first; an older one leaves when its last
 * request ends, and only then is its atomic reference dropped. */
typedef struct moat_worker_rt {
    struct moat_worker_rt *next;
    moat_runtime_t *rt;
    unsigned refs;
} moat_worker_rt_t;

struct moat_worker {
    uv_loop_t loop;
    uv_thread_t thread;
    uv_async_t wakeup; /* the control thread published a snapshot or asks for a stop */
    int id;
    const moat_server_opts_t *opts;
    uv_poll_t listeners[MOAT_MAX_LISTENERS];
    size_t nlisteners;
    int listener_port[MOAT_MAX_LISTENERS];
    int listener_tls[MOAT_MAX_LISTENERS];
    moat_conn_t *conns;  /* every client connection, for draining */
    moat_upconn_t *pool; /* idle upstream connections, newest first */
    moat_upstream_state_t *ups;
    unsigned rr; /* round-robin position */
    /* Requests waiting for an app that refused them (upstream_wait=), and the one timer that
     * dials again for all of them (server/proxy.c). */
    moat_exchange_t *waiting;
    uv_timer_t wait_timer;
    uv_timer_t grace_timer;
    uint64_t grace_deadline;
    int draining;
    atomic_int stop_requested;
    /* Snapshots. After the start, `pending` is the only field another thread touches: the
     * control thread exchanges a new snapshot into it and sends wakeup; the worker exchanges
     * it out in the wakeup callback, between events, and swaps it in. */
    _Atomic(moat_snapshot_t *) pending;
    moat_worker_rt_t *rts; /* the current runtime first, then older ones still in use */
    moat_certs_t *certs;   /* current; what this thread's handshakes read (one reference) */
    moat_tls_keys_t *keys; /* current session-ticket keys (one reference) */
    /* Deferred work, run after the turn's I/O callbacks (check) and, for what timers and close
     * callbacks defer, before the loop next sleeps (prepare). Both handles run only while
     * something is queued; an idle handle would keep the loop from ever sleeping. */
    int spare_fd;                /* given up to refuse a connection when out of descriptors */
    uint64_t refused;            /* connections refused since the last warning */
    uint64_t refused_logged_at;  /* loop time of that warning, 0: never */
    uint64_t dial_short_said_at; /* of "cannot open a connection to upstream" (proxy.c) */
    moat_deferred_t deferred;    /* list head */
    uv_prepare_t defer_prepare;
    uv_check_t defer_check;
    uv_timer_t trim_timer; /* gives memory back once the worker has gone quiet */
    uint64_t trim_events;  /* moat_sock_thread_events() at the last tick */
    int trim_due;          /* quiet ticks that still trim since the last busy one */
    /* This worker's counters: written by this thread only, read by the control thread
     * (server/metrics.h). */
    moat_metrics_t *metrics;
};

/* Queue d to run at the end of this loop turn (no-op when already queued). */
void moat_worker_defer(moat_worker_t *w, moat_deferred_t *d);
/* Take d off the queue (its owner is going away). */
void moat_worker_undefer(moat_worker_t *w, moat_deferred_t *d);

/* The worker's current runtime, with a worker-local reference for one request; release
 * it on the same worker. Never NULL once the worker runs. No lock, no atomic. */
moat_runtime_t *moat_worker_runtime_acquire(moat_worker_t *w);
void moat_worker_runtime_release(moat_worker_t *w, moat_runtime_t *rt);

/* One worker's life, for moat_workers_start and for tests that run workers of their own.
 * init (on the starting thread): the loop, wakeup, grace timer and the listeners of o (none
 * when o->nlistens is 0), with `first` as the snapshot it starts from (references taken).
 * run: the thread body; returns when the worker stopped. publish (the control thread, any
 * time after init): hand over a new snapshot (references taken). stop: ask it to drain and
 * stop. cleanup (after the thread was joined): free what is left. */
void moat_worker_init(moat_worker_t *w, int id, const moat_server_opts_t *o,
                      const moat_snapshot_t *first);
void moat_worker_run(void *w);
void moat_worker_publish(moat_worker_t *w, const moat_snapshot_t *s);
void moat_worker_stop(moat_worker_t *w);
void moat_worker_cleanup(moat_worker_t *w);

/* Client connections (server/conn.c). */
void moat_conn_accept(moat_worker_t *w, int fd, const struct sockaddr *peer, int port, int tls);
/* Close idle connections and make busy ones close after their current request. */
void moat_conn_drain_all(moat_worker_t *w);
/* Free the calling thread's cache of request states (at the worker's end). */
void moat_conn_thread_cleanup(void);
void moat_conn_close_all(moat_worker_t *w);

uint64_t moat_now_ms(void);

/* Waiting requests (server/proxy.c): set up the timer (at worker init), and dial again at
 * once for every one of them (a new runtime arrived: the app's name may point elsewhere). */
void moat_proxy_waiting_init(moat_worker_t *w);
void moat_proxy_waiting_wake(moat_worker_t *w);

/* A warning that load can repeat (out of descriptors, say) is said at most every 10 s per
 * worker: 1 when it may be said now, and *said_at (loop time, 0: never) is updated. */
#define MOAT_WORKER_SAY_EVERY_MS 10000
static inline int moat_worker_may_say(moat_worker_t *w, uint64_t *said_at)
{
    uint64_t now = uv_now(&w->loop);
    if (*said_at != 0 && now - *said_at < MOAT_WORKER_SAY_EVERY_MS)
        return 0;
    *said_at = now ? now : 1;
    return 1;
}

#endif
