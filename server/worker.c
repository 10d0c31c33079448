/* Listening sockets, worker threads and their snapshots (server/server.h, server/worker.h). */
#include "moat/log.h"
#include "moat/mem.h"
#include "worker.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <malloc.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#define ACCEPTS_PER_EVENT 64

static moat_worker_t *workers;
static int nworkers;
/* The worker whose loop runs on this thread, for the compatibility wrappers below. */

static int open_listener(const char *bind_addr, int port, int reuseport, int *fd_out)
{
    struct sockaddr_storage ss;
    socklen_t len;
    memset(&ss, 0, sizeof ss);
    int family = AF_INET6;
    if (bind_addr != NULL && strchr(bind_addr, ':') == NULL) {
        struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        if (inet_pton(AF_INET, bind_addr, &sin->sin_addr) != 1)
            return MOAT_EINVAL;
        len = sizeof *sin;
        family = AF_INET;
    } else {
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)port);
        sin6->sin6_addr = in6addr_any;
        if (bind_addr != NULL && inet_pton(AF_INET6, bind_addr, &sin6->sin6_addr) != 1)
            return MOAT_EINVAL;
        len = sizeof *sin6;
    }
    int fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0 && family == AF_INET6 && bind_addr == NULL) {
        /* No IPv6 on this machine: listen on every IPv4 address instead. */
        struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
        memset(&ss, 0, sizeof ss);
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        len = sizeof *sin;
        family = AF_INET;
        fd = socket(family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    }
    if (fd < 0)
        return -errno;
    int one = 1, zero = 0;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (reuseport)
        setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    if (family == AF_INET6)
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof zero);
    if (bind(fd, (struct sockaddr *)&ss, len) != 0 || listen(fd, 1024) != 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    *fd_out = fd;
    return 0;
}

static void describe_bind_error(int e, int port, int tls, char *err, size_t errlen)
{
    const char *flag = tls ? "--https-port" : "--http-port";
    if (e == -EADDRINUSE)
        snprintf(err, errlen,
                 "cannot listen on port %d: it is already in use (another web server such as "
                 "nginx, Caddy or Apache, or another moat?). Stop it, or choose another port "
                 "with %s",
                 port, flag);
    else if (e == -EACCES || e == -EPERM)
        snprintf(err, errlen,
                 "cannot listen on port %d: permission denied. Ports below 1024 need root or "
                 "the CAP_NET_BIND_SERVICE capability (setcap cap_net_bind_service=+ep "
                 "$(command -v moat)), or choose a port above 1023 with %s",
                 port, flag);
    else if (e == MOAT_EINVAL)
        snprintf(err, errlen, "cannot listen on port %d: bad --listen address", port);
    else
        snprintf(err, errlen, "cannot listen on port %d: %s", port, strerror(-e));
}

int moat_listen_all(moat_server_opts_t *o, char *err, size_t errlen)
{
    for (size_t i = 0; i < o->nlistens; i++)
        for (int w = 0; w < o->nworkers; w++)
            o->listens[i].fds[w] = -1;
    for (size_t i = 0; i < o->nlistens; i++) {
        moat_listen_spec_t *l = &o->listens[i];
        /* Probe without SO_REUSEPORT first: with it, a second server of the same user would
         * silently share the port instead of failing. */
        int probe = -1;
        int e = open_listener(o->bind_addr, l->port, 0, &probe);
        if (e == 0) {
            close(probe);
            for (int w = 0; w < o->nworkers && e == 0; w++)
                e = open_listener(o->bind_addr, l->port, 1, &l->fds[w]);
        }
        if (e != 0) {
            describe_bind_error(e, l->port, l->tls, err, errlen);
            moat_listen_close_all(o);
            return MOAT_EIO;
        }
    }
    return 0;
}

void moat_listen_close_all(moat_server_opts_t *o)
{
    for (size_t i = 0; i < o->nlistens; i++)
        for (int w = 0; w < o->nworkers; w++)
            if (o->listens[i].fds[w] >= 0) {
                close(o->listens[i].fds[w]);
                o->listens[i].fds[w] = -1;
            }
}

/* Out of descriptors, a pending connection stays in the backlog and the listener stays
 * readable: the loop would spin on it. The worker keeps one spare descriptor for this: it is
 * given up to accept the connection and close it at once (the client sees a refusal, not a
 * hang), then taken again. The warning is said at most every 10 s, with a count. */

