/* Storage: where certificates, keys, the internal CA and events live. A vtable with two
 * backends: SQLite (storage/sqlite.c) at DATA/moat.db, the default, and PostgreSQL
 * (storage/postgres.c) for several instances sharing one store; storage/encrypt.c wraps
 * either to seal secrets at rest. Storage knows nothing of HTTP, TLS or ACME: it keeps PEM
 * text and metadata. Calls are synchronous, on the control thread only. Every function
 * returns 0 or a negative MOAT_E* code; on failure a sentence a user can act on is available
 * from moat_storage_last_error(). */
#ifndef MOAT_STORAGE_H
#define MOAT_STORAGE_H

#include "moat/common.h"
#include <stdint.h>

typedef struct moat_storage moat_storage_t;

/* One stored certificate with its private key. `id` is the caller's key (for example
 * "internal-root", "internal-intermediate", "site:chat.example.com"). Strings are owned by
 * the record: free with moat_cert_record_clear(). */
typedef struct {
    char *id;
    char *names;                   /* comma-separated DNS names / IPs the certificate covers */
    char *issuer;                  /* the issuer's common name, for display */
    char *source;                  /* "internal", "files", "acme" */
    int64_t not_before, not_after; /* Unix seconds */
    char *cert_pem;                /* leaf first, then chain */
    char *key_pem;
    int64_t updated_at;
} moat_cert_record_t;

typedef struct {
    int64_t time;
    char *kind; /* "issued", "renewed", "ca-created", ... */
    char *names;
    char *detail;
} moat_event_t;

/* One kv row, as listed by kv_list. */
typedef struct {
    char *key, *value;
    int64_t updated_at; /* Unix seconds of the last kv_put */
} moat_kv_t;

/* News from a shared store (watch_drain): "cert:<id>" when another instance stored that
 * certificate, "resync" when news may have been missed (the watch was re-established after a
 * break): read everything again. */
typedef void (*moat_storage_news_cb)(void *arg, const char *what);

typedef struct moat_storage_ops {
    /* Insert or replace the record with this id, in one transaction (a level inside the
     * caller's, when one is open). updated_at 0 means "now". NULL strings are stored and
     * read back as NULL. */
    int (*put_cert)(moat_storage_t *s, const moat_cert_record_t *rec);
    /* MOAT_ENOT_FOUND when absent. */
    int (*get_cert)(moat_storage_t *s, const char *id, moat_cert_record_t *out);
    /* All records ordered by id; *out is an array of *n records (free each, then the array). */
    int (*list_certs)(moat_storage_t *s, moat_cert_record_t **out, size_t *n);
    int (*add_event)(moat_storage_t *s, const char *kind, const char *names, const char *detail);
    /* Newest first, at most `limit`. */
    int (*list_events)(moat_storage_t *s, size_t limit, moat_event_t **out, size_t *n);
    /* Small values (settings, ACME accounts, backoff state). MOAT_ENOT_FOUND when absent;
     * kv_put with a NULL value deletes the key. */
    int (*kv_put)(moat_storage_t *s, const char *key, const char *value);
    int (*kv_get)(moat_storage_t *s, const char *key, char **value_out);
    /* Every key starting with `prefix`, ordered by key: *out is an array of *n rows (free with
     * moat_kv_free). An index walk, cheap enough to poll every second. */
    int (*kv_list)(moat_storage_t *s, const char *prefix, moat_kv_t **out, size_t *n);
    /* Group several changes into one transaction. Calls nest: an inner begin is a savepoint,
     * its rollback undoes only its own changes. A commit that fails leaves its level open:
     * call rollback. A begin that fails opened nothing: do not call rollback for it.
     * commit/rollback without begin: MOAT_EINVAL.
     * close() with a transaction open discards it. */
    int (*begin)(moat_storage_t *s);
    int (*commit)(moat_storage_t *s);
    int (*rollback)(moat_storage_t *s);
    void (*close)(moat_storage_t *s);
    /* Look for damage anywhere in the store, not only where the next read or write lands
     * (SQLite: PRAGMA quick_check), and move what is pending into the main file when it can
     * (a passive WAL checkpoint; a full disk is not damage). 0, or MOAT_ESTORAGE with
     * last_error naming the file and what to do.
     * Reads the whole store: for the start, a reload and an hourly look, not a hot path. */
    int (*check)(moat_storage_t *s);

    /* Leases with fencing tokens: one per `name` (an issuing lock per certificate), timed on
     * the store's own clock (SQLite's unixepoch(), PostgreSQL's now()), so the clocks of the
     * machines sharing it do not matter. Tokens only grow.
     * lease_take, one statement: 1 with *token when taken (free, run out, already `owner`'s —
     * a new token then — or held by `steal`, a holder known to be dead; steal may be NULL);
     * 0 when another holder's lease still runs (*holder, when not NULL, gets its owner: free
     * it); < 0 a storage error. */
    int (*lease_take)(moat_storage_t *s, const char *name, const char *owner, int ttl_s,
                      const char *steal, int64_t *token, char **holder);
    /* Extend the lease to ttl_s from now while `token` still holds it: 0, or MOAT_ENOT_FOUND
     * when another took it since. */
    int (*lease_renew)(moat_storage_t *s, const char *name, int64_t token, int ttl_s);
    /* End it now, if `token` still holds it (otherwise nothing changes): 0 either way. */
    int (*lease_release)(moat_storage_t *s, const char *name, int64_t token);
    /* put_cert, only while `token` holds lease `lease` and only over a record that is not
     * newer (not_after) than rec: MOAT_EPERM when the lease was lost (another instance took
     * it: its write stands), MOAT_EEXISTS when a newer certificate is stored; nothing is
     * written in either case. */
    int (*put_cert_fenced)(moat_storage_t *s, const moat_cert_record_t *rec, const char *lease,
                           int64_t token);

    /* Changes other instances make, pushed (PostgreSQL: LISTEN on a second connection, NOTIFY
     * from a trigger on commit). watch_fd: a descriptor that turns readable when there is
     * news, or -1 when the backend has none to offer (SQLite) or cannot now (the server is
     * away; call again later, at most every few seconds). Stop polling the previous descriptor
     * before calling it again. watch_drain: read the news without waiting and hand each to cb;
     * 0, or MOAT_ECLOSED when the watch broke (stop polling its descriptor, then watch_fd). */
    int (*watch_fd)(moat_storage_t *s);
    int (*watch_drain)(moat_storage_t *s, moat_storage_news_cb cb, void *arg);
} moat_storage_ops_t;

