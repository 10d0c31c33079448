/* system.c: the notify protocol against a real datagram socket, the status file, `moat
 * health` against a real listener, and the privilege drop in a child process. */
#include "moat/common.h"
#include "moat/log.h"
#include "system.h"
#include "test.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <pwd.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

static char tmpdir[] = "/tmp/moat-system-test.XXXXXX";

/* Bind a datagram socket at `name` (a path, or "@abstract") and point NOTIFY_SOCKET at it. */
static int notify_listener(const char *name)
{
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    size_t len = strlen(name);
    memcpy(sa.sun_path, name, len);
    if (name[0] == '@')
        sa.sun_path[0] = 0;
    int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa,
                       (socklen_t)(offsetof(struct sockaddr_un, sun_path) + len)) != 0)
        return -1;
    setenv("NOTIFY_SOCKET", name, 1);
    return fd;
}

static void recv_msg(int fd, char *buf, size_t cap)
{
    struct timeval tv = {2, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    ssize_t n = recv(fd, buf, cap - 1, 0);
    buf[n > 0 ? n : 0] = 0;
}

static void test_notify(void)
{
    char path[256], buf[512];
    unsetenv("NOTIFY_SOCKET");
    CHECK_INT(moat_system_notify("READY=1"), 0); /* not under a service manager: no-op */

    snprintf(path, sizeof path, "%s/notify", tmpdir);
    int fd = notify_listener(path);
    CHECK(fd >= 0);
    CHECK_INT(moat_system_notify("READY=1"), 0);
    recv_msg(fd, buf, sizeof buf);
    CHECK_STR(buf, "READY=1");
    moat_system_reloading();
    recv_msg(fd, buf, sizeof buf);
    CHECK(strncmp(buf, "RELOADING=1\nMONOTONIC_USEC=", 27) == 0);
    moat_system_reloaded();
    recv_msg(fd, buf, sizeof buf);
    CHECK_STR(buf, "READY=1");
    close(fd);

    char abstract[64];
    snprintf(abstract, sizeof abstract, "@moat-test-%d", (int)getpid());
    fd = notify_listener(abstract);
    CHECK(fd >= 0);
    CHECK_INT(moat_system_notify("STOPPING=1"), 0);
    recv_msg(fd, buf, sizeof buf);
    CHECK_STR(buf, "STOPPING=1");
    close(fd);

    setenv("NOTIFY_SOCKET", "relative/path", 1);
    CHECK_INT(moat_system_notify("READY=1"), MOAT_EINVAL);
    unsetenv("NOTIFY_SOCKET");
}

/* A one-shot HTTP server for health: answers one request with `reply`. */
typedef struct {
    int lfd;
    const char *reply;
} server_t;

static void *serve_one(void *arg)
{
    server_t *s = arg;
    int c = accept(s->lfd, NULL, NULL);
    if (c >= 0) {
        char buf[512];
        ssize_t n = recv(c, buf, sizeof buf, 0);
        (void)n;
        if (s->reply) {
            ssize_t w = send(c, s->reply, strlen(s->reply), MSG_NOSIGNAL);
            (void)w;
        }
        close(c);
    }
    return NULL;
}

static int listen_loopback(int *port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t len = sizeof sa;
    if (fd < 0 || bind(fd, (struct sockaddr *)&sa, sizeof sa) != 0 || listen(fd, 4) != 0 ||
        getsockname(fd, (struct sockaddr *)&sa, &len) != 0)
        return -1;
    *port = ntohs(sa.sin_port);
    return fd;
}

static int health_with(const char *reply, int tls_only)
{
    int port;
    server_t s = {.reply = reply};
    s.lfd = listen_loopback(&port);
    moat_server_opts_t o = {.nlistens = 1, .bind_addr = "127.0.0.1"};
    o.listens[0].port = port;
    o.listens[0].tls = tls_only;
    moat_system_ready(tmpdir, &o);
    pthread_t t;
    pthread_create(&t, NULL, serve_one, &s);
    int rc = moat_system_health(tmpdir, 1000);
    pthread_join(t, NULL);
    close(s.lfd);
    return rc;
}

static void test_status_and_health(void)
{
    char path[256];
    snprintf(path, sizeof path, "%s/%s", tmpdir, MOAT_STATUS_FILE);
    CHECK_INT(moat_system_health(tmpdir, 500), 1); /* no status file */

    CHECK_INT(health_with("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", 0), 0);
    struct stat st;
    CHECK(stat(path, &st) == 0);
    CHECK_INT(health_with("SSH-2.0-nope\r\n", 0), 1); /* not HTTP */
    CHECK_INT(health_with(NULL, 0), 1);               /* closed without an answer */
    CHECK_INT(health_with(NULL, 1), 0);               /* TLS only: a connection is enough */

    /* The process named in the file is gone. */
    FILE *f = fopen(path, "w");
    fprintf(f, "pid 999999999\nlisten *\nport 1 http\n");
    fclose(f);
    CHECK_INT(moat_system_health(tmpdir, 500), 1);

    /* Nothing listens on the port any more. */
    int port;
    int fd = listen_loopback(&port);
    close(fd);
    f = fopen(path, "w");
    fprintf(f, "pid %d\nlisten *\nport %d http\n", (int)getpid(), port);
    fclose(f);
    CHECK_INT(moat_system_health(tmpdir, 500), 1);

    moat_system_stopping(tmpdir);
    CHECK(stat(path, &st) != 0 && errno == ENOENT);
}

static void test_drop_privileges(void)
{
    char err[256] = "";
    if (geteuid() != 0) {
        CHECK_INT(moat_system_drop_privileges(tmpdir, err, sizeof err), 0); /* nothing to do */
        TEST_SKIP("not root: the drop to another user cannot be tried");
        return;
    }
    moat_system_set_user("root");
    CHECK_INT(moat_system_drop_privileges(tmpdir, err, sizeof err), 0);
    CHECK(geteuid() == 0);
    moat_system_set_user("no-such-user-moat-test");
    CHECK_INT(moat_system_drop_privileges(tmpdir, err, sizeof err), MOAT_ENOT_FOUND);
    CHECK(strstr(err, "no-such-user-moat-test") != NULL);

    struct passwd *pw = getpwnam("nobody");
    if (pw == NULL) {
        TEST_SKIP("no user \"nobody\" to drop to");
        return;
    }
    uid_t nobody = pw->pw_uid;
    char db[256];
    snprintf(db, sizeof db, "%s/moat.db", tmpdir);
    FILE *f = fopen(db, "w");
    fclose(f);
    /* In a child: the drop cannot be undone, which is the point. */
    pid_t pid = fork();
    if (pid == 0) {
        moat_system_set_user("nobody");
        char e[256];
        int r = moat_system_drop_privileges(tmpdir, e, sizeof e);
        int ok = r == 0 && getuid() == nobody && geteuid() == nobody && setuid(0) != 0;
        _exit(ok ? 0 : 1);
    }
    int status = 0;
    waitpid(pid, &status, 0);
    CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
    struct stat st;
    CHECK(stat(tmpdir, &st) == 0 && st.st_uid == nobody);
    CHECK(stat(db, &st) == 0 && st.st_uid == nobody);
    unlink(db);
    moat_system_set_user(NULL);
}

int main(void)
{
    moat_log_min_level = MOAT_LOG_ERROR;
    if (mkdtemp(tmpdir) == NULL) {
        perror("mkdtemp");
        return 1;
    }
    test_notify();
    test_status_and_health();
    test_drop_privileges();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf %s", tmpdir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmpdir);
    return test_summary("system");
}
