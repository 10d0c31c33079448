/* `moat status` and `--metrics` (server/status.h). Control thread only. */
#include "status.h"
#include "moat/certs.h"
#include "moat/runtime.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    uint64_t t_ms;
    uint64_t requests;
    uint64_t lat[MOAT_METRICS_UPSTREAMS][MOAT_METRICS_LAT_BUCKETS];
} sample_t;

struct moat_status_window {
    sample_t s[MOAT_STATUS_SAMPLES];
    size_t n, next; /* samples kept; where the next one goes */
};

moat_status_window_t *moat_status_window_new(void)
{
    return moat_xcalloc(1, sizeof(moat_status_window_t));
}

void moat_status_window_free(moat_status_window_t *w)
{
    free(w);
}

void moat_status_window_sample(moat_status_window_t *w, const moat_metrics_t *sum, uint64_t now_ms)
{
    sample_t *s = &w->s[w->next];
    s->t_ms = now_ms;
    s->requests = moat_mc_get(&sum->requests);
    for (size_t u = 0; u < MOAT_METRICS_UPSTREAMS; u++)
        for (size_t b = 0; b < MOAT_METRICS_LAT_BUCKETS; b++)
            s->lat[u][b] = moat_mc_get(&sum->ups[u].lat[b]);
    w->next = (w->next + 1) % MOAT_STATUS_SAMPLES;
    if (w->n < MOAT_STATUS_SAMPLES)
        w->n++;
}

/* The oldest sample kept, NULL when none. */
static const sample_t *oldest(const moat_status_window_t *w)
{
    if (w == NULL || w->n == 0)
        return NULL;
    return &w->s[w->n < MOAT_STATUS_SAMPLES ? 0 : w->next];
}

static uint64_t site_requests(const moat_msite_t *s)
{
    uint64_t n = 0;
    for (size_t m = 0; m < MOAT_MM_N; m++)
        for (size_t c = 0; c < 5; c++)
            n += moat_mc_get(&s->requests[m][c]);
    return n;
}

static int64_t rss_bytes(void)
{
    long long pages = 0, rss = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f == NULL)
        return 0;
    if (fscanf(f, "%lld %lld", &pages, &rss) != 2)
        rss = 0;
    fclose(f);
    return (int64_t)rss * sysconf(_SC_PAGESIZE);
}

static double cpu_seconds(void)
{
    struct rusage ru;
    if (getrusage(RUSAGE_SELF, &ru) != 0)
        return 0;
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_stime.tv_sec +
           ((double)ru.ru_utime.tv_usec + (double)ru.ru_stime.tv_usec) / 1e6;
}

static const char *err_text(int64_t code, char *buf, size_t n)
{
    if (code > 0)
        snprintf(buf, n, "%s", strerror((int)code));
    else if (code < 0)
        snprintf(buf, n, "%s", moat_strerror((int)code));
    else
        snprintf(buf, n, "error");
    return buf;
}

/* --- certificates ------------------------------------------------------------------------- */

/* The first TLS name of a site, NULL for a plain-HTTP site. */
static const char *tls_name(const moat_site_t *s)
{
    for (size_t i = 0; i < s->naddrs; i++)
        if (!s->addrs[i].plain_http)
            return s->addrs[i].host;
    return NULL;
}

static char *kv(moat_storage_t *st, const char *prefix, const char *id)
{
    char key[600], *v = NULL;
    snprintf(key, sizeof key, "%s:%s", prefix, id);
    if (st == NULL || st->ops->kv_get(st, key, &v) != 0)
        return NULL;
    return v;
}

