/* moat: automatic HTTPS in front of Open WebUI and any HTTP app. Command-line dispatch. */
#include "certcmd.h"
#include "moat/common.h"
#include "moat/config.h"
#include "acmemgr.h"
#include "control.h"
#include "ctlcmd.h"
#include "moat/log.h"
#include "system.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_DATA_DIR "/var/lib/moat"
#define DEFAULT_SITE     "localhost"
#define DEFAULT_UPSTREAM "127.0.0.1:8080"

static const char usage_text[] =
    "moat " MOAT_VERSION " - automatic HTTPS for Open WebUI and any HTTP app\n"
    "\n"
    "Usage:\n"
    "  moat run [SITE UPSTREAM [key=value ...]] [options]   serve sites (default command)\n"
    "  moat validate [--config FILE]      check a site file and print what would be served\n"
    "  moat reload [--data DIR]           re-read the site file of the running moat; its\n"
    "                                     errors are printed and the exit status is 1\n"
    "  moat stop [--data DIR] [--grace S] stop the running moat gracefully\n"
    "  moat health [--data DIR]           exit 0 when the running moat serves (healthchecks)\n"
    "  moat status [--data DIR] [--json]  sites, certificates, upstreams, clients, rates\n"
    "  moat ca-root [--data DIR]          print the internal root certificate (PEM)\n"
    "  moat trust [--data DIR]            add the internal root to the system trust store\n"
    "  moat untrust [--data DIR]          remove it again\n"
    "  moat certs [--data DIR] [--storage STORE] [--config FILE]  list certificates,\n"
    "                                     renewals, pending names\n"
    "  moat renew [NAME] [--force]        ask the running moat to renew ACME certificates now\n"
    "  moat storage copy --from STORE --to STORE [--storage-key FILE]  copy certificates and\n"
    "                                     settings between stores (safe to repeat)\n"
    "  moat version | moat help\n"
    "\n"
    "Options of run:\n"
    "  --config FILE        site file (default ./Moatfile, then /etc/moat/Moatfile)\n"
    "  --data DIR           data folder (default $MOAT_DATA or " DEFAULT_DATA_DIR ")\n"
    "  --storage STORE      where certificates live (default $MOAT_STORAGE, else\n"
    "                       DATA/moat.db): sqlite:DIR, or a store several moats share:\n"
    "                       postgres://USER@HOST:5432/DB?sslmode=verify-full&sslrootcert=FILE\n"
    "                       (password from the URL, $MOAT_STORAGE_PASSWORD or $PGPASSFILE)\n"
    "  --storage-key FILE   seal private keys and settings in the store with AES-256-GCM\n"
    "                       under this key (default $MOAT_STORAGE_KEY; created 0600 if absent)\n"
    "  --http-port N        plain HTTP port (default 80)\n"
    "  --https-port N       HTTPS port (default 443)\n"
    "  --listen ADDR        listen on this address only (default: all)\n"
    "  --workers N          event-loop threads (default: one per CPU)\n"
    "  --grace SECONDS      time requests in flight get to finish on stop (default 30)\n"
    "  --access-log FILE    access log, one JSON line per request (default stdout, - too;\n"
    "                       off: none)\n"
    "  --log-level LEVEL    debug, info, warn or error (default info)\n"
    "  --email ADDR         ACME account contact (a site's email= overrides it)\n"
    "  --acme-ca URL        ACME directory (default Let's Encrypt production)\n"
    "  --acme-ca-root PEM   extra trust anchor for the ACME directory's HTTPS\n"
    "  --acme-staging       use Let's Encrypt's staging CA\n"
    "  --user NAME          started as root: run as NAME once the ports are bound (default\n"
    "                       moat, when that user exists)\n"
    "  --metrics ADDR:PORT  serve Prometheus metrics at http://ADDR:PORT/metrics (off by\n"
    "                       default; keep it on loopback or a private network)\n"
    "\n"
    "A site file has one site per line: ADDRESS[,ADDRESS...] UPSTREAM[,UPSTREAM...] "
    "[key=value ...]\n"
    "  chat.example.com  127.0.0.1:8080\n"
    "With no site file and no SITE argument moat serves: " DEFAULT_SITE " " DEFAULT_UPSTREAM "\n";

typedef struct {
    const char *config;
    const char *data;
    const char *storage, *storage_key;
    const char *from, *to; /* storage copy */
    const char *listen;
    const char *access_log;
    const char *email, *acme_ca, *acme_ca_root;
    int acme_staging, force, json, grace_set;
    const char *user;
    const char *metrics;
    int http_port, https_port, workers;
    uint64_t grace_ms;
    int npos;
    char *pos[64];
    int help;
} cli_t;

