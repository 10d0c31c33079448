/* The PostgreSQL frontend/backend protocol, version 3, sans-I/O (storage/pgwire.c): encoders
 * that append frontend messages to a buffer, a decoder that takes bytes and returns one
 * backend message at a time, and the SCRAM-SHA-256 client steps (RFC 5802, RFC 7677) with
 * tls-server-end-point channel binding (RFC 5929). No sockets here: storage/pgconn.c feeds it.
 *
 * Internal to storage/ (and its unit test and fuzz target). moat speaks the protocol itself
 * because Debian's libpq is linked against OpenSSL, which clashes with BoringSSL in one
 * process. Every encoder returns 0 or MOAT_ENOMEM / MOAT_EINVAL (a field too long for the
 * protocol's 32-bit lengths, or a string with a NUL byte where the protocol cannot carry one). */
#ifndef MOAT_PGWIRE_H
#define MOAT_PGWIRE_H

#include "moat/common.h"
#include <stdint.h>

/* The largest backend message the decoder accepts (certificates are a few KiB; a row list
 * of them stays far below this). A larger length is a protocol error, not a wait. */
#define MOAT_PGW_MAX_MSG (16u << 20)

/* ---- frontend messages ---- */

int moat_pgw_ssl_request(moat_buf_t *b);
/* StartupMessage: user and database (NULL: same as user), and application_name. */
int moat_pgw_startup(moat_buf_t *b, const char *user, const char *database, const char *app);
int moat_pgw_sasl_initial(moat_buf_t *b, const char *mechanism, const void *data, size_t len);
int moat_pgw_sasl_response(moat_buf_t *b, const void *data, size_t len);
int moat_pgw_password(moat_buf_t *b, const char *password);
/* Parse of an unnamed statement with n parameters whose types the server infers. */
int moat_pgw_parse(moat_buf_t *b, const char *stmt, const char *sql);
/* Bind of the unnamed portal: values[i] NULL binds SQL NULL; lens[i] the length (values are
 * not NUL-terminated); binary[i] non-zero sends that one in binary format (bytea as raw bytes),
 * or binary NULL for all text. Results come back in text format. */
int moat_pgw_bind(moat_buf_t *b, const char *stmt, size_t n, const char *const *values,
                  const size_t *lens, const int *binary);
/* Describe of the unnamed portal ('P') or a statement ('S'). */
int moat_pgw_describe(moat_buf_t *b, char kind, const char *name);
int moat_pgw_execute(moat_buf_t *b, const char *portal, uint32_t max_rows);
int moat_pgw_sync(moat_buf_t *b);
int moat_pgw_terminate(moat_buf_t *b);

/* ---- backend messages ---- */

typedef enum {
    MOAT_PGW_AUTH_OK = 0,
    MOAT_PGW_AUTH_CLEARTEXT = 3,
    MOAT_PGW_AUTH_MD5 = 5,
    MOAT_PGW_AUTH_SASL = 10,
    MOAT_PGW_AUTH_SASL_CONTINUE = 11,
    MOAT_PGW_AUTH_SASL_FINAL = 12,
} moat_pgw_auth_t;

/* Fields of an ErrorResponse or NoticeResponse; slices point into the message. */
typedef struct {
    moat_slice_t severity, code, message, detail, hint, where, constraint;
} moat_pgw_error_t;

/* One decoded backend message. Every slice points into the bytes given to moat_pgw_next and
 * is valid while they are. */
typedef struct {
    char type;         /* the message type byte: 'R', 'E', 'Z', 'D', ... */
    moat_slice_t body; /* everything after the length */
    union {
        struct {
            int32_t code;      /* moat_pgw_auth_t, or another the server asked for */
            moat_slice_t data; /* SASL: the mechanism list; continue/final: the server's data */
        } auth;
        moat_pgw_error_t error; /* 'E' and 'N' */
        struct {
            moat_slice_t name, value;
        } param; /* 'S' ParameterStatus */
        struct {
            int32_t pid, key;
        } key;      /* 'K' BackendKeyData */
        char ready; /* 'Z': 'I' idle, 'T' in a transaction, 'E' failed one */
        struct {
            uint16_t ncols; /* 'D' DataRow: read the columns with moat_pgw_row_col */
        } row;
        struct {
            uint16_t nfields; /* 'T' RowDescription */
        } desc;
        moat_slice_t tag; /* 'C' CommandComplete */
        struct {
            int32_t pid;
            moat_slice_t channel, payload;
        } notify; /* 'A' NotificationResponse */
    } u;
} moat_pgw_msg_t;

/* Decode the first backend message in data[0, len): 1 and *used set when one is complete and
 * well formed, 0 when more bytes are needed, MOAT_EPARSE when the bytes are not a valid
 * message (then `err` says why). Never reads outside the range. */
int moat_pgw_next(const void *data, size_t len, moat_pgw_msg_t *msg, size_t *used, char *err,
                  size_t errlen);
/* Column i of a DataRow moat_pgw_next accepted: 0 with *val (NULL base when SQL NULL). */
int moat_pgw_row_col(const moat_pgw_msg_t *msg, uint16_t i, moat_slice_t *val, int *is_null);
/* An ErrorResponse or NoticeResponse as one sentence: "ERROR: message (detail) [SQLSTATE]". */
void moat_pgw_error_sentence(const moat_pgw_error_t *e, char *out, size_t cap);
/* Whether a SASL mechanism list (auth.data of MOAT_PGW_AUTH_SASL) offers `mech`. */
int moat_pgw_sasl_offers(moat_slice_t list, const char *mech);

/* ---- SCRAM-SHA-256 (client side) ---- */

typedef struct {
    char nonce[64];          /* the client nonce, base64 */
    char *client_first_bare; /* "n=,r=<nonce>" */
    char *gs2;               /* "n,," or "p=tls-server-end-point,," */
    char *cbind;             /* the channel-binding data (certificate hash), or NULL */
    size_t cbind_len;
    unsigned char server_key[32];
    char *auth_message;
} moat_pgw_scram_t;

/* The client-first message into `out`. cbind (the hash of the server's certificate) non-NULL
 * selects SCRAM-SHA-256-PLUS with tls-server-end-point; without it, over_tls says the client
 * could have bound the channel but the server did not offer it (GS2 flag "y": a server that
 * does support binding then knows the offer was stripped on the way, and refuses). nonce NULL
 * draws a random one (tests pass a fixed nonce). */
int moat_pgw_scram_first(moat_pgw_scram_t *s, const char *nonce, const void *cbind,
                         size_t cbind_len, int over_tls, moat_buf_t *out);
/* Given the server-first message, append the client-final message (with the proof) to out.
 * MOAT_EPARSE with a sentence in err when the server's message is malformed, its nonce does
 * not extend ours, or its iteration count is out of range. */
int moat_pgw_scram_final(moat_pgw_scram_t *s, const char *password, moat_slice_t server_first,
                         moat_buf_t *out, char *err, size_t errlen);
/* Check the server-final message: 0 when the server proved it knows the password's verifier,
 * MOAT_EPERM otherwise (err says why). */
int moat_pgw_scram_verify(moat_pgw_scram_t *s, moat_slice_t server_final, char *err, size_t errlen);
void moat_pgw_scram_clear(moat_pgw_scram_t *s);

#endif
