/* moat and the system around it (server/system.h): systemd notify, privilege drop,
 * the status file and `moat health`. */
#include "system.h"
#include "moat/common.h"
#include "moat/log.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <netinet/in.h>
#include <poll.h>
#include <pwd.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_RUN_USER "moat"

static const char *run_user;

/* ---- systemd notify ---- */

int moat_system_notify(const char *msg)
{
    const char *path = getenv("NOTIFY_SOCKET");
    if (path == NULL || *path == 0)
        return 0;
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    size_t plen = strlen(path);
    /* '@' names a socket in the abstract namespace: a leading NUL byte, no terminator. */
    if ((path[0] != '/' && path[0] != '@') || plen >= sizeof sa.sun_path)
        return MOAT_EINVAL;
    memcpy(sa.sun_path, path, plen);
    if (path[0] == '@')
        sa.sun_path[0] = 0;
    socklen_t salen = (socklen_t)(offsetof(struct sockaddr_un, sun_path) + plen);
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return MOAT_EIO;
    ssize_t n = sendto(fd, msg, strlen(msg), MSG_NOSIGNAL, (struct sockaddr *)&sa, salen);
    int e = errno;
    close(fd);
    if (n < 0) {
        MOAT_DEBUG("notify %s: %s", path, strerror(e));
        return MOAT_EIO;
    }
    return 0;
}

/* ---- privilege drop ---- */

void moat_system_set_user(const char *user)
{
    run_user = user;
}

static int chown_if_exists(const char *dir, const char *name, uid_t uid, gid_t gid, char *err,
                           size_t errlen)
{
    char path[4096];
    if (name)
        snprintf(path, sizeof path, "%s/%s", dir, name);
    else
        snprintf(path, sizeof path, "%s", dir);
    /* lchown: a symlink planted in the data folder must not hand some other file over. */
    if (lchown(path, uid, gid) != 0 && errno != ENOENT) {
        snprintf(err, errlen, "cannot give %s to the run user: %s", path, strerror(errno));
        return MOAT_EPERM;
    }
    return 0;
}

int moat_system_drop_privileges(const char *data_dir, char *err, size_t errlen)
{
    if (geteuid() != 0)
        return 0;
    const char *name = run_user ? run_user : DEFAULT_RUN_USER;
    if (strcmp(name, "root") == 0)
        return 0;
    errno = 0;
    struct passwd *pw = getpwnam(name);
    if (pw == NULL) {
        if (run_user == NULL) {
            MOAT_WARN("running as root: there is no '%s' user to drop to (create one, or "
                      "name another with --user)",
                      DEFAULT_RUN_USER);
            return 0;
        }
        snprintf(err, errlen, "--user %s: no such user (create it, or name another)", name);
        return MOAT_ENOT_FOUND;
    }
    uid_t uid = pw->pw_uid;
    gid_t gid = pw->pw_gid;
    if (uid == 0)
        return 0;
    /* SQLite keeps moat.db, -wal and -shm open, and later opens them again by name; the
     * folder must be the user's too, since SQLite creates and deletes files in it. */
    static const char *const files[] = {
        NULL,       "moat.db",       "moat.db-wal", "moat.db-shm", "moat.db-journal",
        "moat.pid", MOAT_STATUS_FILE};
    for (size_t i = 0; i < MOAT_ARRAY_LEN(files); i++) {
        int r = chown_if_exists(data_dir, files[i], uid, gid, err, errlen);
        if (r != 0)
            return r;
    }
    if (initgroups(pw->pw_name, gid) != 0 || setgid(gid) != 0 || setuid(uid) != 0) {
        snprintf(err, errlen, "cannot switch to user %s (uid %d): %s", name, (int)uid,
                 strerror(errno));
        return MOAT_EPERM;
    }
    /* glibc applies setuid to every thread; make sure it really cannot be undone. */
    if (setuid(0) == 0 || seteuid(0) == 0) {
        snprintf(err, errlen, "dropped to user %s but root could be regained; refusing to run",
                 name);
        return MOAT_EPERM;
    }
    MOAT_INFO("running as user %s (uid %d, gid %d)", name, (int)uid, (int)gid);
    return 0;
}

/* ---- status file, readiness ---- */

static void status_path(char *buf, size_t len, const char *data_dir)
{
    snprintf(buf, len, "%s/%s", data_dir, MOAT_STATUS_FILE);
}