static void refuse_one(moat_worker_t *w, int lfd)
{
    if (w->spare_fd >= 0) {
        close(w->spare_fd);
        int fd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
        if (fd >= 0)
            close(fd);
        w->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    }
    w->refused++;
    if (moat_worker_may_say(w, &w->refused_logged_at)) {
        MOAT_WARN("worker %d: out of file descriptors: refused %llu new connection(s); "
                  "connections already open are served (raise LimitNOFILE or ulimit -n)",
                  w->id, (unsigned long long)w->refused);
        w->refused = 0;
    }
}

static void on_accept(uv_poll_t *h, int status, int events)
{
    (void)events;
    moat_worker_t *w = h->loop->data;
    if (status < 0)
        return;
    size_t idx = (size_t)(h - w->listeners);
    int lfd = -1;
    uv_fileno((uv_handle_t *)h, &lfd);
    for (int i = 0; i < ACCEPTS_PER_EVENT; i++) {
        struct sockaddr_storage peer;
        socklen_t len = sizeof peer;
        int fd = accept4(lfd, (struct sockaddr *)&peer, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE)
                refuse_one(w, lfd);
            break;
        }
        moat_conn_accept(w, fd, (struct sockaddr *)&peer, w->listener_port[idx],
                         w->listener_tls[idx]);
    }
}

/* --- snapshots --------------------------------------------------------------------------- */

moat_runtime_t *moat_worker_runtime_acquire(moat_worker_t *w)
{
    w->rts->refs++;
    return w->rts->rt;
}

/* Drop one worker-local use of node *pp; the last one unlinks it and gives back its atomic
 * reference (the only atomic operation a request ever causes, and only on an old runtime). */
static void rt_put(moat_worker_rt_t **pp)
{
    moat_worker_rt_t *n = *pp;
    if (--n->refs > 0)
        return;
    *pp = n->next;
    moat_runtime_unref(n->rt);
    free(n);
}

void moat_worker_runtime_release(moat_worker_t *w, moat_runtime_t *rt)
{
    if (rt == NULL)
        return;
    moat_worker_rt_t **pp = &w->rts;
    while (*pp != NULL && (*pp)->rt != rt)
        pp = &(*pp)->next;
    if (*pp == NULL) {
        MOAT_ERROR("worker %d: released a runtime it does not hold", w->id);
        abort();
    }
    rt_put(pp);
}

/* Swap in the pending snapshot, if any. Runs on the worker, between events: nothing in
 * flight on this thread is looking at the certificates or keys being replaced, and requests
 * keep the runtime they started with through their own count. */
static void take_pending(moat_worker_t *w)
{
    moat_snapshot_t *s = atomic_exchange_explicit(&w->pending, NULL, memory_order_acquire);
    if (s == NULL)
        return;
    if (w->rts != NULL && w->rts->rt == s->rt) {
        moat_runtime_unref(s->rt); /* same runtime, new certificates or keys */
    } else {
        /* A runtime this worker still holds for old requests can only come back if the
         * control thread republishes it; reuse its node so each runtime has one. */
        moat_worker_rt_t **pp = &w->rts, *n;
        while (*pp != NULL && (*pp)->rt != s->rt)
            pp = &(*pp)->next;
        if (*pp != NULL) {
            n = *pp;
            *pp = n->next;
            moat_runtime_unref(s->rt);
        } else {
            n = moat_xcalloc(1, sizeof *n);
            n->rt = s->rt;
        }
        n->refs++; /* the "current" use */
        moat_worker_rt_t *old = w->rts;
        n->next = old;
        w->rts = n;
        if (old != NULL)
            rt_put(&n->next);
        moat_proxy_waiting_wake(w);
    }
    moat_certs_t *old_certs = w->certs;
    moat_tls_keys_t *old_keys = w->keys;
    w->certs = s->certs;
    w->keys = s->keys;
    moat_tls_thread_use(w->certs, w->keys);
    moat_certs_release(old_certs);
    moat_tls_keys_release(old_keys);
    free(s);
}

/* At the end of the thread, once every connection is closed. */
static void drop_snapshot(moat_worker_t *w)
{
    moat_tls_thread_use(NULL, NULL);
    if (w->rts != NULL)
        rt_put(&w->rts);
    if (w->rts != NULL)
        MOAT_WARN("worker %d: a request still held a runtime at exit", w->id);
    while (w->rts != NULL) {
        moat_worker_rt_t *n = w->rts;
        w->rts = n->next;
        moat_runtime_unref(n->rt);
        free(n);
    }
    moat_certs_release(w->certs);
    moat_tls_keys_release(w->keys);
    w->certs = NULL;
    w->keys = NULL;
}

void moat_worker_publish(moat_worker_t *w, const moat_snapshot_t *s)
{
    moat_snapshot_t *n = moat_xmalloc(sizeof *n);
    moat_snapshot_ref(n, s);
    /* A snapshot the worker has not taken yet is simply replaced: it never saw it. */
    moat_snapshot_t *old = atomic_exchange_explicit(&w->pending, n, memory_order_acq_rel);
    if (old != NULL) {
        moat_snapshot_release(old);
        free(old);
    }
    uv_async_send(&w->wakeup);
}

