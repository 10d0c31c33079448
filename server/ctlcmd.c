/* The command-line side of the control socket (server/ctlcmd.h). Blocking calls: this runs
 * in `moat reload|stop|...`, not in the server. */
#include "ctlcmd.h"
#include "moat/common.h"

#include <errno.h>
#include <poll.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait for fd to be ready for events until deadline: 1, 0 on timeout, -1 on error. */
static int wait_fd(int fd, short events, int64_t deadline)
{
    for (;;) {
        int64_t left = deadline - mono_ms();
        if (left <= 0)
            return 0;
        struct pollfd p = {.fd = fd, .events = events};
        int r = poll(&p, 1, (int)MOAT_MIN(left, 1000));
        if (r > 0)
            return 1;
        if (r < 0 && errno != EINTR)
            return -1;
    }
}

int moat_ctl_call(const char *data_dir, const moat_ctl_req_t *req, int timeout_ms, json_t **answer,
                  char *err, size_t errlen)
{
    *answer = NULL;
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    int n = snprintf(sun.sun_path, sizeof sun.sun_path, "%s/%s", data_dir, MOAT_CTL_SOCKET);
    if (n < 0 || (size_t)n >= sizeof sun.sun_path) {
        snprintf(err, errlen, "the control socket path under %s is too long", data_dir);
        return MOAT_ENOT_FOUND;
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        return MOAT_EIO;
    }
    int rc = MOAT_EIO;
    char *line = NULL, *in = NULL;
    if (connect(fd, (struct sockaddr *)&sun, sizeof sun) != 0) {
        int e = errno;
        snprintf(err, errlen, "cannot connect to %s: %s%s", sun.sun_path, strerror(e),
                 e == EACCES ? " (run it as the user moat runs as, or root)" : "");
        rc = e == ENOENT || e == ECONNREFUSED ? MOAT_ENOT_FOUND : MOAT_EIO;
        goto out;
    }
    int64_t deadline = mono_ms() + timeout_ms;
    line = moat_ctl_format(req);
    size_t len = strlen(line), off = 0;
    while (off < len) {
        ssize_t w = send(fd, line + off, len - off, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0) {
            snprintf(err, errlen, "cannot send to %s: %s", sun.sun_path, strerror(errno));
            goto out;
        }
        off += (size_t)w;
    }
    shutdown(fd, SHUT_WR);
    size_t cap = 65536, got = 0;
    in = moat_xmalloc(cap + 1);
    for (;;) {
        int r = wait_fd(fd, POLLIN, deadline);
        if (r == 0) {
            snprintf(err, errlen, "no answer from %s within %d s", sun.sun_path, timeout_ms / 1000);
            goto out;
        }
        if (r < 0) {
            snprintf(err, errlen, "poll: %s", strerror(errno));
            goto out;
        }
        if (got == cap) {
            if (cap >= (16u << 20)) {
                snprintf(err, errlen, "the answer is too long");
                goto out;
            }
            cap *= 2;
            in = realloc(in, cap + 1);
            if (in == NULL)
                abort();
        }
        ssize_t k = recv(fd, in + got, cap - got, 0);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0) {
            snprintf(err, errlen, "cannot read from %s: %s", sun.sun_path, strerror(errno));
            goto out;
        }
        if (k == 0)
            break;
        got += (size_t)k;
    }
    json_error_t je;
    *answer = json_loadb(in, got, 0, &je);
    if (*answer == NULL || !json_is_object(*answer)) {
        snprintf(err, errlen, "moat answered something that is not a JSON object (%s)",
                 got == 0 ? "nothing" : je.text);
        json_decref(*answer);
        *answer = NULL;
        goto out;
    }
    rc = 0;
out:
    free(line);
    free(in);
    close(fd);
    return rc;
}

/* --- `moat status` ------------------------------------------------------------------------ */

#define GREEN  "\033[32m"
#define RED    "\033[31m"
#define YELLOW "\033[33m"
#define BOLD   "\033[1m"
#define RESET  "\033[0m"

