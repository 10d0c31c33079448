/* The BoringSSL server context shared by every worker: protocol versions, ciphers, groups,
 * session tickets with rotating keys, certificate selection from the current certificate
 * snapshot (see moat/certs.h for which certificate a ClientHello gets) and ALPN.
 *
 * No lock on the handshake path: the certificate snapshot and the ticket keys a handshake
 * uses are the ones its thread was given with moat_tls_thread_use (each worker sets them when
 * it swaps in a new snapshot), and the ALPN list is fixed when the context is made. */
#ifndef MOAT_TLS_H
#define MOAT_TLS_H

#include "moat/certs.h"
#include <stddef.h>
#include <sys/socket.h>

typedef struct ssl_st SSL;
typedef struct ssl_ctx_st SSL_CTX;
/* An immutable, reference-counted set of session-ticket keys: the first encrypts new tickets,
 * all of them decrypt. */
typedef struct moat_tls_keys moat_tls_keys_t;

/* A new server SSL_CTX (free with SSL_CTX_free): TLS 1.2 and 1.3 only; TLS 1.2 with ECDHE and
 * AEAD ciphers only (ECDSA or RSA certificates); groups X25519 and P-256; session tickets
 * under the ticket keys of the thread that runs the handshake; no server-side session cache;
 * partial writes, moving write buffers and released idle buffers; the ALPN list of
 * moat_tls_set_alpn as it is now. The certificate is chosen per handshake from the thread's
 * snapshot. NULL with a sentence in err on failure. One context serves all workers (BoringSSL
 * contexts are thread-safe once configured). */
SSL_CTX *moat_tls_server_ctx_new(char *err, size_t errlen);

/* A new ticket-key set with one fresh key, followed by the first two keys of `prev` (NULL:
 * none). Tickets under those still decrypt (and are then re-issued under the new key), so with
 * an hourly rotation a ticket lives two to three hours. One reference; control thread. */
moat_tls_keys_t *moat_tls_keys_new(const moat_tls_keys_t *prev);
/* The keys as bytes, to share them with other instances through storage (server/tickets.c):
 * export writes MOAT_TLS_KEY_BYTES per key, newest first, and returns how many bytes (0 when
 * cap is too small); import makes a set (one reference) from such bytes, or NULL when len is
 * not a whole number of keys (1 to 3). Both wipe nothing of the caller's: it wipes its copy. */
#define MOAT_TLS_KEY_BYTES 80
size_t moat_tls_keys_export(const moat_tls_keys_t *ks, uint8_t *out, size_t cap);
moat_tls_keys_t *moat_tls_keys_import(const uint8_t *raw, size_t len);
moat_tls_keys_t *moat_tls_keys_ref(moat_tls_keys_t *ks);
/* Drop a reference; the last one wipes and frees the keys. Any thread. */
void moat_tls_keys_release(moat_tls_keys_t *ks);

/* The certificate snapshot and ticket keys that handshakes on the calling thread use from now
 * on. Both are borrowed: the caller keeps them alive until it sets others (or NULL). Without
 * certificates every handshake is refused; without keys no ticket is issued or accepted. A
 * worker calls it between events, so no handshake callback sees a change halfway. */
void moat_tls_thread_use(const moat_certs_t *certs, const moat_tls_keys_t *keys);

/* The server's ALPN preference list, most preferred first (copied). Default {"http/1.1"}.
 * A client offering none of them gets no ALPN (the connection then speaks HTTP/1.1), not a
 * fatal alert. Contexts made afterwards use it; a context's list never changes, so call this
 * once at start, before moat_tls_server_ctx_new and before any worker runs (not thread-safe).
 * At most 8 protocols. */
void moat_tls_set_alpn(const char *const *protos, size_t n);

/* The negotiated ALPN protocol as a static string ("http/1.1", "h2", "acme-tls/1", or one
 * set by moat_tls_set_alpn), or NULL when none was negotiated. */
const char *moat_tls_selected_alpn(const SSL *ssl);
/* Whether the handshake was refused for a server name no site serves (for the counters). */
int moat_tls_refused_sni(const SSL *ssl);

/* Tell certificate selection the connection's local address, for clients that send no SNI
 * (an https://IP URL). `sa` is borrowed and must stay valid until the handshake ends (keep it
 * in the connection object). Without it, the socket of SSL_get_fd() is asked, if there is
 * one. 0 or MOAT_ETLS. */
int moat_tls_set_local_addr(SSL *ssl, const struct sockaddr *sa);

#endif