/* The certificate a site's first TLS name gets now, from the snapshot and the store. */
static json_t *site_cert(const moat_status_src_t *src, const moat_site_t *site, int64_t now)
{
    const char *name = tls_name(site);
    if (name == NULL)
        return json_null();
    json_t *j = json_object();
    const moat_cert_t *cert =
        src->snap && src->snap->certs ? moat_certs_lookup(src->snap->certs, name, NULL) : NULL;
    char *pending_id = NULL;
    if (cert == NULL) {
        /* No certificate yet: an ACME order pending, or it failed. */
        const char **names = NULL;
        size_t n = moat_certs_site_acme_names(site, &names);
        if (n > 0)
            pending_id = moat_certs_acme_id(names, n);
        free(names);
        json_object_set_new(j, "state", json_string("pending"));
    }
    const char *id = cert ? moat_cert_id(cert) : pending_id;
    if (id != NULL)
        json_object_set_new(j, "id", json_string(id));
    moat_cert_record_t rec = {0};
    if (cert != NULL) {
        int64_t na = moat_cert_not_after(cert);
        json_object_set_new(j, "state", json_string(na > now ? "valid" : "expired"));
        json_object_set_new(j, "not_after", json_integer(na));
        json_object_set_new(j, "days_left", json_integer((na - now) / 86400));
        if (src->storage && src->storage->ops->get_cert(src->storage, id, &rec) == 0) {
            json_object_set_new(j, "issuer", json_string(rec.issuer ? rec.issuer : ""));
            json_object_set_new(j, "source", json_string(rec.source ? rec.source : ""));
            int64_t next = moat_cert_next_renewal(&rec);
            if (next > 0)
                json_object_set_new(j, "next_renewal", json_integer(next));
            moat_cert_record_clear(&rec);
        }
    }
    if (id != NULL && strncmp(id, "acme:", 5) == 0) {
        char *e = kv(src->storage, "acme-error", id);
        if (e != NULL)
            json_object_set_new(j, "last_error", json_string(e));
        free(e);
        char *b = kv(src->storage, "acme-backoff", id);
        long long failures = 0, next = 0;
        if (b != NULL && sscanf(b, "%lld %lld", &failures, &next) == 2 && next > now) {
            json_object_set_new(j, "next_attempt", json_integer(next));
            json_object_set_new(j, "failures", json_integer(failures));
        }
        free(b);
    }
    free(pending_id);
    return j;
}

/* --- JSON --------------------------------------------------------------------------------- */

static json_t *upstream_json(const moat_status_src_t *src, unsigned slot, const sample_t *old)
{
    const moat_mup_t *u = &src->sum->ups[slot];
    const moat_muphealth_t *h = &src->sum->health[slot];
    json_t *j = json_object();
    json_object_set_new(j, "name", json_string(moat_metrics_upstream_name(slot)));
    uint64_t down_until = moat_mc_get(&h->down_until_ms);
    uint64_t last_fail = moat_mc_get(&h->last_fail_ms), last_ok = moat_mc_get(&h->last_ok_ms);
    int up = down_until <= src->now_ms;
    json_object_set_new(j, "up", json_boolean(up));
    if (last_fail) {
        char buf[200];
        json_object_set_new(
            j, "last_error",
            json_string(err_text((int64_t)moat_mc_get(&h->last_err), buf, sizeof buf)));
        json_object_set_new(
            j, "last_error_age_s",
            json_integer((json_int_t)((src->now_ms - MOAT_MIN(last_fail, src->now_ms)) / 1000)));
    }
    if (last_ok)
        json_object_set_new(
            j, "last_ok_age_s",
            json_integer((json_int_t)((src->now_ms - MOAT_MIN(last_ok, src->now_ms)) / 1000)));
    uint64_t recent[MOAT_METRICS_LAT_BUCKETS], n = 0;
    for (size_t b = 0; b < MOAT_METRICS_LAT_BUCKETS; b++) {
        recent[b] = moat_mc_get(&u->lat[b]) - (old ? old->lat[slot][b] : 0);
        n += recent[b];
    }
    json_object_set_new(j, "recent_responses", json_integer((json_int_t)n));
    if (n > 0) {
        json_object_set_new(j, "p50_ms",
                            json_integer((json_int_t)moat_metrics_quantile(recent, 0.5)));
        json_object_set_new(j, "p99_ms",
                            json_integer((json_int_t)moat_metrics_quantile(recent, 0.99)));
    }
    json_object_set_new(j, "open", json_integer((json_int_t)moat_mc_get(&u->open)));
    json_object_set_new(j, "pooled", json_integer((json_int_t)moat_mc_get(&u->pooled)));
    json_object_set_new(j, "requests", json_integer((json_int_t)moat_mc_get(&u->requests)));
    json_object_set_new(j, "failures", json_integer((json_int_t)moat_mc_get(&u->failures)));
    return j;
}

