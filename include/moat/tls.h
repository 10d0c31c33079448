/* The BoringSSL server context shared by every worker: protocol versions, ciphers, groups,
 * session tickets with rotating keys, certificate selection from the current certificate
 * snapshot (see moat/certs.h for which certificate a ClientHello gets) and ALPN. */
#ifndef MOAT_TLS_H
#define MOAT_TLS_H

#include <stddef.h>
#include <sys/socket.h>

typedef struct ssl_st SSL;
typedef struct ssl_ctx_st SSL_CTX;

/* A new server SSL_CTX (free with SSL_CTX_free): TLS 1.2 and 1.3 only; TLS 1.2 with ECDHE and
 * AEAD ciphers only (ECDSA or RSA certificates); groups X25519 and P-256; session tickets
 * whose keys rotate (moat_tls_rotate_ticket_keys); no server-side session cache; partial
 * writes, moving write buffers and released idle buffers. The certificate is chosen per
 * handshake from moat_certs_acquire(). NULL with a sentence in err on failure. One context
 * serves all workers (BoringSSL contexts are thread-safe once configured). */
SSL_CTX *moat_tls_server_ctx_new(char *err, size_t errlen);

/* Start a new ticket-encryption key. Tickets under the previous two keys still decrypt (and are
 * then re-issued under the new key), so with an hourly call a ticket lives two to three hours.
 * Thread-safe; the control thread calls it every hour. */
void moat_tls_rotate_ticket_keys(void);

/* The server's ALPN preference list, most preferred first (copied). Default {"http/1.1"}.
 * A client offering none of them gets no ALPN (the connection then speaks HTTP/1.1), not a
 * fatal alert. Thread-safe; takes effect for the next handshake. At most 8 protocols. */
void moat_tls_set_alpn(const char *const *protos, size_t n);

/* The negotiated ALPN protocol as a static string ("http/1.1", "h2", "acme-tls/1", or one
 * set by moat_tls_set_alpn), or NULL when none was negotiated. */
const char *moat_tls_selected_alpn(const SSL *ssl);

/* Tell certificate selection the connection's local address, for clients that send no SNI
 * (an https://IP URL). `sa` is borrowed and must stay valid until the handshake ends (keep it
 * in the connection object). Without it, the socket of SSL_get_fd() is asked, if there is
 * one. 0 or MOAT_ETLS. */
int moat_tls_set_local_addr(SSL *ssl, const struct sockaddr *sa);

#endif
