/* `--metrics ADDR:PORT` (server/metricsrv.c): a tiny HTTP/1.1 responder on the control
 * thread's loop that answers GET /metrics with the Prometheus text exposition. Request heads
 * are parsed by the project's HTTP/1.1 codec (server/http1.c); one request per connection,
 * the head within MOAT_METRICSRV_HEAD_MAX bytes and MOAT_METRICSRV_TIMEOUT_MS. */
#ifndef MOAT_METRICSRV_H
#define MOAT_METRICSRV_H

#include "moat/common.h"

#include <stddef.h>
#include <uv.h>

#define MOAT_METRICSRV_HEAD_MAX   8192
#define MOAT_METRICSRV_TIMEOUT_MS 10000
#define MOAT_METRICSRV_MAX_CONNS  32

typedef struct moat_metricsrv moat_metricsrv_t;

/* Append the exposition text to out. */
typedef void (*moat_metrics_render_cb)(moat_buf_t *out, void *data);

/* Listen on addr ("127.0.0.1:9180", "[::1]:9180"). 0, or a negative code with a sentence in
 * err. */
int moat_metricsrv_open(uv_loop_t *loop, const char *addr, moat_metrics_render_cb render,
                        void *data, moat_metricsrv_t **out, char *err, size_t errlen);
/* Close the listener and every connection; handles close on the loop. NULL is ignored. */
void moat_metricsrv_close(moat_metricsrv_t *m);

#endif
