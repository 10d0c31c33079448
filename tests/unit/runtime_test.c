/* Unit tests for the runtime snapshot and its path to the workers: building it with
 * uv_getaddrinfo, the snapshot manager's order (nothing is published unless everything
 * succeeded), and publishing to worker loops running on their own threads, where a request
 * keeps its runtime across a swap. ASan (detect_leaks=1 under ctest) checks that every
 * retired snapshot is freed exactly once. */
#include "moat/ca.h"
#include "moat/certs.h"
#include "moat/config.h"
#include "moat/log.h"
#include "moat/runtime.h"
#include "moat/storage.h"
#include "moat/tls.h"
#include "snapshot.h"
#include "test.h"
#include "worker.h"

#include <arpa/inet.h>
#include <ftw.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

static char dir[] = "/tmp/moat-runtime-test-XXXXXX";
static moat_storage_t *st;
static moat_ca_t *ca;
static uv_loop_t loop; /* the "control" loop of these tests */

static int rm_cb(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    return remove(p);
}

static moat_config_t *parse(const char *text)
{
    moat_config_t *c = NULL;
    CHECK_INT(moat_config_parse("Moatfile", text, strlen(text), &c, NULL), 0);
    return c;
}

/* --- moat_runtime_build ------------------------------------------------------------------ */

typedef struct {
    int calls;
    moat_runtime_t *rt;
    char err[512];
} built_t;

static void on_built(moat_runtime_t *rt, const char *err, void *data)
{
    built_t *b = data;
    b->calls++;
    b->rt = rt;
    snprintf(b->err, sizeof b->err, "%s", err ? err : "");
}

static void build(const char *text, built_t *out)
{
    *out = (built_t){0};
    moat_runtime_build(&loop, parse(text), 80, 443, on_built, out);
    CHECK_INT(out->calls, 0); /* never inside the call */
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK_INT(out->calls, 1);
}

static void test_build(void)
{
    built_t b;
    /* localhost through uv_getaddrinfo: an address, the label as written. */
    build("localhost:8443 localhost:9 header_timeout=7s\n", &b);
    CHECK(b.rt != NULL);
    if (b.rt != NULL) {
        const moat_upstream_t *u = &b.rt->sites[0].upstreams[0];
        CHECK(u->addrlen > 0);
        CHECK(u->addr.ss_family == AF_INET || u->addr.ss_family == AF_INET6);
        CHECK_STR(u->label, "localhost:9");
        CHECK_INT(u->tls, 0);
        CHECK_INT(b.rt->header_timeout_ms, 7000);
        CHECK_INT(atomic_load(&b.rt->refs), 1);
        moat_runtime_unref(b.rt);
    }

    /* A name that does not resolve: the message the start prints, naming the host. */
    build("localhost:8443 localhost:9,http://nonexistent.invalid:8080\n", &b);
    CHECK(b.rt == NULL);
    const char want[] = "cannot resolve upstream host 'nonexistent.invalid': ";
    CHECK(strncmp(b.err, want, sizeof want - 1) == 0);
    CHECK(strlen(b.err) > sizeof want - 1);
    if (strncmp(b.err, want, sizeof want - 1) != 0)
        fprintf(stderr, "got: %s\n", b.err);

    /* Nothing to look up (a unix socket, an IP literal) still answers from the loop. */
    build("localhost:8443 unix:/run/app.sock\n", &b);
    CHECK(b.rt != NULL);
    if (b.rt != NULL) {
        CHECK_STR(b.rt->sites[0].upstreams[0].label, "unix:/run/app.sock");
        moat_runtime_unref(b.rt);
    }
    build("localhost:8443 https://127.0.0.1:9443\n", &b);
    CHECK(b.rt != NULL);
    if (b.rt != NULL) {
        CHECK_INT(b.rt->sites[0].upstreams[0].tls, 1);
        CHECK_STR(b.rt->sites[0].upstreams[0].tls_name, "127.0.0.1");
        CHECK(b.rt->upstream_tls != NULL);
        moat_runtime_unref(b.rt);
    }

    /* Cancelled: the callback still runs once, with nothing built. */
    b = (built_t){0};
    moat_runtime_build_t *h =
        moat_runtime_build(&loop, parse("localhost:8443 localhost:9\n"), 80, 443, on_built, &b);
    moat_runtime_build_cancel(h);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK_INT(b.calls, 1);
    if (b.rt != NULL) /* the lookup may have finished before the cancel reached it */
        moat_runtime_unref(b.rt);
    else
        CHECK_STR(b.err, "cancelled");
}