static long long geti(const json_t *o, const char *k)
{
    return (long long)json_integer_value(json_object_get(o, k));
}

static const char *gets(const json_t *o, const char *k, const char *dflt)
{
    const char *s = json_string_value(json_object_get(o, k));
    return s ? s : dflt;
}

/* s cut to at most w columns (with "~" at the cut), into buf. */
static const char *fit(const char *s, size_t w, char *buf, size_t cap)
{
    size_t n = strlen(s);
    if (w + 1 > cap)
        w = cap - 1;
    if (n <= w) {
        memcpy(buf, s, n + 1);
        return buf;
    }
    memcpy(buf, s, w - 1);
    buf[w - 1] = '~';
    buf[w] = 0;
    return buf;
}

static void duration(long long s, char *buf, size_t cap)
{
    if (s < 60)
        snprintf(buf, cap, "%llds", s);
    else if (s < 3600)
        snprintf(buf, cap, "%lldm%02llds", s / 60, s % 60);
    else if (s < 86400)
        snprintf(buf, cap, "%lldh%02lldm", s / 3600, s / 60 % 60);
    else
        snprintf(buf, cap, "%lldd%02lldh", s / 86400, s / 3600 % 24);
}

static void date(long long t, char *buf, size_t cap)
{
    time_t tt = (time_t)t;
    struct tm tm;
    gmtime_r(&tt, &tm);
    strftime(buf, cap, "%Y-%m-%d %H:%MZ", &tm);
}

/* "prefix text" folded at 80 columns, continuation lines indented like the text; at most
 * three lines, the last cut with "~". */
static void wrap(FILE *out, const char *prefix, size_t indent, const char *text)
{
    size_t width = 80 - indent, n = strlen(text);
    fputs(prefix, out);
    if (n == 0)
        fputc('\n', out);
    for (int line = 0; n > 0; line++) {
        if (line > 0)
            fprintf(out, "%*s", (int)indent, "");
        if (n <= width) {
            fprintf(out, "%s\n", text);
            return;
        }
        if (line == 2) {
            fprintf(out, "%.*s~\n", (int)(width - 1), text);
            return;
        }
        size_t cut = width;
        while (cut > width / 2 && text[cut] != ' ')
            cut--;
        if (text[cut] != ' ')
            cut = width;
        fprintf(out, "%.*s\n", (int)cut, text);
        text += cut;
        n -= cut;
        while (*text == ' ') {
            text++;
            n--;
        }
    }
}

static const char *col(int color, const char *c)
{
    return color ? c : "";
}

static void print_cert(const json_t *c, FILE *out, int color)
{
    char a[100], b[100], line[200];
    if (c == NULL || json_is_null(c)) {
        fprintf(out, "    certificate: none (plain HTTP)\n");
        return;
    }
    const char *state = gets(c, "state", "?");
    if (strcmp(state, "pending") == 0) {
        snprintf(line, sizeof line, "pending (no certificate yet)");
    } else {
        /* Yellow when it should have been renewed by now, or expires within three days. */
        long long days = geti(c, "days_left"), next = geti(c, "next_renewal");
        int warn = color && (days < 3 || (next > 0 && next < (long long)time(NULL)));
        snprintf(line, sizeof line, "%s%lld days left%s, %s", col(warn, YELLOW), days,
                 col(warn, RESET), fit(gets(c, "issuer", "?"), 36, a, sizeof a));
    }
    fprintf(out, "    certificate: %s\n", line);
    json_t *nr = json_object_get(c, "next_renewal"), *na = json_object_get(c, "next_attempt");
    if (nr || na) {
        date(json_integer_value(na ? na : nr), b, sizeof b);
        fprintf(out, "    %s %s\n", na ? "next attempt:" : "renews:      ", b);
    }
    const char *e = gets(c, "last_error", NULL);
    if (e != NULL) {
        snprintf(line, sizeof line, "    %slast ACME error:%s ", col(color, RED),
                 col(color, RESET));
        wrap(out, line, 21, e);
    }
}

