/* Error/event log and access log (include/moat/log.h). Each line is written with a single
 * write so lines from several threads never interleave. */
#include "moat/log.h"
#include "moat/common.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

moat_log_level_t moat_log_min_level = MOAT_LOG_INFO;
static int access_fd = 1; /* -1: the access log is off */
/* Where stderr goes, found out on the first line: a terminal (readable lines with the time),
 * the journal (readable lines with a priority prefix the journal turns into the entry's
 * priority, sd-daemon(3); it adds the time itself), or anything else (JSON lines). */
enum { OUT_UNKNOWN, OUT_JSON, OUT_TTY, OUT_JOURNAL };
static int stderr_kind = OUT_UNKNOWN;

static const char *level_names[] = {"debug", "info", "warn", "error"};
/* syslog priorities for the journal: debug 7, info 6, warning 4, err 3. */
static const int level_priorities[] = {7, 6, 4, 3};

/* systemd sets JOURNAL_STREAM=DEV:INODE to the stream it connected to stdout/stderr; only
 * when stderr is still that stream (not redirected since) is it the journal. */
static int stderr_is_journal(void)
{
    const char *e = getenv("JOURNAL_STREAM");
    unsigned long long dev, ino;
    struct stat st;
    if (e == NULL || sscanf(e, "%llu:%llu", &dev, &ino) != 2 || fstat(2, &st) != 0)
        return 0;
    return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

static int stderr_output(void)
{
    if (stderr_kind == OUT_UNKNOWN)
        stderr_kind = isatty(2) ? OUT_TTY : stderr_is_journal() ? OUT_JOURNAL : OUT_JSON;
    return stderr_kind;
}

int moat_log_parse_level(const char *s, moat_log_level_t *out)
{
    for (size_t i = 0; i < MOAT_ARRAY_LEN(level_names); i++) {
        if (strcmp(s, level_names[i]) == 0) {
            *out = (moat_log_level_t)i;
            return 0;
        }
    }
    return MOAT_EINVAL;
}

/* ISO 8601 UTC with milliseconds. The seconds part is formatted once per second per thread:
 * gmtime and strftime cost more than the rest of an access-log line. */
static size_t format_time(char *dst, size_t cap)
{
    static _Thread_local time_t cached_sec = -1;
    static _Thread_local char cached[24];
    static _Thread_local size_t cached_len;
    struct timeval tv;
    gettimeofday(&tv, NULL);
    if (tv.tv_sec != cached_sec) {
        struct tm tm;
        gmtime_r(&tv.tv_sec, &tm);
        cached_len = strftime(cached, sizeof cached, "%Y-%m-%dT%H:%M:%S", &tm);
        cached_sec = tv.tv_sec;
    }
    int n = snprintf(dst, cap, "%.*s.%03dZ", (int)cached_len, cached, (int)(tv.tv_usec / 1000));
    return n > 0 ? (size_t)n : 0;
}

/* Escape for a JSON string value; bytes outside printable ASCII become \\u00XX so every
 * line stays valid JSON whatever a client sent. */
static size_t json_escape(char *dst, size_t cap, const char *s)
{
    size_t o = 0;
    for (; *s && o + 7 < cap; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            dst[o++] = '\\';
            dst[o++] = (char)c;
        } else if (c < 0x20 || c >= 0x7f) {
            o += (size_t)snprintf(dst + o, cap - o, "\\u%04x", c);
        } else {
            dst[o++] = (char)c;
        }
    }
    dst[o] = 0;
    return o;
}

void moat_log_write(moat_log_level_t level, const char *fmt, ...)
{
    char msg[2048];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    int out = stderr_output();
    char line[4608];
    char ts[40];
    size_t o;
    if (out == OUT_JOURNAL) {
        /* One journal entry per line: a line break inside the message would split it. */
        for (char *c = msg; *c != '\0'; c++)
            if (*c == '\n' || *c == '\r')
                *c = ' ';
        o = (size_t)snprintf(line, sizeof line, "<%d>%s\n", level_priorities[level], msg);
    } else if (out == OUT_TTY) {
        format_time(ts, sizeof ts);
        o = (size_t)snprintf(line, sizeof line, "%s %-5s %s\n", ts, level_names[level], msg);
    } else {
        format_time(ts, sizeof ts);
        o = (size_t)snprintf(line, sizeof line, "{\"time\":\"%s\",\"level\":\"%s\",\"msg\":\"", ts,
                             level_names[level]);
        o += json_escape(line + o, sizeof line - o - 4, msg);
        o += (size_t)snprintf(line + o, sizeof line - o, "\"}\n");
    }
    if (o >= sizeof line)
        o = sizeof line - 1;
    ssize_t w = write(2, line, o);
    (void)w;
}

int moat_access_log_open(const char *path)
{
    if (path == NULL || strcmp(path, "-") == 0) {
        access_fd = 1;
        return 0;
    }
    /* "off" (or /dev/null) skips formatting altogether: nothing is spent per request. */
    if (strcmp(path, "off") == 0 || strcmp(path, "/dev/null") == 0) {
        access_fd = -1;
        return 0;
    }
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0640);
    if (fd < 0)
        return MOAT_EIO;
    access_fd = fd;
    return 0;
}

void moat_access_log_line(const char *json_line, size_t len)
{
    if (access_fd < 0)
        return;
    ssize_t w = write(access_fd, json_line, len);
    (void)w;
}

void moat_access_log_request(const moat_access_entry_t *e)
{
    if (access_fd < 0)
        return;
    char line[4096], ts[40], ip[64];
    char host[600], path[2100], method[40];
    format_time(ts, sizeof ts);
    if (e->remote && e->remote[0])
        snprintf(ip, sizeof ip, "%s", e->remote);
    else
        moat_format_ip(e->peer, ip, sizeof ip);
    json_escape(host, sizeof host, e->host ? e->host : "");
    json_escape(path, sizeof path, e->path ? e->path : "");
    json_escape(method, sizeof method, e->method ? e->method : "");
    char rid[140];
    json_escape(rid, sizeof rid, e->request_id ? e->request_id : "");
    int len = snprintf(line, sizeof line,
                       "{\"time\":\"%s\",\"remote\":\"%s\",\"host\":\"%s\",\"method\":\"%s\","
                       "\"path\":\"%s\",\"proto\":\"%s\",\"tls\":%s,\"status\":%d,"
                       "\"bytes_in\":%llu,\"bytes_out\":%llu,\"duration_ms\":%llu,"
                       "\"upstream\":\"%s\",\"upstream_ms\":%llu%s%s%s}\n",
                       ts, ip, host, method, path, e->proto, e->tls ? "true" : "false", e->status,
                       e->bytes_in, e->bytes_out, e->duration_ms, e->upstream ? e->upstream : "",
                       e->upstream_ms, rid[0] ? ",\"request_id\":\"" : "", rid, rid[0] ? "\"" : "");
    if (len > 0)
        moat_access_log_line(line, MOAT_MIN((size_t)len, sizeof line - 1));
}