/* Wildcard addresses: one plain label under the domain; an exact line wins; the redirect
 * target (find_tls_addr) follows the same rule. */
static void test_wildcard_lookup(void)
{
    CHECK(moat_runtime_host_matches(MOAT_SLICE_LIT("a.example.com"), "*.example.com"));
    CHECK(moat_runtime_host_matches(MOAT_SLICE_LIT("A-1_b.Example.COM"), "*.example.com"));
    CHECK(!moat_runtime_host_matches(MOAT_SLICE_LIT("example.com"), "*.example.com"));
    CHECK(!moat_runtime_host_matches(MOAT_SLICE_LIT(".example.com"), "*.example.com"));
    CHECK(!moat_runtime_host_matches(MOAT_SLICE_LIT("a.b.example.com"), "*.example.com"));
    CHECK(!moat_runtime_host_matches(MOAT_SLICE_LIT("a/b.example.com"), "*.example.com"));
    CHECK(!moat_runtime_host_matches(MOAT_SLICE_LIT("a@b.example.com"), "*.example.com"));
    CHECK(!moat_runtime_host_matches(MOAT_SLICE_LIT("aexample.com"), "*.example.com"));
    built_t b;
    build("*.ai.example.com,ai.example.com 127.0.0.1:1 dns=rfc2136 dns_server=127.0.0.1:53 "
          "dns_tsig=/k\nchat.ai.example.com 127.0.0.1:2\n",
          &b);
    CHECK(b.rt != NULL);
    if (b.rt == NULL)
        return;
    const moat_site_rt_t *s =
        moat_runtime_find_site(b.rt, MOAT_SLICE_LIT("a.ai.example.com"), 443, 1);
    CHECK(s == &b.rt->sites[0]);
    s = moat_runtime_find_site(b.rt, MOAT_SLICE_LIT("ai.example.com:443"), 443, 1);
    CHECK(s == &b.rt->sites[0]);
    s = moat_runtime_find_site(b.rt, MOAT_SLICE_LIT("chat.ai.example.com"), 443, 1);
    CHECK(s == &b.rt->sites[1]);
    CHECK(moat_runtime_find_site(b.rt, MOAT_SLICE_LIT("x.y.ai.example.com"), 443, 1) == NULL);
    const moat_site_addr_t *a =
        moat_runtime_find_tls_addr(b.rt, MOAT_SLICE_LIT("b.ai.example.com"));
    CHECK(a != NULL && strcmp(a->host, "*.ai.example.com") == 0);
    a = moat_runtime_find_tls_addr(b.rt, MOAT_SLICE_LIT("chat.ai.example.com:80"));
    CHECK(a != NULL && strcmp(a->host, "chat.ai.example.com") == 0);
    moat_runtime_unref(b.rt);
}

/* A re-addressed copy (the resolver moved a name): same config and TLS context, its own
 * upstream arrays; freed in either order, the config exactly once (ASan). */