struct moat_storage {
    const moat_storage_ops_t *ops;
    char last_error[512];
    /* A store other machines share (PostgreSQL): peers may appear at any moment, so what one
     * instance publishes is given time to reach them even when none is known yet. */
    int shared;
    /* Secrets are sealed before they reach the store (moat_storage_encrypt). */
    int sealed;
};

/* Open (creating when needed) DATA_DIR/moat.db: the folder is created 0700, the file 0600,
 * WAL mode, busy timeout, schema migrated forward. A database written by a newer moat is
 * refused (MOAT_ESCHEMA) and never modified; so is a damaged one (MOAT_ESTORAGE), damage
 * anywhere in the file, found before the first write. On failure *out is NULL and `err` (if not
 * NULL) holds a sentence naming the path and what to do. */
int moat_storage_open_sqlite(const char *data_dir, moat_storage_t **out, char *err, size_t errlen);

/* Open the PostgreSQL store named by a postgres:// URL (include/moat/pgconn.h says what the
 * URL may hold and where the password comes from): connect, verify the server, log in with
 * SCRAM, and migrate the schema `moat` forward under an advisory lock. A schema written by a
 * newer moat is refused (MOAT_ESCHEMA). Calls on the store are bounded by a deadline; while
 * the server is away they fail at once (MOAT_ESTORAGE) and a reconnect is tried after a
 * backoff. storage/postgres.c. */
int moat_storage_open_postgres(const char *url, moat_storage_t **out, char *err, size_t errlen);

/* Open the store `spec` names: NULL or "" for DATA_DIR/moat.db, "sqlite:DIR" for DIR/moat.db
 * ("sqlite:DIR/moat.db" too), or a postgres:// URL; with key_file (may be NULL), wrapped by
 * moat_storage_encrypt. */
int moat_storage_open(const char *spec, const char *data_dir, const char *key_file,
                      moat_storage_t **out, char *err, size_t errlen);
/* Seal secrets at rest: a storage wrapping `inner` that encrypts every private key (key_pem)
 * and every kv value with AES-256-GCM under the key in key_file (base64 of 32 bytes; created
 * 0600 with a random key when the file does not exist), bound to the row it belongs to. Values
 * written without a key are read as they are and sealed at their next write; a sealed value
 * that does not open (another key) is MOAT_ECRYPTO with a sentence. Every instance sharing a
 * store needs the same key file. On success the wrapper owns inner (close closes both); on
 * failure inner is untouched. storage/encrypt.c. */
int moat_storage_encrypt(moat_storage_t *inner, const char *key_file, moat_storage_t **out,
                         char *err, size_t errlen);

typedef struct {
    size_t certs_copied, certs_same, certs_newer_kept;
    size_t settings_copied, settings_same;
} moat_storage_copy_stats_t;

/* Copy every certificate and setting of `from` into `to`, in one transaction of `to`; safe to
 * repeat. A certificate `to` holds with a later not_after is kept (never an older one over a
 * newer); identical ones are left alone. Not copied: the event log (its times would be lost),
 * leases, and the kv rows of live processes and pending challenges (acme-instance:*,
 * acme-token*). 0, or MOAT_ESTORAGE with a sentence in err (nothing changed in `to`).
 * storage/copy.c. */
int moat_storage_copy(moat_storage_t *from, moat_storage_t *to, moat_storage_copy_stats_t *stats,
                      char *err, size_t errlen);

/* Whether spec names a PostgreSQL store (a store shared between machines: no pid file or
 * "--data" advice applies to it). */
int moat_storage_is_postgres(const char *spec);

void moat_cert_record_clear(moat_cert_record_t *r);
void moat_event_clear(moat_event_t *e);
/* Free an array returned by list_certs / list_events: clears each element, then the array. */
void moat_cert_records_free(moat_cert_record_t *recs, size_t n);
void moat_events_free(moat_event_t *events, size_t n);
void moat_kv_free(moat_kv_t *rows, size_t n);

/* The schema version this build reads and writes (PRAGMA user_version of moat.db; the row of
 * moat.schema_version in PostgreSQL). */
#define MOAT_STORAGE_SCHEMA_VERSION 2

/* Internal to storage/: the SQL that moves the schema from version - 1 to `version`
 * (1..MOAT_STORAGE_SCHEMA_VERSION), or NULL outside that range. storage/migrations.c. */
const char *moat__storage_migration_sql(int version);
static inline const char *moat_storage_last_error(const moat_storage_t *s)
{
    return s->last_error;
}

#endif
