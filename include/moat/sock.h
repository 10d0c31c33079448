/* A non-blocking socket on a libuv loop, plain or TLS, that reads and writes the file
 * descriptor itself on readiness (uv_poll_t). TLS reads and writes the socket directly, so
 * no record is copied through a memory BIO. Bytes that cannot be written at once are copied
 * to an output queue; the owner watches moat_sock_queued() against a high-water mark to
 * apply backpressure, and gets on_drain when the queue empties. An idle socket holds no
 * buffer: the read buffer is taken when bytes arrive and given back once consumed. */
#ifndef MOAT_SOCK_H
#define MOAT_SOCK_H

#include "moat/common.h"
#include <openssl/ssl.h>
#include <uv.h>

typedef struct moat_sock moat_sock_t;

typedef struct {
    /* Bytes arrived: they are in moat_sock_input(); consume what was used with
     * moat_sock_consume(). Called again only when new bytes arrive. */
    void (*on_read)(moat_sock_t *s);
    /* The peer closed its side (EOF) or the connection failed (err < 0). Called once. */
    void (*on_eof)(moat_sock_t *s, int err);
    /* The output queue became empty. */
    void (*on_drain)(moat_sock_t *s);
    /* A non-blocking connect finished (err 0) or failed; or a TLS handshake finished. */
    void (*on_connect)(moat_sock_t *s, int err);
    /* Both handles are closed: the owner may free its memory now. */
    void (*on_close)(moat_sock_t *s);
} moat_sock_cb_t;

struct moat_sock {
    uv_poll_t poll;
    int fd;
    SSL *ssl;
    const moat_sock_cb_t *cb;
    void *data;               /* the owner's */
    moat_buf_t in;            /* received bytes not yet consumed */
    moat_buf_t out;           /* bytes not yet written */
    moat_buf_t raw;           /* TLS only: received record bytes BoringSSL has not asked for */
    size_t ssl_wlen;          /* length of the SSL_write that must be retried, 0 if none */
    int events;               /* UV_READABLE | UV_WRITABLE now asked of the poll */
    unsigned reading : 1;     /* the owner wants bytes */
    unsigned connecting : 1;  /* TCP connect in flight */
    unsigned handshaking : 1; /* TLS handshake in flight */
    unsigned eof : 1;         /* on_eof was called */
    unsigned closing : 1;
    unsigned shut_after_flush : 1;
    unsigned in_read : 1;
    unsigned ssl_read_wants_write : 1;
    unsigned failed : 1;      /* broken: no more reads or writes */
    unsigned read_strict : 1; /* bytes arrived while reads were stopped: unregister */
    unsigned raw_drained : 1; /* TLS: the last read() came back short; wait for the poll */
    uint64_t bytes_read, bytes_written;
    int connect_errno; /* why a connect failed (an errno value; 0: not known), for logs */
};

/* Adopt a connected fd (accepted). ssl may be NULL; when set, the server handshake runs
 * first and on_connect reports its end. Returns 0, or a negative code with nothing left
 * behind: fd closed, ssl freed, no handle on the loop (the caller only frees its memory). */
int moat_sock_init(moat_sock_t *s, uv_loop_t *loop, int fd, SSL *ssl, const moat_sock_cb_t *cb,
                   void *data);
/* Start a non-blocking connect to addr; on_connect reports the result (after the TLS client
 * handshake, when ssl is set). */
int moat_sock_connect(moat_sock_t *s, uv_loop_t *loop, const struct sockaddr *addr,
                      socklen_t addrlen, SSL *ssl, const moat_sock_cb_t *cb, void *data);

void moat_sock_read_start(moat_sock_t *s);
void moat_sock_read_stop(moat_sock_t *s);
static inline moat_slice_t moat_sock_input(moat_sock_t *s)
{
    return moat_slice(moat_buf_data(&s->in), moat_buf_size(&s->in));
}
void moat_sock_consume(moat_sock_t *s, size_t n);

/* Write these slices now or queue what cannot be written. Returns 0 or a negative code
 * (the connection is then broken; on_eof follows). */
int moat_sock_writev(moat_sock_t *s, const moat_slice_t *bufs, size_t n);
static inline int moat_sock_write(moat_sock_t *s, const void *p, size_t len)
{
    moat_slice_t b = moat_slice(p, len);
    return moat_sock_writev(s, &b, 1);
}
static inline size_t moat_sock_queued(const moat_sock_t *s)
{
    return moat_buf_size(&s->out);
}
/* Half-close the write side once the output queue is empty. */
void moat_sock_shutdown_after_flush(moat_sock_t *s);
/* Close now (queued bytes are dropped); on_close follows. Safe to call more than once. */
void moat_sock_close(moat_sock_t *s);
/* Free the calling thread's cache of read buffers (when its loop has ended). */
void moat_sock_thread_cleanup(void);
/* How many socket events this thread has handled so far (for telling an idle worker). */
uint64_t moat_sock_thread_events(void);

#endif
