/* Non-blocking sockets, plain or TLS, driven by uv_poll_t (include/moat/sock.h). */
#include "moat/sock.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

/* One TLS record's worth: reads land in chunks of this size, TLS writes are cut at it. */
#define READ_CHUNK    16384
#define TLS_WRITE_MAX 16384
/* Reads per readiness event before giving other connections a turn. */
#define READS_PER_EVENT 16

static void on_poll(uv_poll_t *h, int status, int events);

/* Read buffers come from a small per-thread cache: a connection takes one when bytes arrive
 * and gives it back as soon as they are consumed (an idle connection holds none), so a busy
 * worker would otherwise malloc and free 16 KiB on every read event. */
#define BUF_CACHE_MAX 64
static _Thread_local char *buf_cache[BUF_CACHE_MAX];
static _Thread_local int buf_cached;
/* Readiness events on this thread's sockets: the worker's idle check compares it over time. */
static _Thread_local uint64_t poll_events;

uint64_t moat_sock_thread_events(void)
{
    return poll_events;
}

static void take_read_buffer(moat_buf_t *b)
{
    if (b->base == NULL && buf_cached > 0) {
        b->base = buf_cache[--buf_cached];
        b->cap = READ_CHUNK;
        b->off = b->len = 0;
    }
}

void moat_sock_thread_cleanup(void)
{
    while (buf_cached > 0)
        free(buf_cache[--buf_cached]);
}

static void give_read_buffer(moat_buf_t *b)
{
    if (b->base != NULL && b->cap == READ_CHUNK && buf_cached < BUF_CACHE_MAX) {
        buf_cache[buf_cached++] = b->base;
        b->base = NULL;
        b->off = b->len = b->cap = 0;
        return;
    }
    moat_buf_free(b);
}

/* TLS records are read through this BIO: one read() of up to 16 KiB feeds BoringSSL's
 * requests for a record header and then its body (its socket BIO would make a syscall for
 * each), and a read that came back short tells that the socket is drained, so the next
 * request answers "retry" without the read() that would only say EAGAIN. The level-triggered
 * poll wakes us when more arrives. The bytes wait in a buffer from the thread's cache that is
 * given back as soon as it is empty. Writes go through BoringSSL's own socket BIO. */
static int raw_bio_read(BIO *b, char *out, int len)
{
    moat_sock_t *s = BIO_get_data(b);
    BIO_clear_retry_flags(b);
    if (len <= 0)
        return 0;
    if (moat_buf_size(&s->raw) == 0) {
        if (s->raw_drained) {
            BIO_set_retry_read(b);
            return -1;
        }
        take_read_buffer(&s->raw);
        char *p = moat_buf_reserve(&s->raw, READ_CHUNK);
        if (p == NULL)
            return -1;
        ssize_t n;
        do {
            n = read(s->fd, p, READ_CHUNK);
        } while (n < 0 && errno == EINTR);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            give_read_buffer(&s->raw);
            s->raw_drained = 1;
            BIO_set_retry_read(b);
            return -1;
        }
        if (n <= 0) {
            give_read_buffer(&s->raw);
            return (int)n; /* 0: end of stream; -1: error (errno kept) */
        }
        moat_buf_commit(&s->raw, (size_t)n);
        if ((size_t)n < READ_CHUNK)
            s->raw_drained = 1;
    }
    size_t take = MOAT_MIN((size_t)len, moat_buf_size(&s->raw));
    memcpy(out, moat_buf_data(&s->raw), take);
    moat_buf_consume(&s->raw, take);
    if (moat_buf_size(&s->raw) == 0)
        give_read_buffer(&s->raw);
    return (int)take;
}

static long raw_bio_ctrl(BIO *b, int cmd, long larg, void *parg)
{
    (void)larg;
    moat_sock_t *s = BIO_get_data(b);
    switch (cmd) {
    case BIO_C_GET_FD: /* SSL_get_fd: certificate selection asks for the local address */
        if (parg != NULL)
            *(int *)parg = s->fd;
        return s->fd;
    case BIO_CTRL_PENDING: return (long)moat_buf_size(&s->raw);
    case BIO_CTRL_FLUSH: return 1;
    default: return 0;
    }
}

static BIO_METHOD *raw_bio_method;
static pthread_once_t raw_bio_once = PTHREAD_ONCE_INIT;