void moat_system_ready(const char *data_dir, const moat_server_opts_t *s)
{
    char path[4096], tmp[4200];
    status_path(path, sizeof path, data_dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    /* Written whole under a temporary name and renamed, so health never reads half a file. */
    FILE *f = fopen(tmp, "we");
    if (f != NULL) {
        fprintf(f, "pid %d\n", (int)getpid());
        fprintf(f, "listen %s\n", s->bind_addr ? s->bind_addr : "*");
        for (size_t i = 0; i < s->nlistens; i++)
            fprintf(f, "port %d %s\n", s->listens[i].port, s->listens[i].tls ? "https" : "http");
        if (fclose(f) != 0 || rename(tmp, path) != 0) {
            MOAT_WARN("cannot write %s: %s (moat health will fail)", path, strerror(errno));
            unlink(tmp);
        }
    } else {
        MOAT_WARN("cannot write %s: %s (moat health will fail)", tmp, strerror(errno));
    }
    char msg[256];
    int n = snprintf(msg, sizeof msg, "READY=1\nMAINPID=%d\nSTATUS=serving on", (int)getpid());
    for (size_t i = 0; i < s->nlistens && n > 0 && (size_t)n < sizeof msg; i++)
        n += snprintf(msg + n, sizeof msg - (size_t)n, " %d/%s", s->listens[i].port,
                      s->listens[i].tls ? "https" : "http");
    moat_system_notify(msg);
}

void moat_system_reloading(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    char msg[96];
    snprintf(msg, sizeof msg, "RELOADING=1\nMONOTONIC_USEC=%llu",
             (unsigned long long)ts.tv_sec * 1000000ULL + (unsigned long long)ts.tv_nsec / 1000);
    moat_system_notify(msg);
}

void moat_system_reloaded(void)
{
    moat_system_notify("READY=1");
}

void moat_system_degraded(const char *data_dir, const char *why)
{
    char path[4096];
    status_path(path, sizeof path, data_dir);
    /* Appended: the status file is the one `moat health` reads, and it is rewritten whole
     * only at ready. */
    FILE *f = fopen(path, "ae");
    if (f == NULL)
        return;
    fprintf(f, "degraded %.500s\n", why);
    fclose(f);
    char msg[600];
    snprintf(msg, sizeof msg, "STATUS=degraded: %.500s", why);
    moat_system_notify(msg);
}

void moat_system_recovered(const char *data_dir)
{
    char path[4096];
    status_path(path, sizeof path, data_dir);
    /* The last "degraded" line is the one `moat health` reads: an empty one clears it. */
    FILE *f = fopen(path, "ae");
    if (f == NULL)
        return;
    fprintf(f, "degraded \n");
    fclose(f);
    moat_system_notify("STATUS=serving");
}

void moat_system_stopping(const char *data_dir)
{
    moat_system_notify("STOPPING=1");
    char path[4096];
    status_path(path, sizeof path, data_dir);
    unlink(path);
}

/* ---- moat health ---- */

typedef struct {
    int pid;
    char listen[128];
    int http_port, https_port;
    char degraded[512]; /* what moat serves without, "" when nothing */
} status_t;

static int read_status(const char *data_dir, status_t *st)
{
    char path[4096], line[600];
    status_path(path, sizeof path, data_dir);
    FILE *f = fopen(path, "re");
    if (f == NULL) {
        printf("unhealthy: %s: %s (moat is not running or not ready)\n", path, strerror(errno));
        return -1;
    }
    memset(st, 0, sizeof *st);
    while (fgets(line, sizeof line, f)) {
        int port;
        char kind[16];
        if (sscanf(line, "pid %d", &st->pid) == 1)
            continue;
        if (sscanf(line, "listen %127s", st->listen) == 1)
            continue;
        if (strncmp(line, "degraded ", 9) == 0) {
            snprintf(st->degraded, sizeof st->degraded, "%.500s", line + 9);
            st->degraded[strcspn(st->degraded, "\n")] = 0;
            continue;
        }
        if (sscanf(line, "port %d %15s", &port, kind) == 2) {
            if (strcmp(kind, "http") == 0 && st->http_port == 0)
                st->http_port = port;
            else if (strcmp(kind, "https") == 0 && st->https_port == 0)
                st->https_port = port;
        }
    }
    fclose(f);
    if (st->pid <= 0 || (st->http_port == 0 && st->https_port == 0)) {
        printf("unhealthy: %s names no process or port\n", path);
        return -1;
    }
    return 0;
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Wait for fd to become ready for `events` until the deadline; 0 when it did. */
static int wait_fd(int fd, short events, int64_t deadline)
{
    for (;;) {
        int64_t left = deadline - now_ms();
        if (left <= 0)
            return -1;
        struct pollfd p = {.fd = fd, .events = events};
        int r = poll(&p, 1, (int)left);
        if (r > 0)
            return 0;
        if (r < 0 && errno != EINTR)
            return -1;
    }
}

/* Connect to the instance's address (loopback when it listens on all of them). */
static int connect_to(const status_t *st, int port, int64_t deadline)
{
    struct sockaddr_storage ss = {0};
    socklen_t len;
    const char *host = st->listen;
    if (strcmp(host, "*") == 0 || strcmp(host, "0.0.0.0") == 0)
        host = "127.0.0.1";
    else if (strcmp(host, "::") == 0)
        host = "::1";
    struct sockaddr_in *s4 = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, host, &s4->sin_addr) == 1) {
        s4->sin_family = AF_INET;
        s4->sin_port = htons((uint16_t)port);
        len = sizeof *s4;
    } else if (inet_pton(AF_INET6, host, &s6->sin6_addr) == 1) {
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((uint16_t)port);
        len = sizeof *s6;
    } else {
        printf("unhealthy: cannot use listen address '%s'\n", host);
        return -1;
    }
    int fd = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&ss, len) != 0 && errno != EINPROGRESS) {
        printf("unhealthy: connect to %s port %d: %s\n", host, port, strerror(errno));
        close(fd);
        return -1;
    }
    int soerr = 0;
    socklen_t sl = sizeof soerr;
    if (wait_fd(fd, POLLOUT, deadline) != 0 ||
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl) != 0 || soerr != 0) {
        printf("unhealthy: connect to %s port %d: %s\n", host, port,
               soerr ? strerror(soerr) : "timed out");
        close(fd);
        return -1;
    }
    return fd;
}

