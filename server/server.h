/* Workers and their listeners: one event loop per thread, each with its own SO_REUSEPORT
 * listening sockets, connections and upstream pool. Workers share nothing mutable; the
 * control thread talks to them through uv_async only. */
#ifndef MOAT_SERVER_H
#define MOAT_SERVER_H

#include "moat/common.h"
#include "moat/sock.h"
#include "snapshot.h"
#include <openssl/ssl.h>
#include <uv.h>

#define MOAT_MAX_LISTENERS 16

typedef struct moat_worker moat_worker_t;

/* A port moat listens on. fds[i] belongs to worker i. */
typedef struct {
    int port;
    int tls;
    int fds[64];
} moat_listen_spec_t;

typedef struct {
    moat_listen_spec_t listens[MOAT_MAX_LISTENERS];
    size_t nlistens;
    int nworkers;
    const char *bind_addr; /* NULL: all addresses */
    SSL_CTX *tls;          /* server context, shared by all workers */
    uint64_t grace_ms;     /* how long in-flight requests may take to finish on stop */
} moat_server_opts_t;

/* Create the listening sockets for every port and worker. Returns 0, or a negative code
 * with a sentence in err naming the port and how to fix it. Nothing is left open on error. */
int moat_listen_all(moat_server_opts_t *o, char *err, size_t errlen);
void moat_listen_close_all(moat_server_opts_t *o);

/* Start the worker threads from snapshot `first` (references taken; first->rt not NULL); they
 * run until moat_workers_stop(). */
int moat_workers_start(const moat_server_opts_t *o, const moat_snapshot_t *first);
/* Hand a new snapshot to every running worker (references taken); each swaps it in at its next
 * loop turn, and the old one is freed when no worker and no request uses it any more. A
 * no-op before the start. Control thread. */
void moat_workers_publish(const moat_snapshot_t *s);
/* Add every running worker's counters to *sum (server/metrics.h); returns how many workers
 * run. Control thread. */
struct moat_metrics;
int moat_workers_metrics(struct moat_metrics *sum);
/* Stop accepting; let requests in flight finish within the grace period; join the threads. */
void moat_workers_stop(void);

#endif
