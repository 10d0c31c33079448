/* The control thread (server/control.h). It alone touches the disk and SQLite; the
 * workers see only immutable snapshots it publishes. */
#include "control.h"
#include "acmemgr.h"
#include "ctlsock.h"
#include "metrics.h"
#include "metricsrv.h"
#include "status.h"
#include "moat/ca.h"
#include "moat/certs.h"
#include "moat/config.h"
#include "h2conn.h"
#include "moat/log.h"
#include "moat/runtime.h"
#include "resolver.h"
#include "server.h"
#include "snapshot.h"
#include "moat/storage.h"
#include "system.h"
#include "tickets.h"
#include "moat/tls.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#define TICKET_ROTATION_MS (3600 * 1000)
#define TICKET_SYNC_MS     (60 * 1000) /* shared keys: how often a peer's rotation is looked for */
/* How often the store is looked over for damage (and its write-ahead log checkpointed). */
#define STORE_CHECK_MS (3600 * 1000)
/* A shared store is asked more often (one cheap query): an outage shows in `moat health`. */
#define SHARED_STORE_CHECK_MS 5000

typedef struct {
    const moat_run_opts_t *opts;
    uv_loop_t *loop;
    uv_signal_t sighup, sigterm, sigint;
    uv_timer_t renew_timer, ticket_timer, store_timer;
    moat_storage_t *storage;
    /* News from a shared store (another instance stored a certificate): polled here, on the
     * control loop, and looked for again every second while there is no watch. */
    uv_timer_t watch_timer;
    uv_poll_t watch;
    int watching, watch_closing, news;
    int64_t tickets_synced; /* last time the shared ticket keys were read or rotated */
    int store_damaged;      /* said once: serving from memory from then on */
    moat_ca_t *ca;
    moat_server_opts_t server;
    char pid_path[4096];
    int stopping;
    moat_acmemgr_t *acme;
    uv_signal_t sigusr1; /* `moat renew` */
    /* The control thread's own pointer to the current snapshot (the workers have theirs). */
    moat_snapmgr_t *snap;
    moat_resolver_t *resolver; /* upstream names followed */
    int reload_again;          /* SIGHUP during a reload: read the file again when it ends */
    int started;               /* first load done: status of the start below */
    int start_status;
    char start_err[1100];
    /* The control socket (server/ctlsock.h), and the `moat reload` clients waiting for the
     * reload in flight (cur) or for the one after it (next). */
    moat_ctlsock_t *ctl;
    moat_ctlconn_t *reload_cur[16], *reload_next[16];
    size_t ncur, nnext;
    uint64_t reloads_ok, reloads_failed;
    /* Status and metrics: recent samples of the workers' counters (server/status.h). */
    moat_status_window_t *window;
    uv_timer_t sample_timer;
    moat_metricsrv_t *metrics; /* --metrics */
    int64_t started_unix;
} control_t;

/* Tell the `moat reload` clients of the reload that just ended how it went: ok, or the
 * sentence and the site file's error lines (the ones `moat validate` prints). */
static void reload_answer(control_t *c, int ok, const char *msg, json_t *lines)
{
    if (ok)
        c->reloads_ok++;
    else
        c->reloads_failed++;
    for (size_t i = 0; i < c->ncur; i++) {
        json_t *a = json_pack("{sbss}", "ok", ok, ok ? "message" : "error", msg);
        if (lines != NULL && json_array_size(lines) > 0)
            json_object_set(a, "errors", lines);
        moat_ctlsock_reply(c->reload_cur[i], a, NULL, NULL);
    }
    c->ncur = 0;
}

static moat_config_t *load_config(const moat_run_opts_t *o, json_t *lines)
{
    moat_config_t *cfg = NULL;
    moat_config_errors_t errs = {0};
    int r = o->config_path ? moat_config_load_file(o->config_path, &cfg, &errs)
                           : moat_config_from_args(o->site_argc, o->site_argv, &cfg, &errs);
    if (r != 0) {
        for (size_t i = 0; i < errs.n; i++) {
            const moat_config_error_t *e = &errs.items[i];
            char line[1200];
            if (e->line > 0)
                snprintf(line, sizeof line, "%s:%d:%d: %s", e->file, e->line, e->col, e->msg);
            else
                snprintf(line, sizeof line, "%s: %s", e->file, e->msg);
            MOAT_ERROR("%s", line);
            if (lines != NULL)
                json_array_append_new(lines, json_string(line));
        }
        moat_config_errors_free(&errs);
        return NULL;
    }
    moat_config_errors_free(&errs);
    return cfg;
}

