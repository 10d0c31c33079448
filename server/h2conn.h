/* HTTP/2 connections (server/h2conn.c, on the sans-I/O session in http2/). A TLS connection
 * whose ALPN picked "h2" is handed over here by server/conn.c, which keeps owning the socket
 * and the connection object and forwards the socket events. Each stream becomes a proxied
 * request through include/moat/proxy.h, exactly like an HTTP/1.1 request. */
#ifndef MOAT_H2CONN_H
#define MOAT_H2CONN_H

#include "moat/sock.h"
#include <sys/socket.h>

typedef struct moat_worker moat_worker_t;
typedef struct moat_h2conn moat_h2conn_t;

/* What the owning connection (server/conn.c) offers back. */
typedef struct {
    /* End the connection now (after a GOAWAY was queued, or on a fatal error). The owner
     * calls moat_h2conn_free and closes the socket. Called at the end of an entry point
     * (never from inside moat_h2conn_new). */
    void (*close)(void *owner);
} moat_h2conn_owner_t;

/* At start-up, once, by the control thread before the workers start: register the ALPN
 * protocols ("h2" first, then "http/1.1") and read MOAT_H2_REST_MS (see REST_AFTER_MS). */
void moat_h2conn_init(void);

/* Take over a socket whose TLS handshake chose "h2". sock stays owned by the caller; bytes
 * already in its input are the client's first bytes: the owner calls moat_h2conn_on_read
 * once it has stored the pointer (that also sends the server's SETTINGS). Returns NULL when
 * out of memory. */
moat_h2conn_t *moat_h2conn_new(moat_worker_t *w, moat_sock_t *sock, const struct sockaddr *peer,
                               int port, const moat_h2conn_owner_t *owner, void *owner_data);
/* Socket events, forwarded by the owner. */
void moat_h2conn_on_read(moat_h2conn_t *h);
void moat_h2conn_on_drain(moat_h2conn_t *h);
void moat_h2conn_on_eof(moat_h2conn_t *h, int err);
/* Graceful stop or reload: send GOAWAY, let open streams finish, then ask the owner to
 * close. */
void moat_h2conn_shutdown(moat_h2conn_t *h);
/* Free everything (open streams are aborted). The owner closes the socket itself. */
void moat_h2conn_free(moat_h2conn_t *h);

#endif
