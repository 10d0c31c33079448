/* What `moat status` and `--metrics` report (server/status.c), built on the control thread
 * from the workers' summed counters (server/metrics.h), the current snapshot, storage and a
 * window of recent samples for the rates and quantiles. */
#ifndef MOAT_STATUS_H
#define MOAT_STATUS_H

#include "metrics.h"
#include "moat/common.h"
#include "moat/storage.h"
#include "snapshot.h"

#include <jansson.h>
#include <stdint.h>

/* Samples every MOAT_STATUS_SAMPLE_MS; the window reaches back about a minute. */
#define MOAT_STATUS_SAMPLE_MS 5000
#define MOAT_STATUS_SAMPLES   13

typedef struct moat_status_window moat_status_window_t;

moat_status_window_t *moat_status_window_new(void);
void moat_status_window_free(moat_status_window_t *w);
/* Remember the counters now (loop time now_ms). */
void moat_status_window_sample(moat_status_window_t *w, const moat_metrics_t *sum, uint64_t now_ms);

typedef struct {
    const char *config_path; /* NULL: the site came from the command line */
    int64_t started_unix;
    int nworkers;
    const moat_snapshot_t *snap; /* current */
    moat_storage_t *storage;
    const char *storage_error; /* NULL while the store is fine */
    uint64_t reloads_ok, reloads_failed;
    uint64_t acme_orders, acme_failures; /* since the start */
    unsigned acme_backoff;               /* certificates waiting out a backoff */
    const moat_metrics_t *sum;           /* the workers' counters, summed now */
    const moat_status_window_t *window;
    uint64_t now_ms; /* loop time, same clock as the workers' */
} moat_status_src_t;

/* The status as JSON (the answer to {"cmd":"status"}; its members are listed in README). */
json_t *moat_status_json(const moat_status_src_t *src);

/* The Prometheus text exposition (version 0.0.4) of the same, appended to out. */
void moat_status_prometheus(const moat_status_src_t *src, moat_buf_t *out);

#endif