void moat_ctl_print_status(const json_t *st, FILE *out, int color)
{
    char up[32], a[100], b[100];
    duration(geti(st, "uptime_s"), up, sizeof up);
    fprintf(out, "%smoat %s%s  pid %lld  up %s  %lld worker(s)\n", col(color, BOLD),
            gets(st, "version", "?"), col(color, RESET), geti(st, "pid"), up, geti(st, "workers"));
    fprintf(out, "config   %s\n", fit(gets(st, "config", "?"), 70, a, sizeof a));
    const json_t *sto = json_object_get(st, "storage");
    const json_t *rl = json_object_get(st, "reloads");
    int sok = json_is_true(json_object_get(sto, "ok"));
    fprintf(out, "storage  %s%s%s%s%s   reloads %lld ok, %lld failed\n",
            col(color, sok ? GREEN : RED), sok ? "ok" : "DAMAGED", col(color, RESET),
            sok ? "" : ": ", sok ? "" : fit(gets(sto, "error", ""), 30, a, sizeof a),
            geti(rl, "ok"), geti(rl, "failed"));
    const json_t *cn = json_object_get(st, "connections");
    fprintf(out, "clients  %lld HTTP/1.1, %lld HTTP/2, %lld websocket(s)\n", geti(cn, "http1"),
            geti(cn, "http2"), geti(cn, "websocket"));
    fprintf(out, "requests %lld total, %.2f/s over the last %llds\n", geti(st, "requests"),
            json_number_value(json_object_get(st, "requests_per_s")), geti(st, "window_s"));
    const json_t *sites = json_object_get(st, "sites");
    fprintf(out, "\n%s%-36s %8s %7s %7s %7s%s\n", col(color, BOLD), "SITE", "REQUESTS", "2xx",
            "4xx", "5xx", col(color, RESET));
    size_t i;
    json_t *s;
    json_array_foreach(sites, i, s)
    {
        const json_t *by = json_object_get(s, "by_status");
        fprintf(out, "%-36s %8lld %7lld %7lld %7lld\n", fit(gets(s, "name", "?"), 36, a, sizeof a),
                geti(s, "requests"), geti(by, "2xx"), geti(by, "4xx"), geti(by, "5xx"));
        print_cert(json_object_get(s, "certificate"), out, color);
    }
    const json_t *ups = json_object_get(st, "upstreams");
    fprintf(out, "\n%s%-26s %-5s %6s %6s %5s %5s %8s %6s%s\n", col(color, BOLD), "UPSTREAM",
            "STATE", "P50", "P99", "OPEN", "POOL", "REQUESTS", "FAILS", col(color, RESET));
    json_array_foreach(ups, i, s)
    {
        int isup = json_is_true(json_object_get(s, "up"));
        char p50[16] = "-", p99[16] = "-";
        if (json_object_get(s, "p50_ms")) {
            snprintf(p50, sizeof p50, "%lldms", geti(s, "p50_ms"));
            snprintf(p99, sizeof p99, "%lldms", geti(s, "p99_ms"));
        }
        fprintf(out, "%-26s %s%-5s%s %6s %6s %5lld %5lld %8lld %6lld\n",
                fit(gets(s, "name", "?"), 26, a, sizeof a), col(color, isup ? GREEN : RED),
                isup ? "up" : "down", col(color, RESET), p50, p99, geti(s, "open"),
                geti(s, "pooled"), geti(s, "requests"), geti(s, "failures"));
        const char *e = gets(s, "last_error", NULL);
        if (e != NULL) {
            char ago[32];
            duration(geti(s, "last_error_age_s"), ago, sizeof ago);
            snprintf(b, sizeof b, "%s (%s ago)", e, ago);
            wrap(out, "    last error: ", 16, b);
        }
    }
}