/* Listening ports the config needs: each TLS address's port, each plain one's, and the HTTP
 * port for redirects when any TLS site exists. One port cannot be both. */
static int plan_listeners(const moat_config_t *cfg, const moat_run_opts_t *o, moat_server_opts_t *s,
                          char *err, size_t errlen)
{
    s->nlistens = 0;
    int any_tls = 0;
    for (size_t i = 0; i < cfg->nsites; i++) {
        for (size_t j = 0; j < cfg->sites[i].naddrs; j++) {
            const moat_site_addr_t *a = &cfg->sites[i].addrs[j];
            int tls = !a->plain_http;
            int port = a->port ? a->port : tls ? o->https_port : o->http_port;
            any_tls |= tls;
            size_t k;
            for (k = 0; k < s->nlistens; k++)
                if (s->listens[k].port == port)
                    break;
            if (k < s->nlistens) {
                if (s->listens[k].tls != tls) {
                    snprintf(err, errlen,
                             "%s:%d:%d: port %d is used for both HTTPS and plain HTTP sites; "
                             "give one of them another port",
                             cfg->source, a->line, a->col, port);
                    return MOAT_EINVAL;
                }
                continue;
            }
            if (s->nlistens == MOAT_MAX_LISTENERS) {
                snprintf(err, errlen, "too many different ports (at most %d)", MOAT_MAX_LISTENERS);
                return MOAT_EINVAL;
            }
            s->listens[s->nlistens].port = port;
            s->listens[s->nlistens].tls = tls;
            s->nlistens++;
        }
    }
    if (any_tls) {
        size_t k;
        for (k = 0; k < s->nlistens; k++)
            if (s->listens[k].port == o->http_port)
                break;
        if (k == s->nlistens && s->nlistens < MOAT_MAX_LISTENERS) {
            s->listens[s->nlistens].port = o->http_port;
            s->listens[s->nlistens].tls = 0;
            s->nlistens++;
        } else if (k < s->nlistens && s->listens[k].tls) {
            snprintf(err, errlen, "port %d is the HTTP port but a site uses it for HTTPS",
                     o->http_port);
            return MOAT_EINVAL;
        }
    }
    return 0;
}

static void on_renew(uv_timer_t *t);

/* Look at the certificates again when the current ones first need it. */
static void schedule_renew(control_t *c)
{
    int64_t next = moat_snapmgr_next_check(c->snap);
    int64_t now = (int64_t)time(NULL);
    int64_t delay = next > now ? next - now : 60;
    if (delay > 86400)
        delay = 86400; /* look again at least daily */
    uv_timer_start(&c->renew_timer, on_renew, (uint64_t)delay * 1000, 0);
}

static int recert(control_t *c)
{
    char err[1100] = "";
    int r = moat_snapmgr_recert(c->snap, err, sizeof err);
    if (r != 0) {
        MOAT_ERROR("%s", err);
        return r;
    }
    schedule_renew(c);
    return 0;
}

static void on_renew(uv_timer_t *t)
{
    control_t *c = t->data;
    int renewed = 0;
    char err[512];
    if (moat_ca_maintain(c->ca, &renewed, err, sizeof err) != 0)
        MOAT_ERROR("internal CA: %s", err);
    if (recert(c) != 0)
        uv_timer_start(&c->renew_timer, on_renew, 60 * 1000, 0);
}

/* ---- news from a shared store ---- */

static void on_news(void *arg, const char *what)
{
    control_t *c = arg;
    if (strcmp(what, "resync") == 0)
        MOAT_INFO("storage: watching the shared store again; reading its certificates afresh");
    else
        MOAT_DEBUG("storage: %s was stored by another instance", what);
    c->news = 1;
}

static void watch_closed(uv_handle_t *h)
{
    control_t *c = h->data;
    c->watch_closing = 0;
}

