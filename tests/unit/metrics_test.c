/* Per-worker counters (server/metrics.c): buckets, methods, summing, quantiles, slots. */
#include "metrics.h"
#include "test.h"

#include <stdint.h>
#include <stdlib.h>

static void test_buckets_and_methods(void)
{
    CHECK_INT(moat_metrics_dur_bucket(0), 0);
    CHECK_INT(moat_metrics_dur_bucket(5), 0);
    CHECK_INT(moat_metrics_dur_bucket(6), 1);
    CHECK_INT(moat_metrics_dur_bucket(UINT64_MAX - 1), MOAT_METRICS_DUR_BUCKETS - 1);
    CHECK_INT(moat_metrics_lat_bucket(1), 0);
    CHECK_INT(moat_metrics_lat_bucket(60001), MOAT_METRICS_LAT_BUCKETS - 1);
    CHECK_INT(moat_metrics_method("GET"), MOAT_MM_GET);
    CHECK_INT(moat_metrics_method("POST"), MOAT_MM_POST);
    CHECK_INT(moat_metrics_method("PUT"), MOAT_MM_PUT);
    CHECK_INT(moat_metrics_method("PATCH"), MOAT_MM_PATCH);
    CHECK_INT(moat_metrics_method("PROPFIND"), MOAT_MM_OTHER);
    CHECK_INT(moat_metrics_method("GETX"), MOAT_MM_OTHER);
    CHECK_INT(moat_metrics_method(""), MOAT_MM_OTHER);
    CHECK_INT(moat_metrics_method("-"), MOAT_MM_OTHER);
}

static void test_sum_and_quantiles(void)
{
    moat_metrics_t *a = moat_metrics_new(), *b = moat_metrics_new(), *sum = moat_metrics_new();
    CHECK(((uintptr_t)a & 63) == 0);
    moat_mc_add(&a->requests, 3);
    moat_mc_inc(&b->requests);
    moat_mc_inc(&a->conns[MOAT_MC_H2]);
    moat_mc_inc(&b->conns[MOAT_MC_H2]);
    moat_mc_dec(&b->conns[MOAT_MC_H2]);
    moat_mc_inc(&b->ups[5].lat[3]);
    moat_mc_set(&a->health[5].last_fail_ms, 100);
    moat_mc_set(&a->health[5].last_err, (uint64_t)-111);
    moat_mc_set(&b->health[5].last_fail_ms, 200);
    moat_mc_set(&b->health[5].last_err, 111);
    moat_metrics_add(sum, a);
    moat_metrics_add(sum, b);
    CHECK_INT(moat_mc_get(&sum->requests), 4);
    CHECK_INT(moat_mc_get(&sum->conns[MOAT_MC_H2]), 1);
    CHECK_INT(moat_mc_get(&sum->ups[5].lat[3]), 1);
    CHECK_INT(moat_mc_get(&sum->health[5].last_fail_ms), 200);
    CHECK_INT(moat_mc_get(&sum->health[5].last_err), 111); /* the latest failure's */
    uint64_t h[MOAT_METRICS_LAT_BUCKETS] = {0};
    CHECK_INT(moat_metrics_quantile(h, 0.5), 0);
    h[2] = 98; /* <= 5 ms */
    h[9] = 2;  /* <= 1000 ms */
    CHECK_INT(moat_metrics_quantile(h, 0.5), 5);
    CHECK_INT(moat_metrics_quantile(h, 0.99), 1000);
    h[MOAT_METRICS_LAT_BUCKETS - 1] = 1000; /* past the last bound: reported as the last bound */
    CHECK_INT(moat_metrics_quantile(h, 0.99), 60000);
    free(a);
    free(b);
    free(sum);
}

static void test_slots(void)
{
    unsigned a = moat_metrics_site_slot("a.example");
    CHECK(a > 0);
    CHECK_INT(moat_metrics_site_slot("b.example"), a + 1);
    CHECK_INT(moat_metrics_site_slot("a.example"), a);
    CHECK_STR(moat_metrics_site_name(a), "a.example");
    char name[32];
    for (int i = 0; i < MOAT_METRICS_SITES + 5; i++) {
        snprintf(name, sizeof name, "s%d.example", i);
        moat_metrics_site_slot(name);
    }
    CHECK_INT(moat_metrics_site_slot("one-too-many.example"), 0); /* the overflow slot */
    CHECK_INT(moat_metrics_site_slot("a.example"), a);
    CHECK(moat_metrics_upstream_slot("127.0.0.1:8080") > 0);
}

int main(void)
{
    test_buckets_and_methods();
    test_sum_and_quantiles();
    test_slots();
    return test_summary("metrics_test");
}