static void close_walk(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static void finish(moat_worker_t *w)
{
    moat_pool_close_all(w);
    moat_conn_close_all(w);
    uv_close((uv_handle_t *)&w->wakeup, NULL);
    uv_close((uv_handle_t *)&w->grace_timer, NULL);
    uv_close((uv_handle_t *)&w->defer_prepare, NULL);
    uv_close((uv_handle_t *)&w->defer_check, NULL);
    uv_close((uv_handle_t *)&w->wait_timer, NULL);
}

static void grace_expired(uv_timer_t *t)
{
    moat_worker_t *w = t->loop->data;
    if (w->conns != NULL)
        MOAT_WARN("worker %d: grace period over, closing the connections still open", w->id);
    finish(w);
}

static void check_idle(uv_timer_t *t);

static void on_wakeup(uv_async_t *a)
{
    moat_worker_t *w = a->loop->data;
    take_pending(w);
    if (!atomic_load(&w->stop_requested) || w->draining)
        return;
    w->draining = 1;
    for (size_t i = 0; i < w->nlisteners; i++)
        uv_close((uv_handle_t *)&w->listeners[i], NULL);
    moat_pool_close_all(w);
    moat_conn_drain_all(w);
    if (w->conns == NULL) {
        finish(w);
        return;
    }
    /* Poll until the busy connections are gone, or the grace period ends. */
    w->grace_deadline = moat_now_ms() + w->opts->grace_ms;
    uv_timer_start(&w->grace_timer, check_idle, 50, 50);
}

static void check_idle(uv_timer_t *t)
{
    moat_worker_t *w = t->loop->data;
    moat_conn_drain_all(w);
    if (w->conns == NULL) {
        finish(w);
    } else if (moat_now_ms() >= w->grace_deadline) {
        grace_expired(t);
    }
}

static void run_deferred(moat_worker_t *w)
{
    /* Until empty: what a run defers again (it should not) still goes before the sleep. */
    moat_deferred_t *head = &w->deferred;
    while (head->next != head) {
        moat_deferred_t *d = head->next;
        moat_worker_undefer(w, d);
        d->run(d);
    }
    uv_prepare_stop(&w->defer_prepare);
    uv_check_stop(&w->defer_check);
}

static void on_defer_prepare(uv_prepare_t *h)
{
    run_deferred(h->loop->data);
}

static void on_defer_check(uv_check_t *h)
{
    run_deferred(h->loop->data);
}

void moat_worker_defer(moat_worker_t *w, moat_deferred_t *d)
{
    if (d->queued)
        return;
    moat_deferred_t *head = &w->deferred;
    if (head->next == head) {
        uv_prepare_start(&w->defer_prepare, on_defer_prepare);
        uv_check_start(&w->defer_check, on_defer_check);
    }
    d->queued = 1;
    d->prev = head->prev;
    d->next = head;
    head->prev->next = d;
    head->prev = d;
}

void moat_worker_undefer(moat_worker_t *w, moat_deferred_t *d)
{
    (void)w;
    if (!d->queued)
        return;
    d->queued = 0;
    d->prev->next = d->next;
    d->next->prev = d->prev;
    d->next = d->prev = NULL;
}

/* Memory taken under load goes back to the system once the worker has gone quiet: after a
 * tick with more than TRIM_QUIET_EVENTS socket events, each of the next TRIM_QUIET_TICKS ticks
 * with at most that many empties the thread's caches and has malloc_trim return the free pages
 * of every arena (glibc keeps them otherwise, and RSS after a burst of connections stays at its
 * peak). More than one tick, because memory can still be freed after the sockets went quiet
 * (timers end connections too: close flushes, timeouts): measured with tests/bench (mem), a
 * single trim left 2-3 MiB behind in one run out of three, three trims none in 6 of 6. "Quiet"
 * allows a trickle, such as pooled upstream
 * connections timing out one by one, which would otherwise postpone it indefinitely. It never
 * runs on a request's path; an idle worker wakes once per tick for it. */
#define TRIM_TICK_MS      3000
#define TRIM_QUIET_EVENTS 64
#define TRIM_QUIET_TICKS  3

static void trim_tick(uv_timer_t *t)
{
    moat_worker_t *w = MOAT_CONTAINER_OF(t, moat_worker_t, trim_timer);
    uint64_t ev = moat_sock_thread_events();
    uint64_t delta = ev - w->trim_events;
    w->trim_events = ev;
    if (delta > TRIM_QUIET_EVENTS) {
        w->trim_due = TRIM_QUIET_TICKS;
        return;
    }
    if (!w->trim_due)
        return;
    w->trim_due--;
    moat_sock_thread_cleanup();
    moat_conn_thread_cleanup();
    moat_mem_thread_release();
    malloc_trim(0);
    MOAT_DEBUG("worker %d quiet (%llu socket events in %d ms): memory given back", w->id,
               (unsigned long long)delta, TRIM_TICK_MS);
}

void moat_worker_init(moat_worker_t *w, int id, const moat_server_opts_t *o,
                      const moat_snapshot_t *first)
{
    w->id = id;
    w->opts = o;
    w->metrics = moat_metrics_new();
    uv_loop_init(&w->loop);
    w->loop.data = w;
    uv_async_init(&w->loop, &w->wakeup, on_wakeup);
    uv_timer_init(&w->loop, &w->grace_timer);
    uv_timer_init(&w->loop, &w->trim_timer);
    uv_timer_start(&w->trim_timer, trim_tick, TRIM_TICK_MS, TRIM_TICK_MS);
    uv_unref((uv_handle_t *)&w->trim_timer); /* never what keeps the loop running */
    w->deferred.next = w->deferred.prev = &w->deferred;
    w->spare_fd = open("/dev/null", O_RDONLY | O_CLOEXEC);
    uv_prepare_init(&w->loop, &w->defer_prepare);
    uv_check_init(&w->loop, &w->defer_check);
    moat_proxy_waiting_init(w);
    for (size_t j = 0; j < o->nlistens; j++) {
        uv_poll_init_socket(&w->loop, &w->listeners[j], o->listens[j].fds[id]);
        w->listener_port[j] = o->listens[j].port;
        w->listener_tls[j] = o->listens[j].tls;
        uv_poll_start(&w->listeners[j], UV_READABLE, on_accept);
    }
    w->nlisteners = o->nlistens;
    moat_snapshot_t *s = moat_xmalloc(sizeof *s);
    moat_snapshot_ref(s, first);
    atomic_init(&w->pending, s);
}

void moat_worker_run(void *arg)
{
    moat_worker_t *w = arg;
    moat_mem_thread_enable();
    take_pending(w); /* the first snapshot, before the first connection */
    uv_run(&w->loop, UV_RUN_DEFAULT);
    uv_walk(&w->loop, close_walk, NULL);
    uv_run(&w->loop, UV_RUN_DEFAULT);
    drop_snapshot(w);
    uv_loop_close(&w->loop);
    moat_sock_thread_cleanup();
    moat_conn_thread_cleanup();
    moat_mem_thread_release();
}

void moat_worker_stop(moat_worker_t *w)
{
    atomic_store(&w->stop_requested, 1);
    uv_async_send(&w->wakeup);
}

void moat_worker_cleanup(moat_worker_t *w)
{
    if (w->spare_fd >= 0) {
        close(w->spare_fd);
        w->spare_fd = -1;
    }
    moat_snapshot_t *s = atomic_exchange(&w->pending, NULL);
    if (s != NULL) {
        moat_snapshot_release(s);
        free(s);
    }
    free(w->metrics);
    w->metrics = NULL;
    moat_upstream_state_t *st = w->ups, *next;
    for (; st != NULL; st = next) {
        next = st->next;
        free(st);
    }
    w->ups = NULL;
}

int moat_workers_start(const moat_server_opts_t *o, const moat_snapshot_t *first)
{
    nworkers = o->nworkers;
    workers = moat_xcalloc((size_t)nworkers, sizeof *workers);
    for (int i = 0; i < nworkers; i++)
        moat_worker_init(&workers[i], i, o, first);
    for (int i = 0; i < nworkers; i++)
        if (uv_thread_create(&workers[i].thread, moat_worker_run, &workers[i]) != 0)
            return MOAT_EIO;
    return 0;
}

void moat_workers_publish(const moat_snapshot_t *s)
{
    for (int i = 0; i < nworkers; i++)
        moat_worker_publish(&workers[i], s);
}

int moat_workers_metrics(moat_metrics_t *sum)
{
    for (int i = 0; i < nworkers; i++)
        moat_metrics_add(sum, workers[i].metrics);
    return nworkers;
}

void moat_workers_stop(void)
{
    for (int i = 0; i < nworkers; i++)
        moat_worker_stop(&workers[i]);
    for (int i = 0; i < nworkers; i++)
        uv_thread_join(&workers[i].thread);
    for (int i = 0; i < nworkers; i++)
        moat_worker_cleanup(&workers[i]);
    free(workers);
    workers = NULL;
    nworkers = 0;
}
