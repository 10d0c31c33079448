/* Counters of what the workers do, for `moat status` and `--metrics` (server/metrics.c).
 *
 * Each worker owns one moat_metrics_t (w->metrics, its own allocation, cache-line aligned) and
 * is the only thread that writes it: a counter is bumped with a relaxed load and a relaxed
 * store, which compile to a plain add (no lock prefix, no syscall, no shared cache line between
 * workers). The control thread reads them with relaxed loads and sums the workers on request
 * (moat_workers_metrics in server/worker.c); a sum may be a few events behind, never torn.
 *
 * Sites and upstreams are counted in slots: the control thread gives each site name and each
 * upstream label a slot when it builds a runtime (moat_metrics_site_slot/_upstream_slot, called
 * by server/runtime.c), and the runtime carries the slot number to the workers, so a request
 * finds its counters by index. Slots are never given back (a name keeps its counters across
 * reloads); past MOAT_METRICS_SITES names, the rest share slot 0, which also counts requests
 * no site served. That bounds the label cardinality by the site file. */
#ifndef MOAT_METRICS_H
#define MOAT_METRICS_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#define MOAT_METRICS_SITES     64
#define MOAT_METRICS_UPSTREAMS 64
/* Request duration and upstream time, in ms: le 5, 25, 100, 500, 2500, 10000, +Inf. */
#define MOAT_METRICS_DUR_BUCKETS 7
/* Upstream response times for the quantiles of `moat status`, in ms. */
#define MOAT_METRICS_LAT_BUCKETS 16

enum {
    MOAT_MM_GET,
    MOAT_MM_HEAD,
    MOAT_MM_POST,
    MOAT_MM_PUT,
    MOAT_MM_DELETE,
    MOAT_MM_PATCH,
    MOAT_MM_OPTIONS,
    MOAT_MM_OTHER,
    MOAT_MM_N
};
enum { MOAT_MC_H1, MOAT_MC_H2, MOAT_MC_WS, MOAT_MC_N };
enum { MOAT_MT_UNKNOWN_SNI, MOAT_MT_TIMEOUT, MOAT_MT_PROTOCOL, MOAT_MT_N };

typedef _Atomic uint64_t moat_counter_t;

typedef struct {
    moat_counter_t requests[MOAT_MM_N][5]; /* method, status class 1xx..5xx */
    moat_counter_t dur[MOAT_METRICS_DUR_BUCKETS], dur_sum_ms;
    moat_counter_t up[MOAT_METRICS_DUR_BUCKETS], up_sum_ms, up_count;
    moat_counter_t bytes_in, bytes_out;
} moat_msite_t;

typedef struct {
    moat_counter_t requests; /* responses that came from it */
    moat_counter_t failures; /* connects refused or failed, connections cut */
    moat_counter_t open;     /* gauge: connections open (pooled ones included) */
    moat_counter_t pooled;   /* gauge: idle in the pool */
    moat_counter_t lat[MOAT_METRICS_LAT_BUCKETS];
} moat_mup_t;

/* Not summed: the latest of the workers' values counts. Times are worker loop times (ms,
 * monotonic, same clock on every thread). */
typedef struct {
    moat_counter_t last_ok_ms, last_fail_ms, down_until_ms;
    moat_counter_t last_err; /* the negated MOAT_E* or errno code of the last failure */
} moat_muphealth_t;

typedef struct moat_metrics {
    /* Summed part: every member up to `health` is a moat_counter_t. */
    moat_counter_t requests;
    moat_counter_t conns[MOAT_MC_N]; /* gauges: open client connections by kind */
    moat_counter_t tls_full, tls_resumed, tls_failed[MOAT_MT_N];
    moat_msite_t sites[MOAT_METRICS_SITES];
    moat_mup_t ups[MOAT_METRICS_UPSTREAMS];
    /* Latest part. */
    moat_muphealth_t health[MOAT_METRICS_UPSTREAMS];
} moat_metrics_t;

/* One writer per counter: a plain add, atomic only so that the reader's loads are defined. */
static inline void moat_mc_add(moat_counter_t *c, uint64_t n)
{
    atomic_store_explicit(c, atomic_load_explicit(c, memory_order_relaxed) + n,
                          memory_order_relaxed);
}
static inline void moat_mc_inc(moat_counter_t *c)
{
    moat_mc_add(c, 1);
}
static inline void moat_mc_dec(moat_counter_t *c)
{
    moat_mc_add(c, (uint64_t)-1);
}
static inline void moat_mc_set(moat_counter_t *c, uint64_t v)
{
    atomic_store_explicit(c, v, memory_order_relaxed);
}
static inline uint64_t moat_mc_get(const moat_counter_t *c)
{
    return atomic_load_explicit((moat_counter_t *)c, memory_order_relaxed);
}

/* A zeroed, cache-line aligned block for one worker (free()). */
moat_metrics_t *moat_metrics_new(void);
/* sum += one worker's block (relaxed loads; latest-part fields take the larger value). */
void moat_metrics_add(moat_metrics_t *sum, const moat_metrics_t *w);

/* Bucket indexes. */
int moat_metrics_method(const char *method);
size_t moat_metrics_dur_bucket(uint64_t ms);
size_t moat_metrics_lat_bucket(uint64_t ms);
/* Upper bounds in ms (the last is UINT64_MAX). */
extern const uint64_t moat_metrics_dur_le[MOAT_METRICS_DUR_BUCKETS];
extern const uint64_t moat_metrics_lat_le[MOAT_METRICS_LAT_BUCKETS];
extern const char *const moat_metrics_method_names[MOAT_MM_N];

/* Slots (control thread). 0 is the overflow slot. */
unsigned moat_metrics_site_slot(const char *name);
unsigned moat_metrics_upstream_slot(const char *label);
/* The name of a slot, "" when unused. Control thread. */
const char *moat_metrics_site_name(unsigned slot);
const char *moat_metrics_upstream_name(unsigned slot);

/* The quantile q (0..1) of a latency histogram, in ms (upper bound of its bucket); 0 when
 * empty. */
uint64_t moat_metrics_quantile(const uint64_t *counts, double q);

#endif