static void raw_bio_method_init(void)
{
    raw_bio_method = BIO_meth_new(BIO_TYPE_DESCRIPTOR | (BIO_get_new_index() & 0xff), "moat");
    BIO_meth_set_read(raw_bio_method, raw_bio_read);
    BIO_meth_set_ctrl(raw_bio_method, raw_bio_ctrl);
}

/* Give the SSL its BIOs: ours for reading, a socket BIO for writing. 0 or MOAT_ENOMEM. */
static int attach_bios(moat_sock_t *s)
{
    pthread_once(&raw_bio_once, raw_bio_method_init);
    BIO *r = raw_bio_method ? BIO_new(raw_bio_method) : NULL;
    BIO *w = BIO_new_socket(s->fd, BIO_NOCLOSE);
    if (r == NULL || w == NULL) {
        BIO_free(r);
        BIO_free(w);
        return MOAT_ENOMEM;
    }
    BIO_set_data(r, s);
    BIO_set_init(r, 1);
    SSL_set_bio(s->ssl, r, w);
    return 0;
}

static void update_poll(moat_sock_t *s)
{
    if (s->closing)
        return;
    int ev = 0;
    if (s->connecting) {
        ev = UV_WRITABLE;
    } else if (s->handshaking) {
        ev = s->ssl_read_wants_write ? UV_WRITABLE : UV_READABLE;
    } else {
        /* Reads stop lazily: the registration stays (changing it costs libuv an epoll_ctl
         * DEL and ADD) until bytes actually arrive while the owner wants none. A keep-alive
         * client waiting for its response sends nothing, so usually nothing changes. */
        if (!s->eof && (s->reading || (!s->read_strict && (s->events & UV_READABLE))))
            ev |= UV_READABLE;
        if (moat_buf_size(&s->out) > 0 || s->ssl_read_wants_write)
            ev |= UV_WRITABLE;
    }
    if (ev == s->events)
        return;
    s->events = ev;
    if (ev)
        uv_poll_start(&s->poll, ev, on_poll);
    else
        uv_poll_stop(&s->poll);
}