static void test_readdress(void)
{
    built_t b;
    build("localhost:8443 localhost:9,https://127.0.0.1:9443,unix:/run/app.sock\n", &b);
    CHECK(b.rt != NULL);
    if (b.rt == NULL)
        return;
    const moat_upstream_t *u = b.rt->sites[0].upstreams;
    CHECK_INT(u[0].named, 1); /* a name: followed */
    CHECK_INT(u[1].named, 0); /* an address: nothing to follow */
    CHECK_INT(u[2].named, 0); /* a path */
    moat_runtime_t *c1 = moat_runtime_readdress(b.rt);
    CHECK(c1->config == b.rt->config);
    CHECK(c1->base == b.rt);
    CHECK(c1->upstream_tls == b.rt->upstream_tls);
    CHECK(c1->sites[0].upstreams != b.rt->sites[0].upstreams);
    CHECK(c1->sites[0].site == b.rt->sites[0].site);
    CHECK(c1->generation > b.rt->generation);
    CHECK_STR(c1->sites[0].upstreams[1].tls_name, "127.0.0.1");
    struct sockaddr_in *sin = (struct sockaddr_in *)&c1->sites[0].upstreams[0].addr;
    sin->sin_family = AF_INET;
    sin->sin_addr.s_addr = htonl(0x7f000003);
    c1->sites[0].upstreams[0].addrlen = sizeof *sin;
    CHECK(memcmp(&b.rt->sites[0].upstreams[0].addr, sin, sizeof *sin) != 0);
    /* A copy of a copy shares the one owner of the config. */
    moat_runtime_t *c2 = moat_runtime_readdress(c1);
    CHECK(c2->base == b.rt);
    CHECK_INT(((struct sockaddr_in *)&c2->sites[0].upstreams[0].addr)->sin_addr.s_addr,
              htonl(0x7f000003));
    moat_runtime_unref(b.rt); /* the copies keep it (and its config) alive */
    CHECK_STR(c1->config->sites[0].upstreams[0].host, "localhost");
    moat_runtime_unref(c1);
    moat_runtime_unref(c2);
}

/* --- workers ----------------------------------------------------------------------------- */

#define NWORKERS 3

enum { CMD_ACQUIRE = 1, CMD_RELEASE, CMD_PEEK, CMD_CLOSE };

/* A test hand on each worker loop: the main thread posts a command and waits until the
 * worker thread has run it. */
typedef struct {
    moat_worker_t w;
    uv_async_t poke;
    uv_sem_t done;
    atomic_int cmd;
    moat_runtime_t *held; /* a "request" holding a runtime */
    moat_runtime_t *seen_rt;
    moat_certs_t *seen_certs;
    moat_tls_keys_t *seen_keys;
    int misses; /* the worker's certificates did not answer for localhost */
} sim_t;

static sim_t sims[NWORKERS];
static int nrunning;
static int npublished;
static moat_server_opts_t no_listeners = {.nworkers = NWORKERS, .grace_ms = 1000};

static void on_poke(uv_async_t *a)
{
    sim_t *s = a->data;
    int cmd = atomic_exchange(&s->cmd, 0);
    switch (cmd) {
    case CMD_ACQUIRE: s->held = moat_worker_runtime_acquire(&s->w); break;
    case CMD_RELEASE:
        moat_worker_runtime_release(&s->w, s->held);
        s->held = NULL;
        break;
    case CMD_PEEK:
        s->seen_rt = moat_worker_runtime_acquire(&s->w);
        moat_worker_runtime_release(&s->w, s->seen_rt);
        s->seen_certs = s->w.certs;
        s->seen_keys = s->w.keys;
        if (moat_certs_lookup(s->w.certs, "localhost", NULL) == NULL)
            s->misses++;
        /* A held runtime must still be whole, whatever was swapped in since (ASan). */
        if (s->held != NULL &&
            moat_runtime_find_site(s->held, MOAT_SLICE_LIT("localhost"), 8443, 1) == NULL)
            s->misses++;
        break;
    case CMD_CLOSE: uv_close((uv_handle_t *)&s->poke, NULL); break;
    default: return;
    }
    uv_sem_post(&s->done);
}

static void run_cmd(sim_t *s, int cmd)
{
    atomic_store(&s->cmd, cmd);
    uv_async_send(&s->poke);
    uv_sem_wait(&s->done);
}

static void publish_to_sims(const moat_snapshot_t *snap, void *data)
{
    (void)data;
    npublished++;
    for (int i = 0; i < nrunning; i++)
        moat_worker_publish(&sims[i].w, snap);
}

/* Wait until every worker has swapped in `want` (the swap happens at their next loop turn). */
static int all_see(const moat_snapshot_t *want)
{
    for (int tries = 0; tries < 500; tries++) {
        int ok = 1;
        for (int i = 0; i < NWORKERS; i++) {
            run_cmd(&sims[i], CMD_PEEK);
            ok &= sims[i].seen_rt == want->rt && sims[i].seen_certs == want->certs &&
                  sims[i].seen_keys == want->keys;
        }
        if (ok)
            return 1;
        usleep(10000);
    }
    return 0;
}

