/* Worker internals shared by the files of server/: the per-thread state, the per-worker
 * upstream pool and the list of client connections (for a graceful stop). */
#ifndef MOAT_WORKER_H
#define MOAT_WORKER_H

#include "moat/common.h"
#include "moat/proxy.h"
#include "moat/runtime.h"
#include "server.h"
#include "upstream.h"
#include "moat/sock.h"
#include <uv.h>

typedef struct moat_conn moat_conn_t;

struct moat_worker {
    uv_loop_t loop;
    uv_thread_t thread;
    uv_async_t wakeup; /* the control thread asks for a stop */
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
    uv_timer_t grace_timer;
    uint64_t grace_deadline;
    int draining;
    int stop_requested;
};

/* Client connections (server/conn.c). */
void moat_conn_accept(moat_worker_t *w, int fd, const struct sockaddr *peer, int port, int tls);
/* Close idle connections and make busy ones close after their current request. */
void moat_conn_drain_all(moat_worker_t *w);
void moat_conn_close_all(moat_worker_t *w);

/* The worker's current runtime, with a reference for one request. */
static inline moat_runtime_t *moat_worker_runtime_acquire(moat_worker_t *w)
{
    (void)w;
    return moat_runtime_acquire();
}
static inline void moat_worker_runtime_release(moat_worker_t *w, moat_runtime_t *rt)
{
    (void)w;
    moat_runtime_release(rt);
}

uint64_t moat_now_ms(void);

#endif
