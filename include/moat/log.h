/* Error/event log (stderr: text on a terminal, JSON lines otherwise) and the access log.
 * The level is checked before any argument is formatted. */
#ifndef MOAT_LOG_H
#define MOAT_LOG_H

#include <stdio.h>

typedef enum { MOAT_LOG_DEBUG, MOAT_LOG_INFO, MOAT_LOG_WARN, MOAT_LOG_ERROR } moat_log_level_t;

extern moat_log_level_t moat_log_min_level;

/* Parse "debug|info|warn|error"; returns 0 or MOAT_EINVAL. */
int moat_log_parse_level(const char *s, moat_log_level_t *out);
/* Format one message. Use the MOAT_LOG macro, which skips the call below the level. */
void moat_log_write(moat_log_level_t level, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

#define MOAT_LOG(level, ...)                                                                       \
    do {                                                                                           \
        if ((level) >= moat_log_min_level)                                                         \
            moat_log_write((level), __VA_ARGS__);                                                  \
    } while (0)
#define MOAT_DEBUG(...) MOAT_LOG(MOAT_LOG_DEBUG, __VA_ARGS__)
#define MOAT_INFO(...)  MOAT_LOG(MOAT_LOG_INFO, __VA_ARGS__)
#define MOAT_WARN(...)  MOAT_LOG(MOAT_LOG_WARN, __VA_ARGS__)
#define MOAT_ERROR(...) MOAT_LOG(MOAT_LOG_ERROR, __VA_ARGS__)

/* Access log: one JSON line per request, to stdout (default) or the file set here. */
int moat_access_log_open(const char *path);
void moat_access_log_line(const char *json_line, size_t len);

struct sockaddr;

/* One request as the access log records it; every front end (HTTP/1.1, HTTP/2) fills one. */
typedef struct {
    const struct sockaddr *peer;
    const char *remote; /* the client's address when a trusted proxy named it, else NULL */
    const char *host, *method, *path, *proto;
    int tls;
    int status;
    unsigned long long bytes_in, bytes_out, duration_ms;
    const char *upstream;
    unsigned long long upstream_ms;
    const char *request_id; /* NULL or "": not written */
} moat_access_entry_t;

void moat_access_log_request(const moat_access_entry_t *e);

#endif