static int parse_int(const char *flag, const char *v, int lo, int hi, int *out)
{
    char *end;
    errno = 0;
    long n = strtol(v, &end, 10);
    if (errno || *end || n < lo || n > hi) {
        fprintf(stderr, "moat: %s expects a number from %d to %d, got '%s'\n", flag, lo, hi, v);
        return -1;
    }
    *out = (int)n;
    return 0;
}

static int parse_cli(int argc, char **argv, cli_t *c)
{
    for (int i = 0; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            c->help = 1;
            continue;
        }
        if (strcmp(a, "--acme-staging") == 0 || strcmp(a, "--force") == 0) {
            *(a[2] == 'a' ? &c->acme_staging : &c->force) = 1;
            continue;
        }
        if (strcmp(a, "--json") == 0) {
            c->json = 1;
            continue;
        }
        if (strncmp(a, "--", 2) != 0) {
            if (c->npos == (int)MOAT_ARRAY_LEN(c->pos)) {
                fprintf(stderr, "moat: too many arguments\n");
                return -1;
            }
            c->pos[c->npos++] = argv[i];
            continue;
        }
        if (v == NULL) {
            fprintf(stderr, "moat: %s needs a value (see moat help)\n", a);
            return -1;
        }
        int n;
        i++;
        if (strcmp(a, "--config") == 0) {
            c->config = v;
        } else if (strcmp(a, "--data") == 0) {
            c->data = v;
        } else if (strcmp(a, "--storage") == 0) {
            c->storage = v;
        } else if (strcmp(a, "--storage-key") == 0) {
            c->storage_key = v;
        } else if (strcmp(a, "--from") == 0) {
            c->from = v;
        } else if (strcmp(a, "--to") == 0) {
            c->to = v;
        } else if (strcmp(a, "--listen") == 0) {
            c->listen = v;
        } else if (strcmp(a, "--access-log") == 0) {
            c->access_log = v;
        } else if (strcmp(a, "--email") == 0) {
            c->email = v;
        } else if (strcmp(a, "--acme-ca") == 0) {
            c->acme_ca = v;
        } else if (strcmp(a, "--acme-ca-root") == 0) {
            c->acme_ca_root = v;
        } else if (strcmp(a, "--user") == 0) {
            c->user = v;
        } else if (strcmp(a, "--metrics") == 0) {
            c->metrics = v;
        } else if (strcmp(a, "--http-port") == 0) {
            if (parse_int(a, v, 1, 65535, &c->http_port))
                return -1;
        } else if (strcmp(a, "--https-port") == 0) {
            if (parse_int(a, v, 1, 65535, &c->https_port))
                return -1;
        } else if (strcmp(a, "--workers") == 0) {
            if (parse_int(a, v, 1, 64, &c->workers))
                return -1;
        } else if (strcmp(a, "--grace") == 0) {
            if (parse_int(a, v, 0, 3600, &n))
                return -1;
            c->grace_ms = (uint64_t)n * 1000;
            c->grace_set = 1;
        } else if (strcmp(a, "--log-level") == 0) {
            if (moat_log_parse_level(v, &moat_log_min_level) != 0) {
                fprintf(stderr, "moat: --log-level expects debug, info, warn or error, got '%s'\n",
                        v);
                return -1;
            }
        } else {
            fprintf(stderr, "moat: unknown option '%s' (see moat help)\n", a);
            return -1;
        }
    }
    return 0;
}

static const char *data_dir(const cli_t *c)
{
    if (c->data)
        return c->data;
    const char *env = getenv("MOAT_DATA");
    return env && *env ? env : DEFAULT_DATA_DIR;
}

/* --storage, else MOAT_STORAGE, else NULL (the SQLite file in the data folder). */
static const char *storage_spec(const cli_t *c)
{
    if (c->storage)
        return c->storage;
    const char *env = getenv("MOAT_STORAGE");
    return env && *env ? env : NULL;
}

static const char *storage_key(const cli_t *c)
{
    if (c->storage_key)
        return c->storage_key;
    const char *env = getenv("MOAT_STORAGE_KEY");
    return env && *env ? env : NULL;
}

static int file_exists(const char *p)
{
    struct stat st;
    return stat(p, &st) == 0;
}