static void watch_read(control_t *c)
{
    c->news = 0;
    int rc = c->storage->ops->watch_drain(c->storage, on_news, c);
    /* One rebuild for any number of certificates in one read. */
    if (c->news && !c->stopping)
        recert(c);
    if (rc != 0 && c->watching) {
        uv_poll_stop(&c->watch);
        c->watching = 0;
        c->watch_closing = 1;
        uv_close((uv_handle_t *)&c->watch, watch_closed);
    }
}

static void on_watch(uv_poll_t *p, int status, int events)
{
    (void)status;
    (void)events;
    watch_read(p->data);
}

static void on_watch_timer(uv_timer_t *t)
{
    control_t *c = t->data;
    if (c->watching || c->watch_closing || c->stopping)
        return;
    int fd = c->storage->ops->watch_fd(c->storage);
    if (fd < 0 || uv_poll_init_socket(c->loop, &c->watch, fd) != 0)
        return;
    c->watch.data = c;
    uv_poll_start(&c->watch, UV_READABLE, on_watch);
    c->watching = 1;
    watch_read(c); /* a "resync" is waiting after a broken watch */
}

/* The ACME manager stored a certificate: rebuild the snapshot from the current config. */
static void acme_republish(void *data)
{
    recert(data);
}

/* The workers get every snapshot the manager publishes (nothing before they start: they
 * start from the current one). */
static void publish_to_workers(const moat_snapshot_t *s, void *data)
{
    (void)data;
    moat_workers_publish(s);
}

static void reload(control_t *c);

static void reload_done(int status, const char *err, void *data)
{
    control_t *c = data;
    char msg[1200];
    if (status != 0) {
        snprintf(msg, sizeof msg, "%s; still serving the previous configuration", err);
        if (!c->stopping)
            MOAT_ERROR("reload: %s", msg);
        reload_answer(c, 0, msg, NULL);
    } else {
        const moat_runtime_t *rt = moat_snapmgr_current(c->snap)->rt;
        schedule_renew(c);
        moat_resolver_update(c->resolver);
        if (c->acme)
            moat_acmemgr_update(c->acme, rt->config);
        snprintf(msg, sizeof msg, "now serving %zu site(s) from %s", rt->config->nsites,
                 c->opts->config_path);
        MOAT_INFO("reload: %s", msg);
        reload_answer(c, 1, msg, NULL);
    }
    if (!c->stopping)
        moat_system_reloaded();
    if (c->reload_again && !c->stopping) {
        c->reload_again = 0;
        reload(c);
    }
}

/* Damage found while running does not stop serving: the current snapshot is in memory.
 * Certificates cannot be saved or renewed into a damaged file, so the operator must hear it
 * once, clearly, in the log and from `moat health`. A shared PostgreSQL store that does not
 * answer is an outage, not damage: said once per change (storage/postgres.c logs the outage
 * itself and reconnects with backoff), and looked at again at the next check. */
static void check_store(control_t *c)
{
    int shared = moat_storage_is_postgres(c->opts->storage);
    if (c->store_damaged && !shared)
        return;
    if (c->storage->ops->check(c->storage) == 0) {
        if (c->store_damaged) {
            MOAT_INFO("storage: the shared store answers again");
            moat_system_recovered(c->opts->data_dir);
        }
        c->store_damaged = 0;
        return;
    }
    const char *why = moat_storage_last_error(c->storage);
    if (shared) {
        /* storage/postgres.c has logged the outage itself; here it is for `moat health`. */
        if (!c->store_damaged) {
            char line[700];
            snprintf(line, sizeof line, "storage: %s; serving what is in memory", why);
            moat_system_degraded(c->opts->data_dir, line);
        }
        c->store_damaged = 1;
        return;
    }
    c->store_damaged = 1;
    MOAT_ERROR("storage: %s; moat keeps serving what it has in memory, but cannot save or renew "
               "certificates until the file is restored and moat restarted",
               why);
    char line[700];
    snprintf(line, sizeof line, "storage: %s", why);
    moat_system_degraded(c->opts->data_dir, line);
}

static void on_store_timer(uv_timer_t *t)
{
    check_store(t->data);
}