typedef struct {
    int calls, status;
    char err[1200];
} loaded_t;

static void on_loaded(int status, const char *err, void *data)
{
    loaded_t *l = data;
    l->calls++;
    l->status = status;
    snprintf(l->err, sizeof l->err, "%s", err ? err : "");
}

static int load(moat_snapmgr_t *m, const char *text, loaded_t *l)
{
    *l = (loaded_t){0};
    CHECK_INT(moat_snapmgr_load(m, parse(text), on_loaded, l), 0);
    CHECK(moat_snapmgr_busy(m));
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK_INT(l->calls, 1);
    CHECK(!moat_snapmgr_busy(m));
    return l->status;
}

static void test_workers(void)
{
    moat_snapmgr_opts_t o = {.loop = &loop,
                             .storage = st,
                             .ca = ca,
                             .http_port = 80,
                             .https_port = 443,
                             .publish = publish_to_sims};
    moat_snapmgr_t *m = moat_snapmgr_new(&o);
    loaded_t l;
    CHECK_INT(load(m, "localhost:8443 localhost:9\n", &l), 0);
    CHECK_INT(npublished, 1);
    moat_snapshot_t s0 = *moat_snapmgr_current(m);
    CHECK(s0.rt != NULL && s0.certs != NULL && s0.keys != NULL);

    /* N worker loops on their own threads, each starting from s0. */
    for (int i = 0; i < NWORKERS; i++) {
        sim_t *s = &sims[i];
        moat_worker_init(&s->w, i, &no_listeners, &s0);
        uv_async_init(&s->w.loop, &s->poke, on_poke);
        s->poke.data = s;
        uv_sem_init(&s->done, 0);
    }
    for (int i = 0; i < NWORKERS; i++)
        CHECK_INT(uv_thread_create(&sims[i].w.thread, moat_worker_run, &sims[i].w), 0);
    nrunning = NWORKERS;
    CHECK(all_see(&s0));
    /* Atomic references: the manager's and one per worker. */
    CHECK_INT(atomic_load(&s0.rt->refs), 1 + NWORKERS);

    /* A request on every worker takes the runtime without touching the atomic count. */
    for (int i = 0; i < NWORKERS; i++)
        run_cmd(&sims[i], CMD_ACQUIRE);
    for (int i = 0; i < NWORKERS; i++)
        CHECK(sims[i].held == s0.rt);
    CHECK_INT(atomic_load(&s0.rt->refs), 1 + NWORKERS);

    /* A reload: every worker swaps; the requests keep the old runtime, which stays whole. */
    moat_runtime_t *old = moat_runtime_ref(s0.rt); /* to watch it; dropped below */
    CHECK_INT(load(m, "localhost:8443 localhost:10\nother.localhost localhost:11\n", &l), 0);
    CHECK_INT(npublished, 2);
    moat_snapshot_t s1 = *moat_snapmgr_current(m);
    CHECK(s1.rt != s0.rt && s1.certs != s0.certs && s1.keys == s0.keys);
    CHECK(all_see(&s1));
    for (int i = 0; i < NWORKERS; i++)
        CHECK(sims[i].held == old);
    /* The manager let go; each worker still holds it for its request. */
    CHECK_INT(atomic_load(&old->refs), 1 + NWORKERS);
    CHECK_INT(atomic_load(&s1.rt->refs), 1 + NWORKERS);
    for (int i = 0; i < NWORKERS; i++) {
        run_cmd(&sims[i], CMD_RELEASE);
        CHECK_INT(atomic_load(&old->refs), 1 + NWORKERS - 1 - i);
    }
    CHECK_INT(atomic_load(&old->refs), 1); /* ours only: every worker retired it */
    moat_runtime_unref(old);               /* freed here (ASan: once, and not leaked) */

    /* A reload whose runtime cannot be built publishes nothing: neither the config nor the
     * certificates, which are not even built (no certificate is issued for the new name). */
    int before = npublished;
    CHECK(load(m, "localhost:8443 localhost:10\nnew.localhost http://nonexistent.invalid:80\n",
               &l) != 0);
    CHECK(strstr(l.err, "cannot resolve upstream host 'nonexistent.invalid'") != NULL);
    CHECK_INT(npublished, before);
    CHECK(moat_snapmgr_current(m)->rt == s1.rt && moat_snapmgr_current(m)->certs == s1.certs);
    moat_cert_record_t rec;
    CHECK_INT(st->ops->get_cert(st, "internal:new.localhost", &rec), MOAT_ENOT_FOUND);
    CHECK(all_see(&s1));

    /* A runtime that builds but certificates that cannot: nothing published either. */
    CHECK(load(m,
               "localhost:8443 localhost:10\nfiles.localhost localhost:12 "
               "tls=/nonexistent/c.pem,/nonexistent/k.pem\n",
               &l) != 0);
    CHECK(strncmp(l.err, "certificates: ", 14) == 0);
    CHECK_INT(npublished, before);
    CHECK(all_see(&s1));

    /* A second load while one is in flight is refused (control.c queues it). */
    CHECK_INT(moat_snapmgr_load(m, parse("localhost:8443 localhost:9\n"), on_loaded, &l), 0);
    moat_config_t *extra = parse("localhost:8443 localhost:9\n");
    CHECK_INT(moat_snapmgr_load(m, extra, on_loaded, &l), MOAT_EAGAIN);
    moat_config_free(extra);
    uv_run(&loop, UV_RUN_DEFAULT);
    CHECK_INT(l.status, 0);

    /* Many publishes in a row (renewals, key rotations), faster than the workers swap:
     * every worker ends on the last one, and each snapshot in between is freed once. */
    char err[1100];
    for (int i = 0; i < 100; i++) {
        if (i % 2)
            moat_snapmgr_rotate_keys(m);
        else
            CHECK_INT(moat_snapmgr_recert(m, err, sizeof err), 0);
        if (i == 50)
            run_cmd(&sims[0], CMD_ACQUIRE); /* a request across the storm */
    }
    CHECK(all_see(moat_snapmgr_current(m)));
    run_cmd(&sims[0], CMD_RELEASE);
    for (int i = 0; i < NWORKERS; i++)
        CHECK_INT(sims[i].misses, 0);

    /* Stop: the workers drop what they hold; the manager the rest. */
    for (int i = 0; i < NWORKERS; i++) {
        run_cmd(&sims[i], CMD_CLOSE);
        moat_worker_stop(&sims[i].w);
    }
    for (int i = 0; i < NWORKERS; i++) {
        uv_thread_join(&sims[i].w.thread);
        moat_worker_cleanup(&sims[i].w);
        uv_sem_destroy(&sims[i].done);
    }
    nrunning = 0;
    CHECK_INT(atomic_load(&moat_snapmgr_current(m)->rt->refs), 1);
    moat_snapmgr_free(m);
}

