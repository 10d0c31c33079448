/* The control socket (server/ctlsock.h). */
#include "ctlsock.h"
#include "moat/common.h"
#include "moat/log.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

struct moat_ctlsock {
    uv_pipe_t pipe;
    uv_loop_t *loop;
    moat_ctl_handler_cb handler;
    void *data;
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    moat_ctlconn_t *conns;
};

struct moat_ctlconn {
    uv_pipe_t pipe;
    uv_timer_t timer;
    uv_write_t wr;
    moat_ctlsock_t *s;
    moat_ctlconn_t *next, *prev;
    int refs; /* open handles */
    size_t len;
    unsigned dispatched : 1; /* the handler has it: a reply is due */
    unsigned closing : 1;
    unsigned too_long : 1; /* past MOAT_CTL_MAX_REQUEST: the rest is read and dropped */
    char *out;
    void (*after)(void *);
    void *after_data;
    char buf[MOAT_CTL_MAX_REQUEST + 1];
};

int moat_ctlsock_check_dir(const char *dir, char *err, size_t errlen)
{
    struct stat st;
    if (stat(dir, &st) != 0) {
        snprintf(err, errlen, "control socket: cannot use %s: %s", dir, strerror(errno));
        return MOAT_EIO;
    }
    if ((st.st_mode & 077) != 0 || st.st_uid != geteuid()) {
        snprintf(err, errlen,
                 "control socket: not opened, because the data folder %s can be entered by "
                 "other users (mode %03o, owner uid %u); make it private to the user moat runs "
                 "as (chmod 700 %s). Until then moat reload/stop/renew use signals and moat "
                 "status is unavailable",
                 dir, (unsigned)(st.st_mode & 0777), (unsigned)st.st_uid, dir);
        return MOAT_EINVAL;
    }
    return 0;
}

static void conn_closed(uv_handle_t *h)
{
    moat_ctlconn_t *k = h->data;
    if (--k->refs > 0)
        return;
    if (k->after)
        k->after(k->after_data);
    free(k->out);
    free(k);
}

static void conn_close(moat_ctlconn_t *k)
{
    if (k->closing)
        return;
    k->closing = 1;
    moat_ctlsock_t *s = k->s;
    if (k->prev)
        k->prev->next = k->next;
    else if (s != NULL)
        s->conns = k->next;
    if (k->next)
        k->next->prev = k->prev;
    k->next = k->prev = NULL;
    uv_close((uv_handle_t *)&k->timer, conn_closed);
    uv_close((uv_handle_t *)&k->pipe, conn_closed);
}

static void answer_error(moat_ctlconn_t *k, const char *msg);

static void on_timeout(uv_timer_t *t)
{
    moat_ctlconn_t *k = t->data;
    if (k->dispatched)
        return;
    uv_read_stop((uv_stream_t *)&k->pipe);
    if (k->too_long)
        answer_error(k, "request too long");
    else
        conn_close(k);
}

static void on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *b)
{
    (void)suggested;
    moat_ctlconn_t *k = h->data;
    /* One byte past the limit is room to notice a request that is too long. */
    b->base = k->buf + k->len;
    b->len = sizeof k->buf - k->len;
}

static void answer_error(moat_ctlconn_t *k, const char *msg)
{
    moat_ctlsock_reply(k, json_pack("{sbss}", "ok", 0, "error", msg), NULL, NULL);
}

static void on_read(uv_stream_t *st, ssize_t n, const uv_buf_t *b)
{
    (void)b;
    moat_ctlconn_t *k = st->data;
    if (n == 0)
        return;
    if (n < 0 && n != UV_EOF) {
        conn_close(k);
        return;
    }
    size_t start = k->len;
    if (n > 0)
        k->len += (size_t)n;
    const char *nl = memchr(k->buf + start, '\n', k->len - start);
    if (nl == NULL && k->len > MOAT_CTL_MAX_REQUEST) {
        /* Too long: read the rest and drop it (within the read timeout), so that the answer
         * is not lost to a reset for unread bytes when the connection closes. */
        k->too_long = 1;
        k->len = 0;
    }
    if (nl == NULL && n != UV_EOF)
        return; /* more to come */
    uv_read_stop(st);
    uv_timer_stop(&k->timer);
    size_t len = nl ? (size_t)(nl - k->buf) : k->len;
    if (k->too_long) {
        answer_error(k, "request too long");
        return;
    }
    moat_ctl_req_t req;
    char err[256];
    if (moat_ctl_parse(k->buf, len, &req, err, sizeof err) != 0) {
        answer_error(k, err);
        return;
    }
    k->dispatched = 1;
    k->s->handler(k, &req, k->s->data);
}

static void on_written(uv_write_t *w, int status)
{
    (void)status;
    conn_close(w->data);
}