static void reload(control_t *c)
{
    const moat_run_opts_t *o = c->opts;
    if (o->config_path == NULL) {
        MOAT_INFO("reload: the site came from the command line; nothing to re-read");
        for (size_t i = 0; i < c->nnext; i++)
            c->reload_cur[c->ncur++] = c->reload_next[i];
        c->nnext = 0;
        reload_answer(c, 0,
                      "the site came from the command line: there is no site file to "
                      "re-read (restart moat with new arguments instead)",
                      NULL);
        return;
    }
    if (moat_snapmgr_busy(c->snap)) {
        MOAT_INFO("reload: still resolving the previous reload; reading %s again after it",
                  o->config_path);
        c->reload_again = 1;
        return;
    }
    /* The clients that asked for this reload (or while the previous one ran) hear of it. */
    for (size_t i = 0; i < c->nnext; i++)
        c->reload_cur[c->ncur++] = c->reload_next[i];
    c->nnext = 0;
    moat_system_reloading();
    check_store(c);
    MOAT_INFO("reload: reading %s", o->config_path);
    json_t *lines = json_array();
    moat_config_t *cfg = load_config(o, lines);
    char msg[1200];
    if (cfg == NULL) {
        snprintf(msg, sizeof msg, "%s has errors; still serving the previous configuration",
                 o->config_path);
        MOAT_ERROR("reload: %s", msg);
        reload_answer(c, 0, msg, lines);
        json_decref(lines);
        moat_system_reloaded();
        return;
    }
    json_decref(lines);
    moat_server_opts_t plan = {0};
    char err[1024];
    if (plan_listeners(cfg, o, &plan, err, sizeof err) != 0) {
        snprintf(msg, sizeof msg, "%s; still serving the previous configuration", err);
        MOAT_ERROR("reload: %s", msg);
        lines = json_pack("[s]", err);
        reload_answer(c, 0, msg, lines);
        json_decref(lines);
        moat_config_free(cfg);
        moat_system_reloaded();
        return;
    }
    int same = plan.nlistens == c->server.nlistens;
    for (size_t i = 0; same && i < plan.nlistens; i++)
        same = plan.listens[i].port == c->server.listens[i].port &&
               plan.listens[i].tls == c->server.listens[i].tls;
    if (!same)
        MOAT_WARN("reload: the set of listening ports changed; that takes a restart "
                  "(sites on new ports are not served until then)");
    /* Resolving, building and publishing go on in the loop; reload_done reports. */
    moat_snapmgr_load(c->snap, cfg, reload_done, c);
}

static void begin_stop(control_t *c);

static void on_signal(uv_signal_t *s, int signum)
{
    control_t *c = s->data;
    if (signum == SIGUSR1) {
        if (c->acme)
            moat_acmemgr_renew_request(c->acme, c->opts->data_dir);
        return;
    }
    if (signum == SIGHUP) {
        reload(c);
        return;
    }
    begin_stop(c);
}

static void begin_stop(control_t *c)
{
    if (c->stopping)
        return;
    c->stopping = 1;
    moat_system_stopping(c->opts->data_dir);
    /* This loop stops turning now (the workers drain without it): the socket and the metrics
     * endpoint go, so that clients fail at once instead of waiting for an answer (moat health
     * then finds the status file gone). Reloads still waiting are told first. */
    for (size_t i = 0; i < c->nnext; i++)
        c->reload_cur[c->ncur++] = c->reload_next[i];
    c->nnext = 0;
    if (c->ncur > 0)
        reload_answer(c, 0, "moat is stopping", NULL);
    moat_ctlsock_close(c->ctl);
    c->ctl = NULL;
    moat_metricsrv_close(c->metrics);
    c->metrics = NULL;
    MOAT_INFO("stopping: finishing requests in flight (up to %llu s)",
              (unsigned long long)(c->server.grace_ms / 1000));
    uv_stop(c->loop);
}

