/* Per-worker counters (server/metrics.h). */
#include "metrics.h"
#include "moat/common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const uint64_t moat_metrics_dur_le[MOAT_METRICS_DUR_BUCKETS] = {5,    25,    100,       500,
                                                                2500, 10000, UINT64_MAX};
const uint64_t moat_metrics_lat_le[MOAT_METRICS_LAT_BUCKETS] = {
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000, UINT64_MAX};
const char *const moat_metrics_method_names[MOAT_MM_N] = {"GET",    "HEAD",  "POST",    "PUT",
                                                          "DELETE", "PATCH", "OPTIONS", "other"};

moat_metrics_t *moat_metrics_new(void)
{
    /* A multiple of the cache line, so that no two workers' blocks share one. */
    size_t size = (sizeof(moat_metrics_t) + 63) / 64 * 64;
    moat_metrics_t *m = aligned_alloc(64, size);
    if (m == NULL)
        abort();
    memset(m, 0, size);
    return m;
}

void moat_metrics_add(moat_metrics_t *sum, const moat_metrics_t *w)
{
    moat_counter_t *d = (moat_counter_t *)sum;
    const moat_counter_t *s = (const moat_counter_t *)w;
    size_t n = offsetof(moat_metrics_t, health) / sizeof(moat_counter_t);
    for (size_t i = 0; i < n; i++)
        moat_mc_add(&d[i], moat_mc_get(&s[i]));
    for (size_t i = 0; i < MOAT_METRICS_UPSTREAMS; i++) {
        const moat_muphealth_t *a = &w->health[i];
        moat_muphealth_t *b = &sum->health[i];
        if (moat_mc_get(&a->last_ok_ms) > moat_mc_get(&b->last_ok_ms))
            moat_mc_set(&b->last_ok_ms, moat_mc_get(&a->last_ok_ms));
        if (moat_mc_get(&a->down_until_ms) > moat_mc_get(&b->down_until_ms))
            moat_mc_set(&b->down_until_ms, moat_mc_get(&a->down_until_ms));
        if (moat_mc_get(&a->last_fail_ms) > moat_mc_get(&b->last_fail_ms)) {
            moat_mc_set(&b->last_fail_ms, moat_mc_get(&a->last_fail_ms));
            moat_mc_set(&b->last_err, moat_mc_get(&a->last_err));
        }
    }
}

/* On every request: one switch on the first letter, then at most two compares. */
int moat_metrics_method(const char *m)
{
    int i;
    switch (m[0]) {
    case 'G': i = MOAT_MM_GET; break;
    case 'H': i = MOAT_MM_HEAD; break;
    case 'P': i = m[1] == 'O' ? MOAT_MM_POST : m[1] == 'U' ? MOAT_MM_PUT : MOAT_MM_PATCH; break;
    case 'D': i = MOAT_MM_DELETE; break;
    case 'O': i = MOAT_MM_OPTIONS; break;
    default: return MOAT_MM_OTHER;
    }
    return strcmp(m, moat_metrics_method_names[i]) == 0 ? i : MOAT_MM_OTHER;
}

size_t moat_metrics_dur_bucket(uint64_t ms)
{
    size_t i = 0;
    while (ms > moat_metrics_dur_le[i])
        i++;
    return i;
}

size_t moat_metrics_lat_bucket(uint64_t ms)
{
    size_t i = 0;
    while (ms > moat_metrics_lat_le[i])
        i++;
    return i;
}

uint64_t moat_metrics_quantile(const uint64_t *counts, double q)
{
    uint64_t total = 0;
    for (size_t i = 0; i < MOAT_METRICS_LAT_BUCKETS; i++)
        total += counts[i];
    if (total == 0)
        return 0;
    uint64_t rank = (uint64_t)(q * (double)total + 0.999999);
    if (rank == 0)
        rank = 1;
    uint64_t seen = 0;
    for (size_t i = 0; i < MOAT_METRICS_LAT_BUCKETS; i++) {
        seen += counts[i];
        if (seen >= rank)
            return i + 1 < MOAT_METRICS_LAT_BUCKETS ? moat_metrics_lat_le[i]
                                                    : moat_metrics_lat_le[i - 1];
    }
    return moat_metrics_lat_le[MOAT_METRICS_LAT_BUCKETS - 2];
}

/* --- slots (control thread) ------------------------------------------------------------- */

static char site_names[MOAT_METRICS_SITES][128];
static char up_names[MOAT_METRICS_UPSTREAMS][128];

static unsigned slot_of(char (*names)[128], size_t n, const char *name)
{
    for (size_t i = 1; i < n; i++) {
        if (names[i][0] == 0) {
            snprintf(names[i], sizeof names[i], "%s", name);
            return (unsigned)i;
        }
        if (strncmp(names[i], name, sizeof names[i] - 1) == 0)
            return (unsigned)i;
    }
    return 0;
}

unsigned moat_metrics_site_slot(const char *name)
{
    return slot_of(site_names, MOAT_METRICS_SITES, name);
}

unsigned moat_metrics_upstream_slot(const char *label)
{
    return slot_of(up_names, MOAT_METRICS_UPSTREAMS, label);
}

const char *moat_metrics_site_name(unsigned slot)
{
    return slot < MOAT_METRICS_SITES ? site_names[slot] : "";
}

const char *moat_metrics_upstream_name(unsigned slot)
{
    return slot < MOAT_METRICS_UPSTREAMS ? up_names[slot] : "";
}
