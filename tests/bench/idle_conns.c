/* Bench helper: opens N TLS connections to 127.0.0.1:PORT (SNI localhost, ALPN http/1.1) with
 * at most C handshakes in flight, keeps every finished one open and idle, prints
 * {"open":N,"failed":F} and holds them until stdin gives a line or EOF.
 *
 * With "h2" as the fourth argument it offers ALPN h2 only and, after the handshake, does what a
 * browser's HTTP/2 connection does before it goes quiet: sends the client preface and an empty
 * SETTINGS, reads the server's SETTINGS (and the ACK of its own), and ACKs the server's. Only
 * then does the connection count as open. The few frames are built by hand: the point is the
 * server's cost of an HTTP/2 connection that has started and then idles.
 *
 * Why C and why bounded: a Python client spends ~0.6 ms of CPU per handshake, too slow for
 * 5,000 connections inside the bench's time budget; and opening all of them at once (wrk)
 * makes the proxy hold thousands of half-done handshakes together, so what is measured is the
 * allocator's peak, not the cost of an idle connection. A bounded number in flight is what a
 * real population of idle websockets looks like.
 *
 *   idle_conns PORT N [C [h2]]      built by bench.py against BoringSSL */
#include "bench_tls.h"

#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

enum { HANDSHAKE, SEND_PREFACE, READ_SETTINGS, SEND_ACK };

typedef struct {
    int fd;
    SSL *ssl;
    int phase;
    int got_settings, got_ack;
    unsigned char in[256]; /* the frame header (or payload bytes being skipped) so far */
    size_t nin, skip;
} idle_conn_t;

static const char preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                              "\x00\x00\x00\x04\x00\x00\x00\x00\x00"; /* empty SETTINGS */
static const char settings_ack[] = "\x00\x00\x00\x04\x01\x00\x00\x00\x00";

static int start_one(SSL_CTX *ctx, int ep, int port, idle_conn_t *c)
{
    int fd;
    SSL *ssl = bench_tls_start(ctx, port, &fd);
    if (ssl == NULL)
        return -1;
    c->fd = fd;
    c->ssl = ssl;
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN, .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
    return 0;
}

/* Wait for what the SSL asked for after returning r; 0, or -1 when the connection failed. */
static int want(int ep, idle_conn_t *c, int r)
{
    int e = SSL_get_error(c->ssl, r);
    if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
        ERR_clear_error();
        return -1;
    }
    struct epoll_event ev = {.events = e == SSL_ERROR_WANT_READ ? EPOLLIN : EPOLLOUT,
                             .data.ptr = c};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    return 0;
}

/* Frames from the server: only SETTINGS matter; everything else (WINDOW_UPDATE...) is skipped. */
static void parse_frames(idle_conn_t *c, const unsigned char *p, size_t n)
{
    while (n > 0) {
        if (c->skip > 0) {
            size_t k = n < c->skip ? n : c->skip;
            c->skip -= k, p += k, n -= k;
            continue;
        }
        c->in[c->nin++] = *p++, n--;
        if (c->nin < 9)
            continue;
        size_t len = (size_t)c->in[0] << 16 | (size_t)c->in[1] << 8 | c->in[2];
        if (c->in[3] == 4 && (c->in[4] & 1))
            c->got_ack = 1;
        else if (c->in[3] == 4)
            c->got_settings = 1;
        c->skip = len;
        c->nin = 0;
    }
}

/* 1: done (handshake, and the HTTP/2 start when h2), 0: wants more I/O (epoll interest
 * updated), -1: failed. */
static int step(int ep, idle_conn_t *c, int h2)
{
    for (;;) {
        int r;
        switch (c->phase) {
        case HANDSHAKE:
            r = SSL_do_handshake(c->ssl);
            if (r != 1)
                return want(ep, c, r);
            if (!h2)
                return 1;
            c->phase = SEND_PREFACE;
            break;
        case SEND_PREFACE:
            r = SSL_write(c->ssl, preface, (int)sizeof preface - 1);
            if (r <= 0)
                return want(ep, c, r);
            c->phase = READ_SETTINGS;
            break;
        case READ_SETTINGS: {
            unsigned char buf[4096];
            r = SSL_read(c->ssl, buf, sizeof buf);
            if (r <= 0)
                return want(ep, c, r);
            parse_frames(c, buf, (size_t)r);
            if (c->got_settings && c->got_ack)
                c->phase = SEND_ACK;
            break;
        }
        case SEND_ACK:
            r = SSL_write(c->ssl, settings_ack, (int)sizeof settings_ack - 1);
            if (r <= 0)
                return want(ep, c, r);
            return 1;
        }
    }
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: idle_conns PORT N [CONCURRENCY [h2]]\n");
        return 2;
    }
    int port = atoi(argv[1]), n = atoi(argv[2]), conc = argc > 3 ? atoi(argv[3]) : 64;
    int h2 = argc > 4 && strcmp(argv[4], "h2") == 0;
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    static const unsigned char alpn_h1[] = "\x08http/1.1", alpn_h2[] = "\x02h2";
    if (h2)
        SSL_CTX_set_alpn_protos(ctx, alpn_h2, sizeof alpn_h2 - 1);
    else
        SSL_CTX_set_alpn_protos(ctx, alpn_h1, sizeof alpn_h1 - 1);
    idle_conn_t *conns = calloc((size_t)n, sizeof *conns);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    int started = 0, done = 0, failed = 0, inflight = 0;
    while (done + failed < n) {
        while (inflight < conc && started < n) {
            if (start_one(ctx, ep, port, &conns[started]) == 0)
                inflight++;
            else
                failed++;
            started++;
        }
        struct epoll_event evs[256];
        int k = epoll_wait(ep, evs, 256, 15000);
        if (k <= 0)
            break; /* nothing moved for 15 s: report what we have */
        for (int i = 0; i < k; i++) {
            idle_conn_t *c = evs[i].data.ptr;
            int r = step(ep, c, h2);
            if (r == 0)
                continue;
            /* Done or failed: either way it leaves the poll set; a done one stays open. */
            epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
            inflight--;
            if (r == 1) {
                done++;
            } else {
                SSL_free(c->ssl);
                close(c->fd);
                c->ssl = NULL;
                failed++;
            }
        }
    }
    printf("{\"open\": %d, \"failed\": %d}\n", done, n - done);
    fflush(stdout);
    char line[16];
    if (fgets(line, sizeof line, stdin) == NULL) {
        /* EOF: the caller is gone or done */
    }
    /* Exit closes every socket; the SSL objects go with the process. */
    return 0;
}