/* What status and metrics are made of, now. *sum is the caller's (moat_metrics_new). */
static void status_source(control_t *c, moat_metrics_t *sum, moat_status_src_t *src)
{
    moat_workers_metrics(sum);
    uv_update_time(c->loop);
    *src = (moat_status_src_t){
        .config_path = c->opts->config_path,
        .started_unix = c->started_unix,
        .nworkers = c->server.nworkers,
        .snap = moat_snapmgr_current(c->snap),
        .storage = c->storage,
        .storage_error = c->store_damaged ? moat_storage_last_error(c->storage) : NULL,
        .reloads_ok = c->reloads_ok,
        .reloads_failed = c->reloads_failed,
        .sum = sum,
        .window = c->window,
        .now_ms = uv_now(c->loop),
    };
    moat_acmemgr_stats(c->acme, &src->acme_orders, &src->acme_failures, &src->acme_backoff);
}

static json_t *control_status(control_t *c)
{
    moat_metrics_t *sum = moat_metrics_new();
    moat_status_src_t src;
    status_source(c, sum, &src);
    json_t *j = moat_status_json(&src);
    free(sum);
    return j;
}

static void render_metrics(moat_buf_t *out, void *data)
{
    control_t *c = data;
    moat_metrics_t *sum = moat_metrics_new();
    moat_status_src_t src;
    status_source(c, sum, &src);
    moat_status_prometheus(&src, out);
    free(sum);
}

static void on_sample(uv_timer_t *t)
{
    control_t *c = t->data;
    moat_metrics_t *sum = moat_metrics_new();
    moat_workers_metrics(sum);
    moat_status_window_sample(c->window, sum, uv_now(c->loop));
    free(sum);
}

static void stop_after_reply(void *data)
{
    begin_stop(data);
}

/* One request on the control socket (server/ctlproto.h). */
static void on_control(moat_ctlconn_t *k, const moat_ctl_req_t *req, void *data)
{
    control_t *c = data;
    switch (req->cmd) {
    case MOAT_CTL_RELOAD:
        if (c->stopping || c->nnext == MOAT_ARRAY_LEN(c->reload_next) ||
            c->ncur == MOAT_ARRAY_LEN(c->reload_cur)) {
            moat_ctlsock_reply(
                k,
                json_pack("{sbss}", "ok", 0, "error",
                          c->stopping ? "moat is stopping" : "too many reloads waiting; try again"),
                NULL, NULL);
            return;
        }
        c->reload_next[c->nnext++] = k;
        reload(c);
        return;
    case MOAT_CTL_STOP:
        if (req->grace_s >= 0 && !c->stopping)
            c->server.grace_ms = (uint64_t)req->grace_s * 1000; /* read by the workers after
                                                                    the stop's wakeup */
        moat_ctlsock_reply(k,
                           json_pack("{sbsisI}", "ok", 1, "pid", (int)getpid(), "grace",
                                     (json_int_t)(c->server.grace_ms / 1000)),
                           stop_after_reply, c);
        return;
    case MOAT_CTL_RENEW:
        if (c->acme == NULL) {
            moat_ctlsock_reply(k, json_pack("{sbss}", "ok", 0, "error", "ACME is not running"),
                               NULL, NULL);
            return;
        }
        moat_acmemgr_renew(c->acme, req->name[0] ? req->name : NULL, req->force);
        moat_ctlsock_reply(k, json_pack("{sbsi}", "ok", 1, "pid", (int)getpid()), NULL, NULL);
        return;
    case MOAT_CTL_HEALTH:
        moat_ctlsock_reply(k,
                           json_pack("{sbsisisbsbss?}", "ok", !c->stopping, "pid", (int)getpid(),
                                     "workers", c->server.nworkers, "stopping", c->stopping,
                                     "reloading", moat_snapmgr_busy(c->snap), "degraded",
                                     c->store_damaged ? moat_storage_last_error(c->storage) : NULL),
                           NULL, NULL);
        return;
    case MOAT_CTL_STATUS: moat_ctlsock_reply(k, control_status(c), NULL, NULL); return;
    }
}

static void on_tickets(uv_timer_t *t)
{
    control_t *c = t->data;
    int64_t now = (int64_t)time(NULL);
    if (!moat_tickets_shared(c->storage)) {
        moat_snapmgr_rotate_keys(c->snap);
        return;
    }
    /* Shared keys: looked at every minute, so a peer's rotation is followed within one. If
     * the store stays away past an hour, rotate alone (peers then resume fewer sessions). */
    if (moat_tickets_sync(c->storage, c->snap, now) == 0) {
        c->tickets_synced = now;
    } else if (now - c->tickets_synced >= TICKET_ROTATION_MS / 1000) {
        moat_snapmgr_rotate_keys(c->snap);
        c->tickets_synced = now;
    }
}