json_t *moat_status_json(const moat_status_src_t *src)
{
    int64_t now = (int64_t)time(NULL);
    const moat_metrics_t *m = src->sum;
    const sample_t *old = oldest(src->window);
    json_t *j = json_object();
    json_object_set_new(j, "ok", json_true());
    json_object_set_new(j, "version", json_string(MOAT_VERSION));
    json_object_set_new(j, "pid", json_integer(getpid()));
    json_object_set_new(j, "uptime_s", json_integer(now - src->started_unix));
    json_object_set_new(j, "workers", json_integer(src->nworkers));
    json_object_set_new(j, "config",
                        src->config_path ? json_string(src->config_path)
                                         : json_string("(command line)"));
    json_t *st = json_object();
    json_object_set_new(st, "ok", json_boolean(src->storage_error == NULL));
    if (src->storage_error)
        json_object_set_new(st, "error", json_string(src->storage_error));
    json_object_set_new(j, "storage", st);
    json_object_set_new(j, "reloads",
                        json_pack("{sIsI}", "ok", (json_int_t)src->reloads_ok, "failed",
                                  (json_int_t)src->reloads_failed));
    json_object_set_new(j, "connections",
                        json_pack("{sIsIsI}", "http1", (json_int_t)moat_mc_get(&m->conns[0]),
                                  "http2", (json_int_t)moat_mc_get(&m->conns[1]), "websocket",
                                  (json_int_t)moat_mc_get(&m->conns[2])));
    uint64_t total = moat_mc_get(&m->requests);
    json_object_set_new(j, "requests", json_integer((json_int_t)total));
    double rps = 0;
    if (old != NULL && src->now_ms > old->t_ms)
        rps = (double)(total - old->requests) * 1000.0 / (double)(src->now_ms - old->t_ms);
    json_object_set_new(j, "requests_per_s", json_real((double)(int64_t)(rps * 100) / 100));
    json_object_set_new(j, "window_s",
                        json_integer(old ? (json_int_t)((src->now_ms - old->t_ms) / 1000) : 0));

    json_t *sites = json_array();
    json_t *ups = json_array();
    unsigned seen_up[MOAT_METRICS_UPSTREAMS] = {0};
    const moat_runtime_t *rt = src->snap ? src->snap->rt : NULL;
    for (size_t i = 0; rt && i < rt->nsites; i++) {
        const moat_site_rt_t *s = &rt->sites[i];
        const moat_msite_t *ms = &m->sites[s->mslot];
        char name[300];
        json_t *sj = json_object();
        json_object_set_new(sj, "name",
                            json_string(moat_runtime_site_name(s->site, name, sizeof name)));
        json_t *names = json_array();
        for (size_t k = 0; k < s->site->naddrs; k++)
            json_array_append_new(names, json_string(s->site->addrs[k].host));
        json_object_set_new(sj, "addresses", names);
        json_object_set_new(sj, "requests", json_integer((json_int_t)site_requests(ms)));
        json_t *by = json_object();
        for (size_t c = 0; c < 5; c++) {
            uint64_t n = 0;
            for (size_t mm = 0; mm < MOAT_MM_N; mm++)
                n += moat_mc_get(&ms->requests[mm][c]);
            char k[8];
            snprintf(k, sizeof k, "%zuxx", c + 1);
            json_object_set_new(by, k, json_integer((json_int_t)n));
        }
        json_object_set_new(sj, "by_status", by);
        json_t *ul = json_array();
        for (size_t k = 0; k < s->nupstreams; k++) {
            unsigned slot = s->upstreams[k].mslot;
            json_array_append_new(ul, json_string(s->upstreams[k].label));
            if (!seen_up[slot]) {
                seen_up[slot] = 1;
                json_array_append_new(ups, upstream_json(src, slot, old));
            }
        }
        json_object_set_new(sj, "upstreams", ul);
        json_object_set_new(sj, "certificate", site_cert(src, s->site, now));
        json_array_append_new(sites, sj);
    }
    json_object_set_new(j, "sites", sites);
    json_object_set_new(j, "upstreams", ups);
    json_object_set_new(
        j, "tls_handshakes",
        json_pack("{sIsIsI}", "full", (json_int_t)moat_mc_get(&m->tls_full), "resumed",
                  (json_int_t)moat_mc_get(&m->tls_resumed), "failed",
                  (json_int_t)(moat_mc_get(&m->tls_failed[0]) + moat_mc_get(&m->tls_failed[1]) +
                               moat_mc_get(&m->tls_failed[2]))));
    json_object_set_new(j, "rss_bytes", json_integer(rss_bytes()));
    json_object_set_new(j, "cpu_seconds", json_real(cpu_seconds()));
    return j;
}