static void set_nodelay(int fd)
{
    int one = 1;
    /* Fails harmlessly on unix sockets. Streamed tokens must not wait for Nagle. */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

/* The connection is broken: report once; the owner decides when to close. */
static void broken(moat_sock_t *s, int err)
{
    if (s->closing)
        return;
    s->failed = 1;
    s->eof = 1;
    s->reading = 0;
    moat_buf_reset(&s->out);
    update_poll(s);
    s->cb->on_eof(s, err);
}

int moat_sock_init(moat_sock_t *s, uv_loop_t *loop, int fd, SSL *ssl, const moat_sock_cb_t *cb,
                   void *data)
{
    memset(s, 0, sizeof *s);
    s->fd = fd;
    s->ssl = ssl;
    s->cb = cb;
    s->data = data;
    /* Everything that can fail comes before the poll handle exists: a failure then leaves
     * nothing for the loop to walk (the caller just frees its memory). */
    if ((ssl && attach_bios(s) != 0) || uv_poll_init_socket(loop, &s->poll, fd) != 0) {
        close(fd);
        if (ssl)
            SSL_free(ssl);
        s->fd = -1;
        s->ssl = NULL;
        return ssl ? MOAT_ENOMEM : MOAT_EIO;
    }
    set_nodelay(fd);
    if (ssl) {
        SSL_set_accept_state(ssl);
        s->handshaking = 1;
        update_poll(s);
    }
    return 0;
}

int moat_sock_connect(moat_sock_t *s, uv_loop_t *loop, const struct sockaddr *addr,
                      socklen_t addrlen, SSL *ssl, const moat_sock_cb_t *cb, void *data)
{
    memset(s, 0, sizeof *s);
    s->fd = -1;
    int fd = socket(addr->sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        int e = errno;
        s->connect_errno = e;
        if (ssl)
            SSL_free(ssl);
        /* Out of descriptors or memory is this process's shortage, not the peer's fault. */
        return e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM ? MOAT_ENOMEM : MOAT_EIO;
    }
    if (connect(fd, addr, addrlen) != 0 && errno != EINPROGRESS) {
        int e = errno;
        s->connect_errno = e;
        close(fd);
        if (ssl)
            SSL_free(ssl);
        return e == ECONNREFUSED || e == ENOENT ? MOAT_EUPSTREAM : MOAT_EIO;
    }
    int r = moat_sock_init(s, loop, fd, NULL, cb, data);
    if (r != 0) {
        if (ssl)
            SSL_free(ssl);
        return r;
    }
    s->ssl = ssl;
    s->connecting = 1;
    update_poll(s);
    return 0;
}

static void do_read(moat_sock_t *s);

/* Bytes TLS already holds that the poll will never report: decrypted ones inside the SSL
 * object, and received ones in our read buffer. */
static int tls_buffered(moat_sock_t *s)
{
    return s->ssl != NULL && (SSL_pending(s->ssl) > 0 || moat_buf_size(&s->raw) > 0);
}

static void handshake(moat_sock_t *s)
{
    int r = SSL_do_handshake(s->ssl);
    if (r == 1) {
        s->handshaking = 0;
        s->ssl_read_wants_write = 0;
        update_poll(s);
        s->cb->on_connect(s, 0);
        /* The peer's first records may have come in the same read as its last handshake
         * message: the poll will not report them again. */
        if (!s->closing && s->reading && tls_buffered(s))
            do_read(s);
        return;
    }
    int e = SSL_get_error(s->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        s->ssl_read_wants_write = e == SSL_ERROR_WANT_WRITE;
        update_poll(s);
        return;
    }
    ERR_clear_error();
    s->handshaking = 0;
    s->eof = 1;
    s->failed = 1;
    update_poll(s);
    s->cb->on_connect(s, MOAT_ETLS);
}

static void finish_connect(moat_sock_t *s)
{
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    s->connecting = 0;
    if (err != 0) {
        s->eof = 1;
        s->failed = 1;
        s->connect_errno = err;
        update_poll(s);
        s->cb->on_connect(s, MOAT_EUPSTREAM);
        return;
    }
    if (s->ssl) {
        if (attach_bios(s) != 0) {
            s->eof = 1;
            s->failed = 1;
            update_poll(s);
            s->cb->on_connect(s, MOAT_ENOMEM);
            return;
        }
        SSL_set_connect_state(s->ssl);
        s->handshaking = 1;
        handshake(s);
        return;
    }
    update_poll(s);
    s->cb->on_connect(s, 0);
}

static void do_read(moat_sock_t *s)
{
    if (s->in_read)
        return;
    s->in_read = 1;
    for (int i = 0; i < READS_PER_EVENT && s->reading && !s->eof && !s->closing; i++) {
        take_read_buffer(&s->in);
        char *p = moat_buf_reserve(&s->in, READ_CHUNK);
        if (p == NULL) {
            s->in_read = 0;
            broken(s, MOAT_ENOMEM);
            return;
        }
        ssize_t n;
        int err = MOAT_EIO;
        if (s->ssl) {
            int r = SSL_read(s->ssl, p, READ_CHUNK);
            if (r > 0) {
                n = r;
            } else {
                int e = SSL_get_error(s->ssl, r);
                if (e == SSL_ERROR_WANT_READ)
                    break;
                if (e == SSL_ERROR_WANT_WRITE) {
                    s->ssl_read_wants_write = 1;
                    break;
                }
                /* A peer that closes without close_notify is common (browsers, curl): treat
                 * the TCP end as an ordinary end of stream. */
                n = (e == SSL_ERROR_ZERO_RETURN || (e == SSL_ERROR_SYSCALL && r == 0)) ? 0 : -1;
                err = MOAT_ETLS;
                ERR_clear_error();
            }
        } else {
            n = read(s->fd, p, READ_CHUNK);
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                break;
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0)
                err = errno == ECONNRESET ? MOAT_ECLOSED : MOAT_EIO;
        }
        if (n <= 0) {
            s->in_read = 0;
            /* Give the buffer back before the owner hears of the end: when many peers leave
             * at once, each would otherwise hold 16 KiB until its close callback ran. */
            if (moat_buf_size(&s->in) == 0)
                give_read_buffer(&s->in);
            if (n == 0) {
                s->eof = 1;
                s->reading = 0;
                update_poll(s);
                s->cb->on_eof(s, 0);
            } else {
                broken(s, err);
            }
            return;
        }
        moat_buf_commit(&s->in, (size_t)n);
        s->bytes_read += (uint64_t)n;
        s->cb->on_read(s);
        /* A short read drained the socket: the next read would only say EAGAIN, and the
         * level-triggered poll wakes us when more arrives. (TLS cannot tell: a record may
         * end exactly at the buffer's end.) */
        if (s->ssl == NULL && (size_t)n < READ_CHUNK)
            break;
        /* With TLS a whole record may sit decrypted inside the SSL object, invisible to
         * poll: keep reading while it holds bytes. */
        if (tls_buffered(s) && i == READS_PER_EVENT - 1)
            i--;
    }
    s->in_read = 0;
    if (moat_buf_size(&s->in) == 0)
        give_read_buffer(&s->in); /* an idle connection holds no read buffer */
    update_poll(s);
}