static void start_done(int status, const char *err, void *data)
{
    control_t *c = data;
    c->started = 1;
    c->start_status = status;
    if (err != NULL)
        snprintf(c->start_err, sizeof c->start_err, "%s", err);
}

static int write_pid_file(control_t *c)
{
    snprintf(c->pid_path, sizeof c->pid_path, "%s/%s", c->opts->data_dir, MOAT_PID_FILE);
    int fd = open(c->pid_path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        MOAT_WARN("cannot write %s: %s (moat reload/stop will not find this process)", c->pid_path,
                  strerror(errno));
        c->pid_path[0] = 0;
        return -1;
    }
    char buf[32];
    int n = snprintf(buf, sizeof buf, "%d\n", (int)getpid());
    ssize_t w = write(fd, buf, (size_t)n);
    (void)w;
    close(fd);
    return 0;
}

/* mkdir -p, the last folder 0700. */
static int make_dir(const char *dir)
{
    char p[4096];
    if (snprintf(p, sizeof p, "%s", dir) >= (int)sizeof p)
        return -1;
    for (char *c = p + 1; *c != '\0'; c++) {
        if (*c != '/')
            continue;
        *c = '\0';
        if (mkdir(p, 0755) != 0 && errno != EEXIST)
            return -1;
        *c = '/';
    }
    return mkdir(p, 0700) == 0 || errno == EEXIST ? 0 : -1;
}