/* --- Prometheus --------------------------------------------------------------------------- */

/* A label value: backslash, double quote and line feed escaped (the exposition format). */
static void label(moat_buf_t *b, const char *v)
{
    for (; *v; v++) {
        if (*v == '\\' || *v == '"')
            moat_buf_appendf(b, "\\%c", *v);
        else if (*v == '\n')
            moat_buf_puts(b, "\\n");
        else
            moat_buf_append(b, v, 1);
    }
}

static void head(moat_buf_t *b, const char *name, const char *type, const char *help)
{
    moat_buf_appendf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

static void site_label(moat_buf_t *b, unsigned slot)
{
    moat_buf_puts(b, "site=\"");
    label(b, slot ? moat_metrics_site_name(slot) : "_other");
    moat_buf_puts(b, "\"");
}

static void histogram(moat_buf_t *b, const char *name, unsigned slot, const moat_counter_t *bk,
                      uint64_t sum_ms, uint64_t count)
{
    uint64_t acc = 0;
    for (size_t i = 0; i < MOAT_METRICS_DUR_BUCKETS; i++) {
        acc += moat_mc_get(&bk[i]);
        moat_buf_appendf(b, "%s_bucket{", name);
        site_label(b, slot);
        if (i + 1 < MOAT_METRICS_DUR_BUCKETS)
            moat_buf_appendf(b, ",le=\"%g\"} %llu\n", (double)moat_metrics_dur_le[i] / 1000.0,
                             (unsigned long long)acc);
        else
            moat_buf_appendf(b, ",le=\"+Inf\"} %llu\n", (unsigned long long)acc);
    }
    moat_buf_appendf(b, "%s_sum{", name);
    site_label(b, slot);
    moat_buf_appendf(b, "} %.3f\n%s_count{", (double)sum_ms / 1000.0, name);
    site_label(b, slot);
    moat_buf_appendf(b, "} %llu\n", (unsigned long long)count);
}

/* Slots in use: the sites and upstreams ever named (bounded by the slot tables), and slot 0
 * for sites only when it counted something. */
static int site_used(const moat_metrics_t *m, unsigned slot)
{
    return slot ? moat_metrics_site_name(slot)[0] != 0 : site_requests(&m->sites[0]) > 0;
}

void moat_status_prometheus(const moat_status_src_t *src, moat_buf_t *b)
{
    const moat_metrics_t *m = src->sum;
    int64_t now = (int64_t)time(NULL);
    head(b, "moat_build_info", "gauge", "moat's version.");
    moat_buf_appendf(b, "moat_build_info{version=\"%s\"} 1\n", MOAT_VERSION);
    head(b, "moat_start_time_seconds", "gauge", "When moat started (unix time).");
    moat_buf_appendf(b, "moat_start_time_seconds %lld\n", (long long)src->started_unix);
    head(b, "moat_workers", "gauge", "Worker threads.");
    moat_buf_appendf(b, "moat_workers %d\n", src->nworkers);

    head(b, "moat_requests_total", "counter",
         "Requests answered, by site, method and status class.");
    for (unsigned s = 0; s < MOAT_METRICS_SITES; s++) {
        if (!site_used(m, s))
            continue;
        for (size_t mm = 0; mm < MOAT_MM_N; mm++)
            for (size_t c = 0; c < 5; c++) {
                uint64_t n = moat_mc_get(&m->sites[s].requests[mm][c]);
                if (n == 0 && !(mm == MOAT_MM_GET && c == 1))
                    continue; /* series appear when first counted; GET 2xx always */
                moat_buf_puts(b, "moat_requests_total{");
                site_label(b, s);
                moat_buf_appendf(b, ",method=\"%s\",code=\"%zuxx\"} %llu\n",
                                 moat_metrics_method_names[mm], c + 1, (unsigned long long)n);
            }
    }
    head(b, "moat_request_duration_seconds", "histogram",
         "Time from the request head to the end of the response.");
    for (unsigned s = 0; s < MOAT_METRICS_SITES; s++)
        if (site_used(m, s))
            histogram(b, "moat_request_duration_seconds", s, m->sites[s].dur,
                      moat_mc_get(&m->sites[s].dur_sum_ms), site_requests(&m->sites[s]));
    head(b, "moat_upstream_response_seconds", "histogram",
         "Time from sending a request upstream to its first response byte.");
    for (unsigned s = 0; s < MOAT_METRICS_SITES; s++)
        if (site_used(m, s))
            histogram(b, "moat_upstream_response_seconds", s, m->sites[s].up,
                      moat_mc_get(&m->sites[s].up_sum_ms), moat_mc_get(&m->sites[s].up_count));
    head(b, "moat_received_bytes_total", "counter", "Request bytes received from clients.");
    for (unsigned s = 0; s < MOAT_METRICS_SITES; s++)
        if (site_used(m, s)) {
            moat_buf_puts(b, "moat_received_bytes_total{");
            site_label(b, s);
            moat_buf_appendf(b, "} %llu\n", (unsigned long long)moat_mc_get(&m->sites[s].bytes_in));
        }
    head(b, "moat_sent_bytes_total", "counter", "Response bytes sent to clients.");
    for (unsigned s = 0; s < MOAT_METRICS_SITES; s++)
        if (site_used(m, s)) {
            moat_buf_puts(b, "moat_sent_bytes_total{");
            site_label(b, s);
            moat_buf_appendf(b, "} %llu\n",
                             (unsigned long long)moat_mc_get(&m->sites[s].bytes_out));
        }

    static const char *const kinds[] = {"http1", "http2"};
    head(b, "moat_open_connections", "gauge", "Client connections open, by protocol.");
    for (size_t k = 0; k < MOAT_ARRAY_LEN(kinds); k++)
        moat_buf_appendf(b, "moat_open_connections{protocol=\"%s\"} %lld\n", kinds[k],
                         (long long)moat_mc_get(&m->conns[k]));
    head(b, "moat_websockets_open", "gauge",
         "Websocket tunnels open (inside HTTP/1.1 or HTTP/2 connections).");
    moat_buf_appendf(b, "moat_websockets_open %lld\n",
                     (long long)moat_mc_get(&m->conns[MOAT_MC_WS]));
    head(b, "moat_tls_handshakes_total", "counter", "TLS handshakes that completed.");
    moat_buf_appendf(b, "moat_tls_handshakes_total{kind=\"full\"} %llu\n",
                     (unsigned long long)moat_mc_get(&m->tls_full));
    moat_buf_appendf(b, "moat_tls_handshakes_total{kind=\"resumed\"} %llu\n",
                     (unsigned long long)moat_mc_get(&m->tls_resumed));
    static const char *const reasons[] = {"unknown_sni", "incomplete", "error"};
    head(b, "moat_tls_handshake_failures_total", "counter",
         "TLS handshakes that failed, by reason (incomplete: the connection ended first).");
    for (size_t r = 0; r < MOAT_MT_N; r++)
        moat_buf_appendf(b, "moat_tls_handshake_failures_total{reason=\"%s\"} %llu\n", reasons[r],
                         (unsigned long long)moat_mc_get(&m->tls_failed[r]));

    head(b, "moat_upstream_up", "gauge", "1 unless the upstream failed in the last 10 s.");
    for (unsigned u = 1; u < MOAT_METRICS_UPSTREAMS; u++)
        if (moat_metrics_upstream_name(u)[0]) {
            moat_buf_puts(b, "moat_upstream_up{upstream=\"");
            label(b, moat_metrics_upstream_name(u));
            moat_buf_appendf(b, "\"} %d\n",
                             moat_mc_get(&m->health[u].down_until_ms) <= src->now_ms);
        }
    static const struct {
        const char *name, *help;
        size_t off;
        int gauge;
    } upm[] = {
        {"moat_upstream_responses_total", "Responses from the upstream.",
         offsetof(moat_mup_t, requests), 0},
        {"moat_upstream_failures_total", "Connections to the upstream refused or failed.",
         offsetof(moat_mup_t, failures), 0},
        {"moat_upstream_connections", "Connections to the upstream open (pooled included).",
         offsetof(moat_mup_t, open), 1},
        {"moat_upstream_pooled_connections", "Idle connections to the upstream in the pool.",
         offsetof(moat_mup_t, pooled), 1},
    };
    for (size_t i = 0; i < MOAT_ARRAY_LEN(upm); i++) {
        head(b, upm[i].name, upm[i].gauge ? "gauge" : "counter", upm[i].help);
        for (unsigned u = 1; u < MOAT_METRICS_UPSTREAMS; u++)
            if (moat_metrics_upstream_name(u)[0]) {
                const moat_counter_t *c =
                    (const moat_counter_t *)((const char *)&m->ups[u] + upm[i].off);
                moat_buf_appendf(b, "%s{upstream=\"", upm[i].name);
                label(b, moat_metrics_upstream_name(u));
                moat_buf_appendf(b, "\"} %lld\n", (long long)moat_mc_get(c));
            }
    }

    head(b, "moat_certificate_expiry_seconds", "gauge",
         "Seconds until each served certificate expires.");
    const moat_certs_t *certs = src->snap ? src->snap->certs : NULL;
    for (size_t i = 0; i < moat_certs_count(certs); i++) {
        const moat_cert_t *c = moat_certs_at(certs, i);
        moat_buf_puts(b, "moat_certificate_expiry_seconds{cert=\"");
        label(b, moat_cert_id(c));
        moat_buf_appendf(b, "\"} %lld\n", (long long)(moat_cert_not_after(c) - now));
    }
    head(b, "moat_acme_orders_total", "counter", "ACME orders started.");
    moat_buf_appendf(b, "moat_acme_orders_total %llu\n", (unsigned long long)src->acme_orders);
    head(b, "moat_acme_failures_total", "counter", "ACME orders that failed.");
    moat_buf_appendf(b, "moat_acme_failures_total %llu\n", (unsigned long long)src->acme_failures);
    head(b, "moat_acme_backoff", "gauge", "Certificates whose last ACME order failed.");
    moat_buf_appendf(b, "moat_acme_backoff %u\n", src->acme_backoff);
    head(b, "moat_reloads_total", "counter", "Reloads of the site file, by result.");
    moat_buf_appendf(b, "moat_reloads_total{result=\"ok\"} %llu\n",
                     (unsigned long long)src->reloads_ok);
    moat_buf_appendf(b, "moat_reloads_total{result=\"failed\"} %llu\n",
                     (unsigned long long)src->reloads_failed);
    head(b, "moat_storage_ok", "gauge", "0 once the store was found damaged.");
    moat_buf_appendf(b, "moat_storage_ok %d\n", src->storage_error == NULL);
    head(b, "process_cpu_seconds_total", "counter", "User and system CPU time.");
    moat_buf_appendf(b, "process_cpu_seconds_total %.3f\n", cpu_seconds());
    head(b, "process_resident_memory_bytes", "gauge", "Resident memory.");
    moat_buf_appendf(b, "process_resident_memory_bytes %lld\n", (long long)rss_bytes());
}