/* Write what the queue holds. Returns 0 (done or would block) or a negative code. */
static int flush_out(moat_sock_t *s)
{
    while (moat_buf_size(&s->out) > 0) {
        size_t len = moat_buf_size(&s->out);
        if (s->ssl) {
            len = MOAT_MIN(len, TLS_WRITE_MAX);
            int r = SSL_write(s->ssl, moat_buf_data(&s->out), (int)len);
            if (r <= 0) {
                int e = SSL_get_error(s->ssl, r);
                if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
                    s->ssl_wlen = len;
                    return 0;
                }
                ERR_clear_error();
                return MOAT_ETLS;
            }
            s->ssl_wlen = 0;
            moat_buf_consume(&s->out, (size_t)r);
            s->bytes_written += (uint64_t)r;
        } else {
            ssize_t r = write(s->fd, moat_buf_data(&s->out), len);
            if (r < 0) {
                if (errno == EAGAIN || errno == EWOULDBLOCK)
                    return 0;
                if (errno == EINTR)
                    continue;
                return MOAT_ECLOSED;
            }
            moat_buf_consume(&s->out, (size_t)r);
            s->bytes_written += (uint64_t)r;
        }
    }
    return 0;
}

static void shutdown_write(moat_sock_t *s)
{
    if (s->ssl) {
        SSL_shutdown(s->ssl);
        ERR_clear_error();
    }
    shutdown(s->fd, SHUT_WR);
}

static void on_writable(moat_sock_t *s)
{
    if (s->ssl_read_wants_write) {
        s->ssl_read_wants_write = 0;
        do_read(s);
        if (s->closing)
            return;
    }
    if (moat_buf_size(&s->out) == 0)
        return;
    int r = flush_out(s);
    if (r != 0) {
        broken(s, r);
        return;
    }
    if (moat_buf_size(&s->out) == 0) {
        moat_buf_free(&s->out);
        update_poll(s);
        if (s->shut_after_flush)
            shutdown_write(s);
        s->cb->on_drain(s);
        return;
    }
    update_poll(s);
}