int moat_control_run(const moat_run_opts_t *o)
{
    control_t c = {.opts = o};
    char err[1024] = "";
    int code = MOAT_EXIT_START; /* see system.h: 1 only for configuration errors */
    const moat_runtime_t *rt = NULL;
    SSL_CTX *tls = NULL;

    moat_config_t *cfg = load_config(o, NULL);
    if (cfg == NULL)
        return 1;
    c.server.nworkers = o->workers;
    c.server.bind_addr = o->bind_addr;
    c.server.grace_ms = o->grace_ms;
    if (plan_listeners(cfg, o, &c.server, err, sizeof err) != 0) {
        MOAT_ERROR("%s", err);
        moat_config_free(cfg);
        return 1;
    }
    if (o->access_log && moat_access_log_open(o->access_log) != 0) {
        MOAT_ERROR("cannot open the access log %s: %s", o->access_log, strerror(errno));
        moat_config_free(cfg);
        return MOAT_EXIT_START;
    }
    /* With a shared store the data folder holds only this instance's pid and status files;
     * SQLite's open creates it otherwise. */
    if (moat_storage_is_postgres(o->storage) && make_dir(o->data_dir) != 0)
        MOAT_WARN("cannot create the data folder %s: %s (moat health and moat stop need it)",
                  o->data_dir, strerror(errno));
    if (moat_storage_open(o->storage, o->data_dir, o->storage_key, &c.storage, err, sizeof err) !=
        0) {
        MOAT_ERROR("%s", err);
        moat_config_free(cfg);
        return MOAT_EXIT_START;
    }
    if (moat_ca_open(c.storage, &c.ca, err, sizeof err) != 0) {
        MOAT_ERROR("internal CA: %s", err);
        moat_config_free(cfg);
        goto out;
    }
    c.loop = uv_default_loop();
    uv_timer_init(c.loop, &c.renew_timer);
    uv_timer_init(c.loop, &c.ticket_timer);
    uv_timer_init(c.loop, &c.store_timer);
    c.renew_timer.data = c.ticket_timer.data = c.store_timer.data = &c;
    moat_snapmgr_opts_t so = {.loop = c.loop,
                              .storage = c.storage,
                              .ca = c.ca,
                              .http_port = o->http_port,
                              .https_port = o->https_port,
                              .publish = publish_to_workers};
    c.snap = moat_snapmgr_new(&so);
    /* The first load goes through the loop like any reload (uv_getaddrinfo), but nothing else
     * runs yet, so for the operator it is simply the start: serve, or say why not. */
    moat_snapmgr_load(c.snap, cfg, start_done, &c);
    cfg = NULL; /* the runtime owns it now */
    while (!c.started)
        uv_run(c.loop, UV_RUN_ONCE);
    if (c.start_status != 0) {
        MOAT_ERROR("%s", c.start_err);
        goto out;
    }
    rt = moat_snapmgr_current(c.snap)->rt;
    schedule_renew(&c);
    c.resolver = moat_resolver_new(c.loop, c.snap);
    /* ALPN is fixed before the context exists and stays so: handshakes read it unlocked. */
    moat_h2conn_init();
    tls = moat_tls_server_ctx_new(err, sizeof err);
    if (tls == NULL) {
        MOAT_ERROR("TLS: %s", err);
        goto out;
    }
    c.server.tls = tls;
    if (moat_listen_all(&c.server, err, sizeof err) != 0) {
        MOAT_ERROR("%s", err);
        goto out;
    }
    if (o->metrics_addr != NULL && moat_metricsrv_open(c.loop, o->metrics_addr, render_metrics, &c,
                                                       &c.metrics, err, sizeof err) != 0) {
        MOAT_ERROR("%s", err);
        code = strncmp(err, "--metrics expects", 17) == 0 ? MOAT_EXIT_CONFIG : MOAT_EXIT_START;
        goto out;
    }
    if (c.metrics != NULL)
        MOAT_INFO("metrics on http://%s/metrics", o->metrics_addr);
    /* Ports bound and the database open: root is no longer needed. */
    int dropped = moat_system_drop_privileges(o->data_dir, err, sizeof err);
    if (dropped != 0) {
        MOAT_ERROR("%s", err);
        code = dropped == MOAT_ENOT_FOUND ? MOAT_EXIT_CONFIG : MOAT_EXIT_START;
        goto out;
    }
    write_pid_file(&c);
    /* After the privileges are dropped: the socket belongs to the user moat runs as. */
    /* Without it moat still serves (and the CLI uses signals): a warning, not an error. */
    if (moat_ctlsock_open(c.loop, o->data_dir, on_control, &c, &c.ctl, err, sizeof err) != 0)
        MOAT_WARN("%s", err);
    uv_signal_init(c.loop, &c.sighup);
    uv_signal_init(c.loop, &c.sigterm);
    uv_signal_init(c.loop, &c.sigint);
    c.sighup.data = c.sigterm.data = c.sigint.data = &c;
    uv_signal_start(&c.sighup, on_signal, SIGHUP);
    uv_signal_start(&c.sigterm, on_signal, SIGTERM);
    uv_signal_start(&c.sigint, on_signal, SIGINT);
    if (moat_tickets_shared(c.storage)) {
        /* Before the workers start: the first handshake already uses the shared keys. */
        if (moat_tickets_sync(c.storage, c.snap, (int64_t)time(NULL)) == 0)
            c.tickets_synced = (int64_t)time(NULL);
        uv_timer_start(&c.ticket_timer, on_tickets, TICKET_SYNC_MS, TICKET_SYNC_MS);
    } else {
        if (c.storage->shared)
            MOAT_INFO("tls: session-ticket keys are this instance's own; with --storage-key "
                      "they are shared (sealed) so clients resume on any instance");
        uv_timer_start(&c.ticket_timer, on_tickets, TICKET_ROTATION_MS, TICKET_ROTATION_MS);
    }
    uint64_t check_ms =
        moat_storage_is_postgres(o->storage) ? SHARED_STORE_CHECK_MS : STORE_CHECK_MS;
    uv_timer_start(&c.store_timer, on_store_timer, check_ms, check_ms);
    if (moat_workers_start(&c.server, moat_snapmgr_current(c.snap)) != 0) {
        MOAT_ERROR("cannot start the worker threads");
        goto out;
    }
    for (size_t i = 0; i < c.server.nlistens; i++)
        MOAT_INFO("listening on port %d (%s)", c.server.listens[i].port,
                  c.server.listens[i].tls ? "HTTPS" : "HTTP");
    for (size_t i = 0; i < rt->config->nsites; i++) {
        const moat_site_addr_t *a = &rt->config->sites[i].addrs[0];
        int v6 = a->kind == MOAT_HOST_IPV6;
        MOAT_INFO("serving %s://%s%s%s:%d -> %s", a->plain_http ? "http" : "https", v6 ? "[" : "",
                  a->host, v6 ? "]" : "", moat_runtime_addr_port(rt, a),
                  rt->sites[i].upstreams[0].label);
    }
    moat_acmemgr_opts_t ao = {.email = o->email,
                              .ca_url = o->acme_ca,
                              .ca_root = o->acme_ca_root,
                              .staging = o->acme_staging};
    c.acme = moat_acmemgr_new(c.loop, c.storage, &ao, acme_republish, &c, err, sizeof err);
    if (c.acme == NULL) {
        MOAT_ERROR("ACME: %s", err);
        goto out;
    }
    moat_acmemgr_update(c.acme, rt->config);
    if (moat_storage_is_postgres(o->storage)) {
        uv_timer_init(c.loop, &c.watch_timer);
        c.watch_timer.data = &c;
        uv_timer_start(&c.watch_timer, on_watch_timer, 0, 1000);
    }
    uv_signal_init(c.loop, &c.sigusr1);
    c.sigusr1.data = &c;
    uv_signal_start(&c.sigusr1, on_signal, SIGUSR1);
    c.started_unix = (int64_t)time(NULL);
    c.window = moat_status_window_new();
    uv_timer_init(c.loop, &c.sample_timer);
    c.sample_timer.data = &c;
    on_sample(&c.sample_timer); /* the window starts at zero, now */
    uv_timer_start(&c.sample_timer, on_sample, MOAT_STATUS_SAMPLE_MS, MOAT_STATUS_SAMPLE_MS);
    MOAT_INFO("moat %s ready with %d worker(s)", MOAT_VERSION, o->workers);
    moat_system_ready(o->data_dir, &c.server);
    uv_run(c.loop, UV_RUN_DEFAULT);
    moat_workers_stop();
    code = 0;
    MOAT_INFO("stopped");
out:
    moat_resolver_free(c.resolver);
    if (c.snap != NULL) {
        /* A reload still resolving: its lookups must end before the loop and memory go. */
        moat_snapmgr_cancel(c.snap);
        while (moat_snapmgr_busy(c.snap))
            uv_run(c.loop, UV_RUN_ONCE);
    }
    for (size_t i = 0; i < c.nnext; i++)
        c.reload_cur[c.ncur++] = c.reload_next[i];
    c.nnext = 0;
    if (c.ncur > 0)
        reload_answer(&c, 0, "moat stopped before the reload", NULL);
    moat_ctlsock_close(c.ctl);
    c.ctl = NULL;
    moat_metricsrv_close(c.metrics);
    c.metrics = NULL;
    if (c.window != NULL) {
        uv_close((uv_handle_t *)&c.sample_timer, NULL);
        moat_status_window_free(c.window);
    }
    moat_listen_close_all(&c.server);
    if (c.pid_path[0])
        unlink(c.pid_path);
    if (c.acme) {
        moat_acmemgr_free(c.acme);
        uv_close((uv_handle_t *)&c.sigusr1, NULL);
    }
    if (c.watch_timer.data != NULL)
        uv_close((uv_handle_t *)&c.watch_timer, NULL);
    if (c.watching)
        uv_close((uv_handle_t *)&c.watch, NULL);
    if (c.loop) {
        uv_close((uv_handle_t *)&c.renew_timer, NULL);
        uv_close((uv_handle_t *)&c.ticket_timer, NULL);
        uv_close((uv_handle_t *)&c.store_timer, NULL);
        if (c.sighup.data) {
            uv_close((uv_handle_t *)&c.sighup, NULL);
            uv_close((uv_handle_t *)&c.sigterm, NULL);
            uv_close((uv_handle_t *)&c.sigint, NULL);
        }
        uv_run(c.loop, UV_RUN_NOWAIT);
    }
    moat_snapmgr_free(c.snap);
    moat_sock_thread_cleanup(); /* the ACME client used sockets on this thread */
    if (tls)
        SSL_CTX_free(tls);
    if (c.ca)
        moat_ca_free(c.ca);
    if (c.storage)
        c.storage->ops->close(c.storage);
    return code;
}
