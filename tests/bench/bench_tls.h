/* What the bench's C clients (idle_conns.c, ws_hold.c) share: a non-blocking TLS client
 * connection to 127.0.0.1:PORT with SNI "localhost", in connect state, the handshake not yet
 * begun (ALPN may still be set on it). Returns the SSL, or NULL with nothing left open. */
#ifndef BENCH_TLS_H
#define BENCH_TLS_H

#include <errno.h>
#include <netinet/in.h>
#include <openssl/ssl.h>
#include <sys/socket.h>
#include <unistd.h>

static SSL *bench_tls_start(SSL_CTX *ctx, int port, int *fd_out)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return NULL;
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sa, sizeof sa) != 0 && errno != EINPROGRESS) {
        close(fd);
        return NULL;
    }
    SSL *ssl = SSL_new(ctx);
    if (ssl == NULL) {
        close(fd);
        return NULL;
    }
    SSL_set_fd(ssl, fd);
    SSL_set_tlsext_host_name(ssl, "localhost");
    SSL_set_connect_state(ssl);
    *fd_out = fd;
    return ssl;
}

#endif