static void on_poll(uv_poll_t *h, int status, int events)
{
    moat_sock_t *s = MOAT_CONTAINER_OF(h, moat_sock_t, poll);
    poll_events++;
    if (s->closing)
        return;
    if (events & UV_READABLE)
        s->raw_drained = 0; /* the socket has bytes (or an end) again */
    if (status < 0) {
        if (s->connecting) {
            s->connecting = 0;
            s->eof = 1;
            s->failed = 1;
            /* libuv reports a poll error as EBADF; the socket knows the real reason. */
            int err = 0;
            socklen_t len = sizeof err;
            if (getsockopt(s->fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err == 0)
                err = -status;
            s->connect_errno = err;
            update_poll(s);
            s->cb->on_connect(s, MOAT_EUPSTREAM);
        } else {
            broken(s, MOAT_EIO);
        }
        return;
    }
    if (s->connecting) {
        finish_connect(s);
        return;
    }
    if (s->handshaking) {
        handshake(s);
        return;
    }
    if (events & UV_WRITABLE) {
        on_writable(s);
        if (s->closing)
            return;
    }
    if (events & UV_READABLE) {
        if (s->reading) {
            do_read(s);
        } else {
            s->read_strict = 1; /* bytes came while stopped: now stop for real */
            update_poll(s);
        }
    }
}

void moat_sock_read_start(moat_sock_t *s)
{
    if (s->reading || s->eof || s->closing)
        return;
    s->reading = 1;
    s->read_strict = 0;
    update_poll(s);
    /* Bytes already decrypted inside the SSL object will not wake the poll. */
    if (!s->handshaking && !s->connecting && tls_buffered(s))
        do_read(s);
}

void moat_sock_read_stop(moat_sock_t *s)
{
    if (!s->reading)
        return;
    s->reading = 0;
    update_poll(s);
}

void moat_sock_consume(moat_sock_t *s, size_t n)
{
    moat_buf_consume(&s->in, n);
}

int moat_sock_writev(moat_sock_t *s, const moat_slice_t *bufs, size_t n)
{
    if (s->closing || s->failed)
        return MOAT_ECLOSED;
    size_t i = 0, skip = 0;
    if (moat_buf_size(&s->out) == 0 && !s->connecting && !s->handshaking) {
        if (s->ssl) {
            /* Gather small pieces into one record: a chunk header, its data and CRLF become
             * one TLS record and one syscall instead of three. */
            char scratch[TLS_WRITE_MAX];
            while (i < n) {
                size_t fill = 0;
                size_t si = i, sskip = skip;
                while (i < n && fill < sizeof scratch) {
                    size_t take = MOAT_MIN(bufs[i].len - skip, sizeof scratch - fill);
                    memcpy(scratch + fill, bufs[i].base + skip, take);
                    fill += take;
                    skip += take;
                    if (skip == bufs[i].len) {
                        i++;
                        skip = 0;
                    }
                }
                if (fill == 0)
                    break;
                int r = SSL_write(s->ssl, scratch, (int)fill);
                if (r <= 0) {
                    int e = SSL_get_error(s->ssl, r);
                    if (e != SSL_ERROR_WANT_WRITE && e != SSL_ERROR_WANT_READ) {
                        ERR_clear_error();
                        return MOAT_ETLS;
                    }
                    /* The record is retried from the queue with the same bytes first. */
                    i = si;
                    skip = sskip;
                    s->ssl_wlen = fill;
                    break;
                }
                s->bytes_written += (uint64_t)r;
            }
        } else {
            struct iovec iov[64];
            while (i < n) {
                int cnt = 0;
                for (size_t j = i; j < n && cnt < 64; j++, cnt++) {
                    iov[cnt].iov_base = bufs[j].base + (j == i ? skip : 0);
                    iov[cnt].iov_len = bufs[j].len - (j == i ? skip : 0);
                }
                ssize_t w = writev(s->fd, iov, cnt);
                if (w < 0) {
                    if (errno == EINTR)
                        continue;
                    if (errno == EAGAIN || errno == EWOULDBLOCK)
                        break;
                    return MOAT_ECLOSED;
                }
                s->bytes_written += (uint64_t)w;
                size_t left = (size_t)w;
                while (i < n && left >= bufs[i].len - skip) {
                    left -= bufs[i].len - skip;
                    skip = 0;
                    i++;
                }
                skip += left;
                if (i < n && left == 0 && cnt > 0 && w == 0)
                    break;
            }
        }
    }
    for (; i < n; i++, skip = 0) {
        if (moat_buf_append(&s->out, bufs[i].base + skip, bufs[i].len - skip) != 0)
            return MOAT_ENOMEM;
    }
    update_poll(s);
    return 0;
}

void moat_sock_shutdown_after_flush(moat_sock_t *s)
{
    if (s->closing)
        return;
    if (moat_buf_size(&s->out) == 0 && !s->connecting && !s->handshaking)
        shutdown_write(s);
    else
        s->shut_after_flush = 1;
}

static void on_poll_close(uv_handle_t *h)
{
    moat_sock_t *s = MOAT_CONTAINER_OF(h, moat_sock_t, poll);
    if (s->ssl)
        SSL_free(s->ssl);
    s->ssl = NULL;
    if (s->fd >= 0)
        close(s->fd);
    s->fd = -1;
    give_read_buffer(&s->in);
    give_read_buffer(&s->raw);
    moat_buf_free(&s->out);
    if (s->cb->on_close)
        s->cb->on_close(s);
}

void moat_sock_close(moat_sock_t *s)
{
    if (s->closing)
        return;
    s->closing = 1;
    if (s->ssl && !s->handshaking && !s->connecting && !s->failed) {
        SSL_shutdown(s->ssl); /* best effort close_notify; never waits */
        ERR_clear_error();
    }
    uv_close((uv_handle_t *)&s->poll, on_poll_close);
}