/* The site file to use when none was named: ./Moatfile, then /etc/moat/Moatfile. */
static const char *default_config(void)
{
    if (file_exists("Moatfile"))
        return "Moatfile";
    if (file_exists("/etc/moat/Moatfile"))
        return "/etc/moat/Moatfile";
    return NULL;
}

static int cmd_run(cli_t *c)
{
    static char *default_site[] = {DEFAULT_SITE, DEFAULT_UPSTREAM};
    moat_run_opts_t o = {
        .data_dir = data_dir(c),
        .storage = storage_spec(c),
        .storage_key = storage_key(c),
        .bind_addr = c->listen,
        .access_log = c->access_log,
        .http_port = c->http_port ? c->http_port : 80,
        .https_port = c->https_port ? c->https_port : 443,
        .workers = c->workers,
        .grace_ms = c->grace_ms,
        .email = c->email,
        .acme_ca = c->acme_ca,
        .acme_ca_root = c->acme_ca_root,
        .acme_staging = c->acme_staging,
        .metrics_addr = c->metrics,
    };
    if (c->npos > 0) {
        if (c->config) {
            fprintf(stderr, "moat: give either SITE UPSTREAM or --config, not both\n");
            return 1;
        }
        o.site_argc = c->npos;
        o.site_argv = c->pos;
    } else {
        o.config_path = c->config ? c->config : default_config();
        if (o.config_path == NULL) {
            o.site_argc = 2;
            o.site_argv = default_site;
        }
    }
    moat_system_set_user(c->user);
    if (o.workers == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        o.workers = n > 0 ? (int)MOAT_MIN(n, 64) : 1;
    }
    return moat_control_run(&o);
}

static int cmd_validate(cli_t *c)
{
    const char *path = c->config ? c->config : default_config();
    moat_config_t *cfg = NULL;
    moat_config_errors_t errs = {0};
    int r;
    if (c->npos > 0)
        r = moat_config_from_args(c->npos, c->pos, &cfg, &errs);
    else if (path != NULL)
        r = moat_config_load_file(path, &cfg, &errs);
    else {
        fprintf(stderr, "moat: no site file (./Moatfile or /etc/moat/Moatfile); name one with "
                        "--config\n");
        return 1;
    }
    if (r != 0) {
        moat_config_errors_print(&errs, stderr);
        moat_config_errors_free(&errs);
        return 1;
    }
    moat_config_print(cfg, stdout);
    moat_config_free(cfg);
    return 0;
}

static pid_t read_pid(const char *dir)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, MOAT_PID_FILE);
    FILE *f = fopen(path, "r");
    if (f == NULL) {
        fprintf(stderr, "moat: no running moat found (%s: %s); is it running with --data %s?\n",
                path, strerror(errno), dir);
        return -1;
    }
    int pid = -1;
    if (fscanf(f, "%d", &pid) != 1 || pid <= 1)
        pid = -1;
    fclose(f);
    if (pid < 0 || kill(pid, 0) != 0) {
        fprintf(stderr, "moat: %s names no running process; moat is not running\n", path);
        return -1;
    }
    return pid;
}

/* Whether pid still runs: a zombie (exited, not yet reaped by its parent) does not. */
static int process_alive(pid_t pid)
{
    if (kill(pid, 0) != 0)
        return 0;
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", (int)pid);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return 1;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    const char *paren = strrchr(buf, ')');
    return !(paren && paren[1] == ' ' && paren[2] == 'Z');
}