void moat_ctlsock_reply(moat_ctlconn_t *k, json_t *answer, void (*after)(void *), void *after_data)
{
    k->dispatched = 0;
    k->after = after;
    k->after_data = after_data;
    char *s = answer ? json_dumps(answer, JSON_COMPACT | JSON_REAL_PRECISION(6)) : NULL;
    json_decref(answer);
    if (s == NULL || k->closing) {
        free(s);
        conn_close(k);
        return;
    }
    size_t n = strlen(s);
    k->out = moat_xmalloc(n + 1);
    memcpy(k->out, s, n);
    k->out[n] = '\n';
    free(s);
    uv_buf_t b = uv_buf_init(k->out, (unsigned)(n + 1));
    k->wr.data = k;
    if (uv_write(&k->wr, (uv_stream_t *)&k->pipe, &b, 1, on_written) != 0)
        conn_close(k);
}

static void on_connection(uv_stream_t *server, int status)
{
    moat_ctlsock_t *s = server->data;
    if (status != 0)
        return;
    moat_ctlconn_t *k = moat_xcalloc(1, sizeof *k);
    k->s = s;
    uv_pipe_init(s->loop, &k->pipe, 0);
    uv_timer_init(s->loop, &k->timer);
    k->pipe.data = k->timer.data = k;
    k->refs = 2;
    if (uv_accept(server, (uv_stream_t *)&k->pipe) != 0) {
        k->closing = 1;
        uv_close((uv_handle_t *)&k->timer, conn_closed);
        uv_close((uv_handle_t *)&k->pipe, conn_closed);
        return;
    }
    k->next = s->conns;
    if (s->conns)
        s->conns->prev = k;
    s->conns = k;
    uv_timer_start(&k->timer, on_timeout, MOAT_CTLSOCK_READ_MS, 0);
    uv_read_start((uv_stream_t *)&k->pipe, on_alloc, on_read);
}

static void sock_closed(uv_handle_t *h)
{
    free(h->data);
}

/* Whether something answers at path: another moat on the same data folder. */
static int someone_listens(const char *path)
{
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return 0;
    struct sockaddr_un sun = {.sun_family = AF_UNIX};
    memcpy(sun.sun_path, path, strlen(path) + 1);
    int r = connect(fd, (struct sockaddr *)&sun, sizeof sun);
    close(fd);
    return r == 0;
}

int moat_ctlsock_open(uv_loop_t *loop, const char *data_dir, moat_ctl_handler_cb handler,
                      void *data, moat_ctlsock_t **out, char *err, size_t errlen)
{
    *out = NULL;
    int r = moat_ctlsock_check_dir(data_dir, err, errlen);
    if (r != 0)
        return r;
    moat_ctlsock_t *s = moat_xcalloc(1, sizeof *s);
    int n = snprintf(s->path, sizeof s->path, "%s/%s", data_dir, MOAT_CTL_SOCKET);
    if (n < 0 || (size_t)n >= sizeof s->path) {
        snprintf(err, errlen,
                 "control socket: not opened, because the path %s/%s is longer than a unix "
                 "socket address allows (%zu bytes); choose a shorter --data folder",
                 data_dir, MOAT_CTL_SOCKET, sizeof s->path - 1);
        free(s);
        return MOAT_EINVAL;
    }
    if (someone_listens(s->path)) {
        snprintf(err, errlen,
                 "control socket: not opened, because another moat answers on %s (two moats "
                 "on one data folder?)",
                 s->path);
        free(s);
        return MOAT_EINVAL;
    }
    unlink(s->path); /* left behind by a moat that did not stop cleanly */
    s->loop = loop;
    s->handler = handler;
    s->data = data;
    uv_pipe_init(loop, &s->pipe, 0);
    s->pipe.data = s;
    /* The folder is private (checked above), so nobody else can connect before the chmod. */
    r = uv_pipe_bind(&s->pipe, s->path);
    if (r == 0 && chmod(s->path, 0600) != 0)
        r = uv_translate_sys_error(errno);
    if (r == 0)
        r = uv_listen((uv_stream_t *)&s->pipe, 16, on_connection);
    if (r != 0) {
        snprintf(err, errlen, "control socket: cannot listen on %s: %s", s->path, uv_strerror(r));
        unlink(s->path);
        uv_close((uv_handle_t *)&s->pipe, sock_closed);
        return MOAT_EIO;
    }
    *out = s;
    return 0;
}

void moat_ctlsock_close(moat_ctlsock_t *s)
{
    if (s == NULL)
        return;
    unlink(s->path);
    while (s->conns != NULL) {
        moat_ctlconn_t *k = s->conns;
        k->after = NULL;
        conn_close(k);
    }
    uv_close((uv_handle_t *)&s->pipe, sock_closed);
}