int moat_system_health(const char *data_dir, int timeout_ms)
{
    status_t st;
    if (read_status(data_dir, &st) != 0)
        return 1;
    /* EPERM means the process exists but belongs to another user: still alive. */
    if (kill(st.pid, 0) != 0 && errno != EPERM) {
        printf("unhealthy: process %d is gone\n", st.pid);
        return 1;
    }
    int64_t deadline = now_ms() + timeout_ms;
    int port = st.http_port ? st.http_port : st.https_port;
    int fd = connect_to(&st, port, deadline);
    if (fd < 0)
        return 1;
    if (st.http_port == 0) {
        /* Only TLS listeners: an accepted connection is as far as we check without a TLS
         * client; the kernel accepts into the backlog even when the workers are stuck. */
        close(fd);
        printf("healthy: pid %d accepts on port %d\n", st.pid, port);
        if (st.degraded[0])
            printf("degraded: %s\n", st.degraded);
        return 0;
    }
    /* A request proves a worker loop runs: the kernel alone would accept the connection.
     * Any HTTP status will do (an unknown host gets 404, a TLS site a redirect). */
    static const char req[] = "GET /.well-known/moat-health HTTP/1.1\r\nHost: moat-health\r\n"
                              "Connection: close\r\n\r\n";
    if (send(fd, req, sizeof req - 1, MSG_NOSIGNAL) != (ssize_t)(sizeof req - 1)) {
        printf("unhealthy: cannot send to port %d: %s\n", port, strerror(errno));
        close(fd);
        return 1;
    }
    char buf[64];
    size_t got = 0;
    while (got < 12) {
        if (wait_fd(fd, POLLIN, deadline) != 0) {
            printf("unhealthy: no answer on port %d within %d ms\n", port, timeout_ms);
            close(fd);
            return 1;
        }
        ssize_t n = recv(fd, buf + got, sizeof buf - 1 - got, 0);
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (n <= 0)
            break;
        got += (size_t)n;
    }
    close(fd);
    buf[got] = 0;
    if (got < 12 || strncmp(buf, "HTTP/1.", 7) != 0) {
        printf("unhealthy: port %d did not answer with HTTP\n", port);
        return 1;
    }
    printf("healthy: pid %d answers on port %d (%.3s)\n", st.pid, port, buf + 9);
    if (st.degraded[0])
        printf("degraded: %s\n", st.degraded);
    return 0;
}
