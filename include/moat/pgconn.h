/* One connection to PostgreSQL (storage/pgconn.c): TCP, then TLS through BoringSSL after an
 * SSLRequest (verify-full against a root file or the system store), SCRAM-SHA-256 or, when
 * the server offers it over TLS, SCRAM-SHA-256-PLUS with tls-server-end-point channel binding;
 * then statements over the extended query protocol with bound parameters only.
 *
 * Internal to storage/ (storage/postgres.c and the storage unit test). Calls are synchronous
 * and bounded: every one has a deadline (timeout_ms) enforced with poll() on the socket, and a
 * connection that missed one, or lost its socket, is broken for good (moat_pgconn_broken):
 * its owner opens a new one. Errors carry a sentence naming the server and what to do. TLS
 * writes go through write(2): the process ignores SIGPIPE (moat's main does). */
#ifndef MOAT_PGCONN_H
#define MOAT_PGCONN_H

#include "moat/common.h"

typedef enum {
    MOAT_PG_SSL_DISABLE,     /* plain TCP (only for a server on the same host) */
    MOAT_PG_SSL_REQUIRE,     /* TLS, the certificate not checked (channel binding still is) */
    MOAT_PG_SSL_VERIFY_CA,   /* TLS, chain to sslrootcert (or the system store), any name */
    MOAT_PG_SSL_VERIFY_FULL, /* TLS, chain to sslrootcert (or the system store) and host name */
} moat_pg_sslmode_t;

/* Where and how to connect; strings owned (moat_pg_params_clear). */
typedef struct {
    char *host;
    int port;
    char *user, *password, *dbname;
    moat_pg_sslmode_t sslmode;
    char *sslrootcert;            /* NULL: the system trust store */
    int timeout_ms;               /* each call's deadline; 0 means 3000 */
    int channel_binding_required; /* channel_binding=require: SCRAM-SHA-256-PLUS or nothing */
} moat_pg_params_t;

/* Parse postgres://USER[:PASSWORD]@HOST[:PORT]/DBNAME[?sslmode=...&sslrootcert=FILE&
 * connect_timeout=SECONDS&channel_binding=prefer|require] (postgresql:// too; percent-escapes
 * decoded; [v6] hosts; sslmode disable, require, verify-ca or verify-full). With no
 * password in the URL: MOAT_STORAGE_PASSWORD, else the first matching line of the file named by
 * PGPASSFILE (or ~/.pgpass), host:port:database:user:password with * wildcards. sslmode
 * defaults to verify-full. 0, or MOAT_EINVAL with a sentence in err. */
int moat_pg_params_parse(const char *url, moat_pg_params_t *out, char *err, size_t errlen);
void moat_pg_params_clear(moat_pg_params_t *p);

typedef struct moat_pgconn moat_pgconn_t;

/* Connect, secure and log in. 0 with *out, or a negative code with a sentence in err:
 * MOAT_EIO / MOAT_ETIMEOUT (unreachable), MOAT_ETLS (TLS refused or the certificate not
 * trusted), MOAT_EPERM (login refused), MOAT_EPARSE (not speaking PostgreSQL). */
int moat_pgconn_open(const moat_pg_params_t *p, moat_pgconn_t **out, char *err, size_t errlen);
void moat_pgconn_free(moat_pgconn_t *c);

/* The rows of one statement, in text format: cell(r, c) is a NUL-terminated copy, NULL for
 * SQL NULL. */
typedef struct {
    size_t nrows, ncols;
    char **cells;
    size_t *lens;
    char tag[64]; /* the command tag: "INSERT 0 1", "SELECT 3", ... */
} moat_pg_result_t;

static inline const char *moat_pg_cell(const moat_pg_result_t *r, size_t row, size_t col)
{
    return row < r->nrows && col < r->ncols ? r->cells[row * r->ncols + col] : NULL;
}
void moat_pg_result_clear(moat_pg_result_t *r);

/* Run one statement with n parameters ($1..$n): vals[i] NULL is SQL NULL, lens NULL means
 * strlen, binary[i] non-zero sends that value as raw bytes (bytea). res may be NULL.
 * 0; MOAT_ESTORAGE when the server refused the statement (the connection stays usable; the
 * SQLSTATE is moat_pgconn_sqlstate); another code when the connection broke. */
int moat_pgconn_exec(moat_pgconn_t *c, const char *sql, size_t n, const char *const *vals,
                     const size_t *lens, const int *binary, moat_pg_result_t *res);
const char *moat_pgconn_error(const moat_pgconn_t *c);
const char *moat_pgconn_sqlstate(const moat_pgconn_t *c);
/* Whether the connection can no longer be used (timed out, closed, protocol error). */
int moat_pgconn_broken(const moat_pgconn_t *c);
/* 'I' idle, 'T' inside a transaction, 'E' inside a failed transaction (last ReadyForQuery). */
char moat_pgconn_tx_status(const moat_pgconn_t *c);
/* Whether channel binding (SCRAM-SHA-256-PLUS) was used to log in. */
int moat_pgconn_channel_bound(const moat_pgconn_t *c);

/* The server process of this connection (BackendKeyData): a notification carrying it came
 * from this connection's own statements. */
int moat_pgconn_backend_pid(const moat_pgconn_t *c);
/* The socket, for watching LISTEN notifications with a poller. */
int moat_pgconn_fd(const moat_pgconn_t *c);
/* Read whatever the server sent without waiting and hand each notification to cb (the
 * notifying server process, channel, payload). 0, or a negative code when the connection broke. */
typedef void (*moat_pgconn_notify_cb)(void *arg, int pid, const char *channel, const char *payload);
int moat_pgconn_drain(moat_pgconn_t *c, moat_pgconn_notify_cb cb, void *arg);

#endif