/* A certificate renewal before the first load has nothing to publish. */
static void test_snapmgr_empty(void)
{
    moat_snapmgr_opts_t o = {.loop = &loop, .storage = st, .ca = ca, .publish = publish_to_sims};
    moat_snapmgr_t *m = moat_snapmgr_new(&o);
    int before = npublished;
    char err[256] = "";
    CHECK(moat_snapmgr_recert(m, err, sizeof err) != 0);
    moat_snapmgr_rotate_keys(m);
    CHECK_INT(npublished, before);
    CHECK(moat_snapmgr_current(m)->rt == NULL);
    moat_snapmgr_free(m);
}

int main(void)
{
    moat_log_min_level = MOAT_LOG_ERROR;
    if (mkdtemp(dir) == NULL) {
        perror("mkdtemp");
        return 1;
    }
    char err[512] = "";
    if (moat_storage_open_sqlite(dir, &st, err, sizeof err) != 0 ||
        moat_ca_open(st, &ca, err, sizeof err) != 0) {
        fprintf(stderr, "setup: %s\n", err);
        return 1;
    }
    uv_loop_init(&loop);
    test_build();
    test_wildcard_lookup();
    test_readdress();
    test_workers();
    test_snapmgr_empty();
    uv_loop_close(&loop);
    moat_ca_free(ca);
    st->ops->close(st);
    nftw(dir, rm_cb, 8, FTW_DEPTH | FTW_PHYS);
    return test_summary("runtime");
}