/* Wait for a stopping process to end: up to its grace period plus a margin. */
static int wait_stopped(pid_t pid, uint64_t grace_ms)
{
    uint64_t tries = (grace_ms + 10000) / 100;
    for (uint64_t i = 0; i < tries; i++) {
        if (!process_alive(pid)) {
            printf("moat: process %d stopped\n", (int)pid);
            return 0;
        }
        struct timespec ts = {0, 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    fprintf(stderr, "moat: process %d is still running after %llu s\n", (int)pid,
            (unsigned long long)(tries / 10));
    return 1;
}

/* Ask the running moat over DATA/control.sock (server/ctlproto.h). Returns the exit status, or
 * -1 when there is no control socket: the caller then uses the pid file and a signal. */
static int ctl(cli_t *c, moat_ctl_cmd_t cmd)
{
    moat_ctl_req_t req = {.cmd = cmd, .grace_s = -1, .force = c->force};
    if (cmd == MOAT_CTL_STOP && c->grace_set)
        req.grace_s = (int)(c->grace_ms / 1000);
    if (cmd == MOAT_CTL_RENEW && c->npos > 0)
        snprintf(req.name, sizeof req.name, "%s", c->pos[0]);
    json_t *a = NULL;
    char err[600];
    /* A reload waits for its upstream names to resolve. */
    int r = moat_ctl_call(data_dir(c), &req, cmd == MOAT_CTL_RELOAD ? 60000 : 10000, &a, err,
                          sizeof err);
    if (r == MOAT_ENOT_FOUND) {
        if (cmd == MOAT_CTL_STATUS) {
            fprintf(stderr,
                    "moat: %s; moat status needs the control socket (is moat running "
                    "with --data %s?)\n",
                    err, data_dir(c));
            return 1;
        }
        char pidfile[4096];
        snprintf(pidfile, sizeof pidfile, "%s/%s", data_dir(c), MOAT_PID_FILE);
        if (cmd == MOAT_CTL_HEALTH || !file_exists(pidfile))
            return -1; /* healthchecks stay quiet; without a pid file nothing runs: the
                          signal path says so */
        fprintf(stderr, "moat: no control socket (%s); using the pid file and a signal%s\n", err,
                req.grace_s >= 0 ? " (--grace cannot travel with a signal: the running moat "
                                   "keeps its own)"
                                 : "");
        return -1;
    }
    if (r != 0) {
        fprintf(stderr, "moat: %s\n", err);
        return 1;
    }
    int ok = json_is_true(json_object_get(a, "ok"));
    const char *msg = json_string_value(json_object_get(a, ok ? "message" : "error"));
    int code = ok ? 0 : 1;
    if (!ok) {
        size_t i;
        json_t *line;
        json_array_foreach(json_object_get(a, "errors"), i, line)
            fprintf(stderr, "%s\n", json_string_value(line));
        if (cmd == MOAT_CTL_RELOAD)
            fprintf(stderr, "moat: reload failed: %s\n", msg ? msg : "?");
        else if (cmd != MOAT_CTL_HEALTH)
            fprintf(stderr, "moat: %s\n", msg ? msg : "the running moat refused");
    }
    pid_t pid = (pid_t)json_integer_value(json_object_get(a, "pid"));
    switch (cmd) {
    case MOAT_CTL_RELOAD:
        if (ok)
            printf("moat: reloaded: %s\n", msg ? msg : "");
        break;
    case MOAT_CTL_STOP:
        if (ok)
            code =
                wait_stopped(pid, (uint64_t)json_integer_value(json_object_get(a, "grace")) * 1000);
        break;
    case MOAT_CTL_RENEW:
        if (ok)
            printf("moat: asked process %d to renew %s%s; moat status and its log say what "
                   "happens\n",
                   (int)pid, c->npos > 0 ? c->pos[0] : "all ACME certificates",
                   c->force ? " (forced)" : "");
        break;
    case MOAT_CTL_HEALTH:
        if (!ok) {
            fprintf(stderr, "moat: process %d is stopping\n", (int)pid);
            break;
        }
        /* The control thread answered; the listener check below shows the workers serve. */
        code = moat_system_health(data_dir(c), 3000);
        break;
    case MOAT_CTL_STATUS:
        if (c->json) {
            json_dumpf(a, stdout, JSON_INDENT(2) | JSON_REAL_PRECISION(6));
            fputc('\n', stdout);
        } else {
            moat_ctl_print_status(a, stdout, isatty(1));
        }
        break;
    }
    json_decref(a);
    return code;
}

static int cmd_signal(cli_t *c, int sig)
{
    int r = ctl(c, sig == SIGHUP ? MOAT_CTL_RELOAD : MOAT_CTL_STOP);
    if (r >= 0)
        return r;
    pid_t pid = read_pid(data_dir(c));
    if (pid < 0)
        return 1;
    if (kill(pid, sig) != 0) {
        fprintf(stderr, "moat: cannot signal process %d: %s\n", (int)pid, strerror(errno));
        return 1;
    }
    if (sig == SIGHUP) {
        printf("moat: asked process %d to reload; its log says whether the new file was taken\n",
               (int)pid);
        return 0;
    }
    /* Wait for the stop to finish (the grace period plus a margin). */
    for (int i = 0; i < 400; i++) {
        if (!process_alive(pid)) {
            printf("moat: process %d stopped\n", (int)pid);
            return 0;
        }
        struct timespec ts = {0, 100 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    fprintf(stderr, "moat: process %d is still running after 40 s\n", (int)pid);
    return 1;
}

/* `moat renew [NAME] [--force]`: leave the request in the data folder and signal the running
 * moat (see MOAT_ACME_RENEW_REQUEST). */
static int cmd_renew(cli_t *c)
{
    int r = ctl(c, MOAT_CTL_RENEW);
    if (r >= 0)
        return r;
    const char *dir = data_dir(c);
    pid_t pid = read_pid(dir);
    if (pid < 0)
        return 1;
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, MOAT_ACME_RENEW_REQUEST);
    FILE *f = fopen(path, "w");
    if (f == NULL ||
        fprintf(f, "%s\n%s\n", c->npos > 0 ? c->pos[0] : "*", c->force ? "force" : "normal") < 0) {
        fprintf(stderr, "moat: cannot write %s: %s\n", path, strerror(errno));
        if (f)
            fclose(f);
        return 1;
    }
    fclose(f);
    if (kill(pid, SIGUSR1) != 0) {
        fprintf(stderr, "moat: cannot signal process %d: %s\n", (int)pid, strerror(errno));
        return 1;
    }
    printf("moat: asked process %d to renew %s%s; its log says what happens\n", (int)pid,
           c->npos > 0 ? c->pos[0] : "all ACME certificates", c->force ? " (forced)" : "");
    return 0;
}

int main(int argc, char **argv)
{
    signal(SIGPIPE, SIG_IGN); /* a peer that went away is an error return, not a signal */
    /* libuv's thread pool runs the name lookups (server/resolver.c): a lookup lost in DNS
     * holds a thread for glibc's timeouts (5 s per try), and the resolver starts others beside
     * it. More threads than libuv's 4, unless the environment says how many. */
    setenv("UV_THREADPOOL_SIZE", "16", 0);
    const char *cmd = argc > 1 ? argv[1] : "run";
    int first = 2;
    if (argc > 1 && strncmp(argv[1], "--", 2) == 0 && strcmp(argv[1], "--help") != 0 &&
        strcmp(argv[1], "--version") != 0) {
        cmd = "run"; /* `moat --config X` means run */
        first = 1;
    }
    cli_t c = {0};
    c.grace_ms = 30000;
    if (strcmp(cmd, "help") == 0 || strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0) {
        fputs(usage_text, stdout);
        return 0;
    }
    if (strcmp(cmd, "version") == 0 || strcmp(cmd, "--version") == 0) {
        printf("moat %s\n", MOAT_VERSION);
        return 0;
    }
    if (parse_cli(argc - first, argv + first, &c) != 0)
        return 2;
    if (c.help) {
        fputs(usage_text, stdout);
        return 0;
    }
    moat_cmd_set_storage(storage_spec(&c), storage_key(&c));
    if (strcmp(cmd, "run") == 0)
        return cmd_run(&c);
    if (strcmp(cmd, "validate") == 0)
        return cmd_validate(&c);
    if (strcmp(cmd, "reload") == 0)
        return cmd_signal(&c, SIGHUP);
    if (strcmp(cmd, "stop") == 0)
        return cmd_signal(&c, SIGTERM);
    if (strcmp(cmd, "health") == 0) {
        int r = ctl(&c, MOAT_CTL_HEALTH);
        return r >= 0 ? r : moat_system_health(data_dir(&c), 3000);
    }
    if (strcmp(cmd, "status") == 0)
        return ctl(&c, MOAT_CTL_STATUS);
    if (strcmp(cmd, "ca-root") == 0)
        return moat_cmd_ca_root(data_dir(&c));
    if (strcmp(cmd, "trust") == 0)
        return moat_cmd_trust(data_dir(&c), 1);
    if (strcmp(cmd, "untrust") == 0)
        return moat_cmd_trust(data_dir(&c), 0);
    if (strcmp(cmd, "renew") == 0)
        return cmd_renew(&c);
    if (strcmp(cmd, "storage") == 0) {
        if (c.npos != 1 || strcmp(c.pos[0], "copy") != 0) {
            fprintf(stderr, "moat: usage: moat storage copy --from STORE --to STORE\n");
            return 2;
        }
        return moat_cmd_storage_copy(c.from, c.to, data_dir(&c));
    }
    if (strcmp(cmd, "certs") == 0)
        return moat_cmd_certs(data_dir(&c), c.config ? c.config : default_config());
    fprintf(stderr, "moat: unknown command '%s'\n\n%s", cmd, usage_text);
    return 2;
}
