/* The PostgreSQL storage backend: the moat_storage_ops_t vtable over one storage/pgconn.c
 * connection, for several moat instances sharing one store.
 *
 * Synchronous on purpose, like the SQLite backend: the vtable is called on the control thread
 * and every call is bounded by the connection's deadline (3 s by default). While the database
 * is known to be unreachable, calls fail at once with MOAT_ESTORAGE and a sentence instead of
 * each waiting for a connect timeout; a new connection is tried by the first call after a
 * backoff (1 s doubling to 30 s). So the control loop is held at most one deadline per outage
 * step, and the workers, which never touch storage, keep serving from memory. A fully
 * asynchronous client on the control loop is the later step (README, "PostgreSQL storage").
 *
 * Everything lives in the schema `moat`; its version is the one row of moat.schema_version.
 * Migrations run in one transaction under a transaction-scoped advisory lock, so instances
 * starting together migrate once; a newer version than this build knows is refused. */
#include "moat/log.h"
#include "moat/pgconn.h"
#include "moat/storage.h"

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define EVENTS_KEEP    10000
#define BACKOFF_MIN_MS 1000
#define BACKOFF_MAX_MS 30000
/* pg_advisory_xact_lock key of schema changes: "moat" in ASCII, then 1. */
#define MIGRATION_LOCK "7885360881346527233"
/* The key every writing transaction takes (begin at depth 0): "moat" then 2. */
#define WRITE_LOCK "7885360881346527234"

typedef struct {
    moat_storage_t base;
    moat_pg_params_t params;
    moat_pgconn_t *conn;
    int depth;        /* open transaction levels, as in sqlite.c */
    int lost_in_tx;   /* the connection broke inside a transaction: fail until rolled back */
    int down;         /* unreachable: said once, until it comes back */
    int64_t retry_at; /* ms, monotonic: no new connection before this */
    int backoff_ms;
    /* The LISTEN connection (watch_fd): kept open after it breaks until the next watch_fd,
     * so the caller's poller never watches a closed descriptor. */
    moat_pgconn_t *listen;
    int listen_broken;
    uint64_t listens; /* watches established; after the first, each starts with "resync" */
    int resync_pending;
    int64_t listen_retry_at;
} pg_storage_t;

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static pg_storage_t *from_base(moat_storage_t *base)
{
    return MOAT_CONTAINER_OF(base, pg_storage_t, base);
}

static void set_err(pg_storage_t *s, const char *fmt, const char *arg)
{
    moat_errf(s->base.last_error, sizeof s->base.last_error, fmt, arg);
}

/* ---- schema ---- */

/* Step N moves the schema from version N - 1 to N; append-only, like migrations.c. The
 * extended protocol runs one statement per message, so each step is a list. */
static const char *const step1[] = {
    "CREATE TABLE moat.certs ("
    "  id text COLLATE \"C\" PRIMARY KEY,"
    "  names text, issuer text, source text,"
    "  not_before bigint, not_after bigint,"
    "  cert_pem text, key_pem text, updated_at bigint)",
    "CREATE INDEX certs_not_after ON moat.certs (not_after)",
    "CREATE TABLE moat.events ("
    "  id bigserial PRIMARY KEY, \"time\" bigint, kind text, names text, detail text)",
    /* Keys are bytes, ordered bytewise like SQLite's, and any byte string is a key. */
    "CREATE TABLE moat.kv (key bytea PRIMARY KEY, value text, updated_at bigint)",
    NULL,
};

/* Issuing leases with fencing tokens (storage.h, lease_take); tokens from a sequence. */
static const char *const step2[] = {
    "CREATE TABLE moat.leases ("
    "  name text COLLATE \"C\" PRIMARY KEY, owner text NOT NULL,"
    "  token bigint NOT NULL, expires_at timestamptz NOT NULL)",
    "CREATE SEQUENCE moat.lease_token",
    /* Every certificate write, by any moat (or by hand), tells the listeners on commit. */
    "CREATE FUNCTION moat.notify_cert() RETURNS trigger LANGUAGE plpgsql AS"
    " $$BEGIN PERFORM pg_notify('moat', 'cert:' || NEW.id); RETURN NULL; END$$",
    "CREATE TRIGGER certs_notify AFTER INSERT OR UPDATE ON moat.certs"
    " FOR EACH ROW EXECUTE FUNCTION moat.notify_cert()",
    NULL,
};

static const char *const *const pg_steps[] = {step1, step2};

_Static_assert(MOAT_ARRAY_LEN(pg_steps) == MOAT_STORAGE_SCHEMA_VERSION,
               "one PostgreSQL migration step per schema version");

static int run(pg_storage_t *s, const char *sql, size_t n, const char *const *vals,
               const size_t *lens, const int *binary, moat_pg_result_t *res);

static int newer_schema(pg_storage_t *s, long version)
{
    moat_errf(s->base.last_error, sizeof s->base.last_error,
              "the schema moat in database %s on %s was written by a newer moat (schema %ld, "
              "this moat knows %d); upgrade moat, or point --storage at another database",
              s->params.dbname, s->params.host, version, MOAT_STORAGE_SCHEMA_VERSION);
    return MOAT_ESCHEMA;
}

static int read_version(pg_storage_t *s, long *version)
{
    moat_pg_result_t r;
    int rc = run(s, "SELECT version FROM moat.schema_version", 0, NULL, NULL, NULL, &r);
    if (rc != 0)
        return rc;
    *version = r.nrows > 0 && moat_pg_cell(&r, 0, 0) ? strtol(moat_pg_cell(&r, 0, 0), NULL, 10) : 0;
    moat_pg_result_clear(&r);
    return 0;
}

static int migrate(pg_storage_t *s)
{
    long version = 0;
    /* Usually the schema is current: find that out without the lock. A missing table is an
     * error here and simply means "not created yet". */
    if (read_version(s, &version) == 0) {
        if (version == MOAT_STORAGE_SCHEMA_VERSION)
            return 0;
        if (version > MOAT_STORAGE_SCHEMA_VERSION)
            return newer_schema(s, version);
    }
    static const char *const boot[] = {
        "BEGIN",
        "SELECT pg_advisory_xact_lock(" MIGRATION_LOCK ")",
        "CREATE SCHEMA IF NOT EXISTS moat",
        "CREATE TABLE IF NOT EXISTS moat.schema_version (version integer NOT NULL)",
    };
    int rc = 0;
    for (size_t i = 0; i < MOAT_ARRAY_LEN(boot) && rc == 0; i++)
        rc = run(s, boot[i], 0, NULL, NULL, NULL, NULL);
    if (rc == 0)
        rc = read_version(s, &version);
    if (rc == 0 && version > MOAT_STORAGE_SCHEMA_VERSION)
        rc = newer_schema(s, version);
    long from = version;
    for (long v = version + 1; rc == 0 && v <= MOAT_STORAGE_SCHEMA_VERSION; v++)
        for (const char *const *st = pg_steps[v - 1]; rc == 0 && *st != NULL; st++)
            rc = run(s, *st, 0, NULL, NULL, NULL, NULL);
    if (rc == 0 && from < MOAT_STORAGE_SCHEMA_VERSION) {
        char vbuf[16];
        snprintf(vbuf, sizeof vbuf, "%d", MOAT_STORAGE_SCHEMA_VERSION);
        const char *vals[] = {vbuf};
        rc = run(s, "DELETE FROM moat.schema_version", 0, NULL, NULL, NULL, NULL);
        if (rc == 0)
            rc = run(s, "INSERT INTO moat.schema_version (version) VALUES ($1::integer)", 1, vals,
                     NULL, NULL, NULL);
    }
    if (rc == 0)
        rc = run(s, "COMMIT", 0, NULL, NULL, NULL, NULL);
    if (rc != 0) {
        char saved[sizeof s->base.last_error];
        memcpy(saved, s->base.last_error, sizeof saved);
        if (s->conn != NULL && !moat_pgconn_broken(s->conn))
            moat_pgconn_exec(s->conn, "ROLLBACK", 0, NULL, NULL, NULL, NULL);
        memcpy(s->base.last_error, saved, sizeof saved);
        return rc;
    }
    if (from < MOAT_STORAGE_SCHEMA_VERSION)
        MOAT_INFO("storage: schema moat in database %s on %s upgraded from version %ld to %d",
                  s->params.dbname, s->params.host, from, MOAT_STORAGE_SCHEMA_VERSION);
    return 0;
}

/* ---- connection state ---- */

static void went_down(pg_storage_t *s)
{
    int64_t now = mono_ms();
    s->backoff_ms =
        s->backoff_ms == 0 ? BACKOFF_MIN_MS : MOAT_MIN(s->backoff_ms * 2, BACKOFF_MAX_MS);
    s->retry_at = now + s->backoff_ms;
    if (!s->down)
        MOAT_WARN("storage: %s; moat keeps serving what it has in memory and tries again "
                  "(every %d s at most)",
                  s->base.last_error, BACKOFF_MAX_MS / 1000);
    s->down = 1;
}

/* Connect and set the session up: a lock wait fails (SQLSTATE 55P03) before the call's
 * deadline would break the connection. */
static int open_conn(pg_storage_t *s, char *err, size_t errlen)
{
    int rc = moat_pgconn_open(&s->params, &s->conn, err, errlen);
    if (rc != 0)
        return rc;
    char ms[24];
    int t = s->params.timeout_ms > 0 ? s->params.timeout_ms : 3000;
    snprintf(ms, sizeof ms, "%d", t * 2 / 3);
    const char *vals[] = {ms};
    rc = moat_pgconn_exec(s->conn, "SELECT set_config('lock_timeout', $1, false)", 1, vals, NULL,
                          NULL, NULL);
    if (rc != 0) {
        moat_errf(err, errlen, "%s", moat_pgconn_error(s->conn));
        moat_pgconn_free(s->conn);
        s->conn = NULL;
    }
    return rc;
}

/* A usable connection, or MOAT_ESTORAGE at once while the database is known to be away. */
static int ensure(pg_storage_t *s)
{
    if (s->conn != NULL && !moat_pgconn_broken(s->conn))
        return 0;
    if (s->conn != NULL) {
        moat_errf(s->base.last_error, sizeof s->base.last_error, "%s", moat_pgconn_error(s->conn));
        moat_pgconn_free(s->conn);
        s->conn = NULL;
        if (s->depth > 0)
            s->lost_in_tx = 1;
        went_down(s);
    }
    if (s->lost_in_tx) {
        moat_errf(s->base.last_error, sizeof s->base.last_error,
                  "the connection to PostgreSQL at %s:%d broke inside a transaction, which is "
                  "lost; roll it back and try again",
                  s->params.host, s->params.port);
        return MOAT_ESTORAGE;
    }
    int64_t now = mono_ms();
    if (s->down && now < s->retry_at) {
        moat_errf(s->base.last_error, sizeof s->base.last_error,
                  "PostgreSQL at %s:%d is unreachable; next try in %d ms", s->params.host,
                  s->params.port, (int)(s->retry_at - now));
        return MOAT_ESTORAGE;
    }
    char err[1024];
    int rc = open_conn(s, err, sizeof err);
    if (rc != 0) {
        moat_errf(s->base.last_error, sizeof s->base.last_error, "%s", err);
        went_down(s);
        return MOAT_ESTORAGE;
    }
    /* Another moat may have moved the schema on while we were away. */
    long version = 0;
    int vrc = read_version(s, &version);
    if (s->conn == NULL)
        return MOAT_ESTORAGE; /* broke again at once: run() said why */
    if (vrc == 0 && version > MOAT_STORAGE_SCHEMA_VERSION) {
        newer_schema(s, version);
        moat_pgconn_free(s->conn);
        s->conn = NULL;
        went_down(s);
        return MOAT_ESCHEMA;
    }
    if (s->down)
        MOAT_INFO("storage: PostgreSQL at %s:%d is reachable again", s->params.host,
                  s->params.port);
    s->down = 0;
    s->backoff_ms = 0;
    return 0;
}

static int run(pg_storage_t *s, const char *sql, size_t n, const char *const *vals,
               const size_t *lens, const int *binary, moat_pg_result_t *res)
{
    if (res != NULL)
        memset(res, 0, sizeof *res);
    int rc = ensure(s);
    if (rc != 0)
        return rc;
    rc = moat_pgconn_exec(s->conn, sql, n, vals, lens, binary, res);
    if (rc == 0)
        return 0;
    moat_errf(s->base.last_error, sizeof s->base.last_error, "%s", moat_pgconn_error(s->conn));
    if (moat_pgconn_broken(s->conn)) {
        moat_pgconn_free(s->conn);
        s->conn = NULL;
        if (s->depth > 0)
            s->lost_in_tx = 1;
        went_down(s);
    }
    return MOAT_ESTORAGE;
}

/* ---- transactions ---- */

static int op_begin(moat_storage_t *base)
{
    pg_storage_t *s = from_base(base);
    if (s->lost_in_tx)
        return ensure(s);
    if (s->depth > 0)
        return run(s, "SAVEPOINT moat_nested", 0, NULL, NULL, NULL, NULL) == 0 ? (s->depth++, 0)
                                                                               : MOAT_ESTORAGE;
    /* One writing transaction at a time across every instance, like SQLite's BEGIN IMMEDIATE:
     * a transaction-scoped advisory lock taken first. Read-then-write groups (the issuing lock
     * in server/acmeshare.c, creating the internal CA) then behave exactly as on SQLite, and
     * under READ COMMITTED each statement after the lock sees what the previous holder
     * committed. Transactions are short; the session's lock_timeout bounds the wait. */
    int rc = run(s, "BEGIN", 0, NULL, NULL, NULL, NULL);
    if (rc == 0) {
        rc = run(s, "SELECT pg_advisory_xact_lock(" WRITE_LOCK ")", 0, NULL, NULL, NULL, NULL);
        if (rc != 0 && s->conn != NULL) {
            char saved[sizeof s->base.last_error];
            memcpy(saved, s->base.last_error, sizeof saved);
            moat_pgconn_exec(s->conn, "ROLLBACK", 0, NULL, NULL, NULL, NULL);
            memcpy(s->base.last_error, saved, sizeof saved);
        }
    }
    if (rc == 0)
        s->depth++;
    return rc;
}

static int op_commit(moat_storage_t *base)
{
    pg_storage_t *s = from_base(base);
    if (s->depth == 0) {
        set_err(s, "commit without a transaction%s", "");
        return MOAT_EINVAL;
    }
    if (s->lost_in_tx)
        return ensure(s);
    if (s->conn != NULL && moat_pgconn_tx_status(s->conn) == 'E') {
        set_err(s, "the transaction was rolled back after an earlier error%s", "");
        return MOAT_ESTORAGE;
    }
    int rc = run(s, s->depth == 1 ? "COMMIT" : "RELEASE moat_nested", 0, NULL, NULL, NULL, NULL);
    if (rc == 0)
        s->depth--;
    return rc;
}

static int op_rollback(moat_storage_t *base)
{
    pg_storage_t *s = from_base(base);
    if (s->depth == 0) {
        set_err(s, "rollback without a transaction%s", "");
        return MOAT_EINVAL;
    }
    s->depth--;
    if (s->lost_in_tx) {
        /* Nothing to undo on the server: the transaction died with the connection. */
        if (s->depth == 0)
            s->lost_in_tx = 0;
        return 0;
    }
    if (s->conn == NULL)
        return 0;
    return run(s, s->depth == 0 ? "ROLLBACK" : "ROLLBACK TO moat_nested", 0, NULL, NULL, NULL,
               NULL) == 0 &&
                   (s->depth == 0 || run(s, "RELEASE moat_nested", 0, NULL, NULL, NULL, NULL) == 0)
               ? 0
               : MOAT_ESTORAGE;
}

/* ---- records ---- */

#define CERT_COLUMNS                                                                               \
    "id, names, issuer, source, not_before, not_after, cert_pem, key_pem, updated_at"

static char *dup_cell(const moat_pg_result_t *r, size_t row, size_t col)
{
    const char *v = moat_pg_cell(r, row, col);
    return v ? moat_xstrdup(v) : NULL;
}

static int64_t int_cell(const moat_pg_result_t *r, size_t row, size_t col)
{
    const char *v = moat_pg_cell(r, row, col);
    return v ? strtoll(v, NULL, 10) : 0;
}

static void read_cert(const moat_pg_result_t *r, size_t row, moat_cert_record_t *c)
{
    c->id = dup_cell(r, row, 0);
    c->names = dup_cell(r, row, 1);
    c->issuer = dup_cell(r, row, 2);
    c->source = dup_cell(r, row, 3);
    c->not_before = int_cell(r, row, 4);
    c->not_after = int_cell(r, row, 5);
    c->cert_pem = dup_cell(r, row, 6);
    c->key_pem = dup_cell(r, row, 7);
    c->updated_at = int_cell(r, row, 8);
}

static int op_put_cert(moat_storage_t *base, const moat_cert_record_t *rec)
{
    pg_storage_t *s = from_base(base);
    if (rec == NULL || rec->id == NULL) {
        set_err(s, "put_cert: a record needs an id%s", "");
        return MOAT_EINVAL;
    }
    char nb[24], na[24], up[24];
    snprintf(nb, sizeof nb, "%" PRId64, rec->not_before);
    snprintf(na, sizeof na, "%" PRId64, rec->not_after);
    snprintf(up, sizeof up, "%" PRId64,
             rec->updated_at != 0 ? rec->updated_at : (int64_t)time(NULL));
    const char *vals[] = {rec->id, rec->names,    rec->issuer,  rec->source, nb,
                          na,      rec->cert_pem, rec->key_pem, up};
    return run(s,
               "INSERT INTO moat.certs (" CERT_COLUMNS ") VALUES ($1, $2, $3, $4, $5::bigint,"
               " $6::bigint, $7, $8, $9::bigint) ON CONFLICT (id) DO UPDATE SET"
               " names = excluded.names, issuer = excluded.issuer, source = excluded.source,"
               " not_before = excluded.not_before, not_after = excluded.not_after,"
               " cert_pem = excluded.cert_pem, key_pem = excluded.key_pem,"
               " updated_at = excluded.updated_at",
               9, vals, NULL, NULL, NULL);
}

static int op_get_cert(moat_storage_t *base, const char *id, moat_cert_record_t *out)
{
    pg_storage_t *s = from_base(base);
    if (out == NULL || id == NULL) {
        set_err(s, "get_cert: missing argument%s", "");
        return MOAT_EINVAL;
    }
    memset(out, 0, sizeof *out);
    moat_pg_result_t r;
    const char *vals[] = {id};
    int rc =
        run(s, "SELECT " CERT_COLUMNS " FROM moat.certs WHERE id = $1", 1, vals, NULL, NULL, &r);
    if (rc != 0)
        return rc;
    if (r.nrows == 0) {
        set_err(s, "no certificate stored as \"%s\"", id);
        rc = MOAT_ENOT_FOUND;
    } else {
        read_cert(&r, 0, out);
    }
    moat_pg_result_clear(&r);
    return rc;
}

static int op_list_certs(moat_storage_t *base, moat_cert_record_t **out, size_t *n)
{
    pg_storage_t *s = from_base(base);
    if (out == NULL || n == NULL)
        return MOAT_EINVAL;
    *out = NULL;
    *n = 0;
    moat_pg_result_t r;
    int rc = run(s, "SELECT " CERT_COLUMNS " FROM moat.certs ORDER BY id", 0, NULL, NULL, NULL, &r);
    if (rc != 0)
        return rc;
    if (r.nrows > 0) {
        *out = moat_xcalloc(r.nrows, sizeof **out);
        for (size_t i = 0; i < r.nrows; i++)
            read_cert(&r, i, &(*out)[i]);
        *n = r.nrows;
    }
    moat_pg_result_clear(&r);
    return 0;
}

static int op_add_event(moat_storage_t *base, const char *kind, const char *names,
                        const char *detail)
{
    pg_storage_t *s = from_base(base);
    char now[24], keep[24];
    snprintf(now, sizeof now, "%" PRId64, (int64_t)time(NULL));
    snprintf(keep, sizeof keep, "%d", EVENTS_KEEP);
    const char *vals[] = {now, kind, names, detail, keep};
    /* One statement: the insert and the pruning it makes necessary happen together. */
    return run(s,
               "WITH ins AS (INSERT INTO moat.events (\"time\", kind, names, detail)"
               " VALUES ($1::bigint, $2, $3, $4) RETURNING id)"
               " DELETE FROM moat.events WHERE id <= (SELECT id FROM ins) - $5::bigint",
               5, vals, NULL, NULL, NULL);
}

static int op_list_events(moat_storage_t *base, size_t limit, moat_event_t **out, size_t *n)
{
    pg_storage_t *s = from_base(base);
    if (out == NULL || n == NULL)
        return MOAT_EINVAL;
    *out = NULL;
    *n = 0;
    if (limit == 0)
        return 0;
    char lim[24];
    snprintf(lim, sizeof lim, "%" PRId64, limit > (size_t)INT64_MAX ? INT64_MAX : (int64_t)limit);
    const char *vals[] = {lim};
    moat_pg_result_t r;
    int rc = run(s,
                 "SELECT \"time\", kind, names, detail FROM moat.events ORDER BY id DESC"
                 " LIMIT $1::bigint",
                 1, vals, NULL, NULL, &r);
    if (rc != 0)
        return rc;
    if (r.nrows > 0) {
        moat_event_t *ev = moat_xcalloc(r.nrows, sizeof *ev);
        for (size_t i = 0; i < r.nrows; i++) {
            ev[i].time = int_cell(&r, i, 0);
            ev[i].kind = dup_cell(&r, i, 1);
            ev[i].names = dup_cell(&r, i, 2);
            ev[i].detail = dup_cell(&r, i, 3);
        }
        *out = ev;
        *n = r.nrows;
    }
    moat_pg_result_clear(&r);
    return 0;
}

static int op_kv_put(moat_storage_t *base, const char *key, const char *value)
{
    pg_storage_t *s = from_base(base);
    if (key == NULL) {
        set_err(s, "kv_put: missing key%s", "");
        return MOAT_EINVAL;
    }
    char now[24];
    snprintf(now, sizeof now, "%" PRId64, (int64_t)time(NULL));
    const char *vals[] = {key, value, now};
    size_t lens[] = {strlen(key), value ? strlen(value) : 0, strlen(now)};
    const int binary[] = {1, 0, 0};
    if (value == NULL)
        return run(s, "DELETE FROM moat.kv WHERE key = $1", 1, vals, lens, binary, NULL);
    return run(s,
               "INSERT INTO moat.kv (key, value, updated_at) VALUES ($1, $2, $3::bigint)"
               " ON CONFLICT (key) DO UPDATE SET value = excluded.value,"
               " updated_at = excluded.updated_at",
               3, vals, lens, binary, NULL);
}

static int op_kv_get(moat_storage_t *base, const char *key, char **value_out)
{
    pg_storage_t *s = from_base(base);
    if (key == NULL || value_out == NULL)
        return MOAT_EINVAL;
    *value_out = NULL;
    const char *vals[] = {key};
    size_t lens[] = {strlen(key)};
    const int binary[] = {1};
    moat_pg_result_t r;
    int rc = run(s, "SELECT value FROM moat.kv WHERE key = $1", 1, vals, lens, binary, &r);
    if (rc != 0)
        return rc;
    if (r.nrows == 0 || moat_pg_cell(&r, 0, 0) == NULL) {
        set_err(s, "no value stored for \"%s\"", key);
        rc = MOAT_ENOT_FOUND;
    } else {
        *value_out = dup_cell(&r, 0, 0);
    }
    moat_pg_result_clear(&r);
    return rc;
}

static int hexv(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* A bytea in text output format ("\x" and hex digits) as a NUL-terminated string. */
static char *from_bytea(const char *v)
{
    if (v == NULL || v[0] != '\\' || v[1] != 'x')
        return moat_xstrdup(v ? v : "");
    size_t n = strlen(v + 2) / 2;
    char *out = moat_xmalloc(n + 1);
    for (size_t i = 0; i < n; i++) {
        int hi = hexv(v[2 + 2 * i]), lo = hexv(v[3 + 2 * i]);
        out[i] = (char)((hi < 0 ? 0 : hi) << 4 | (lo < 0 ? 0 : lo));
    }
    out[n] = '\0';
    return out;
}

static int op_kv_list(moat_storage_t *base, const char *prefix, moat_kv_t **out, size_t *n)
{
    pg_storage_t *s = from_base(base);
    if (prefix == NULL || out == NULL || n == NULL)
        return MOAT_EINVAL;
    *out = NULL;
    *n = 0;
    /* The same range as sqlite.c: [prefix, prefix with its last non-0xff byte incremented). */
    size_t pl = strlen(prefix);
    char *upper = moat_xstrndup(prefix, pl);
    while (pl > 0 && (unsigned char)upper[pl - 1] == 0xff)
        upper[--pl] = '\0';
    if (pl > 0)
        upper[pl - 1] = (char)((unsigned char)upper[pl - 1] + 1);
    const char *vals[] = {prefix, pl > 0 ? upper : NULL};
    size_t lens[] = {strlen(prefix), pl};
    const int binary[] = {1, 1};
    moat_pg_result_t r;
    int rc = run(s,
                 "SELECT key, value, updated_at FROM moat.kv WHERE key >= $1"
                 " AND ($2::bytea IS NULL OR key < $2::bytea) ORDER BY key",
                 2, vals, lens, binary, &r);
    free(upper);
    if (rc != 0)
        return rc;
    if (r.nrows > 0) {
        moat_kv_t *rows = moat_xcalloc(r.nrows, sizeof *rows);
        for (size_t i = 0; i < r.nrows; i++) {
            rows[i].key = from_bytea(moat_pg_cell(&r, i, 0));
            rows[i].value = dup_cell(&r, i, 1);
            rows[i].updated_at = int_cell(&r, i, 2);
        }
        *out = rows;
        *n = r.nrows;
    }
    moat_pg_result_clear(&r);
    return 0;
}

static int op_check(moat_storage_t *base)
{
    pg_storage_t *s = from_base(base);
    long version = 0;
    int rc = read_version(s, &version);
    if (rc != 0)
        return MOAT_ESTORAGE;
    if (version != MOAT_STORAGE_SCHEMA_VERSION) {
        moat_errf(s->base.last_error, sizeof s->base.last_error,
                  "the schema moat in database %s on %s is at version %ld, this moat expects %d; "
                  "was it changed by hand or by another moat version?",
                  s->params.dbname, s->params.host, version, MOAT_STORAGE_SCHEMA_VERSION);
        return MOAT_ESTORAGE;
    }
    return 0;
}

/* ---- leases ---- */

static int op_lease_take(moat_storage_t *base, const char *name, const char *owner, int ttl_s,
                         const char *steal, int64_t *token, char **holder)
{
    pg_storage_t *s = from_base(base);
    if (holder != NULL)
        *holder = NULL;
    if (name == NULL || owner == NULL || token == NULL || ttl_s <= 0)
        return MOAT_EINVAL;
    *token = 0;
    char ttl[16];
    snprintf(ttl, sizeof ttl, "%d", ttl_s);
    const char *vals[] = {name, owner, ttl, steal};
    moat_pg_result_t r;
    /* One statement on the server's clock: free, run out, ours, or a dead holder's. */
    int rc = run(s,
                 "INSERT INTO moat.leases AS l (name, owner, token, expires_at)"
                 " VALUES ($1, $2, nextval('moat.lease_token'),"
                 " now() + make_interval(secs => $3::integer))"
                 " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner,"
                 " token = excluded.token, expires_at = excluded.expires_at"
                 " WHERE l.expires_at <= now() OR l.owner = excluded.owner OR l.owner = $4"
                 " RETURNING token",
                 4, vals, NULL, NULL, &r);
    if (rc != 0)
        return rc;
    if (r.nrows == 1) {
        *token = int_cell(&r, 0, 0);
        moat_pg_result_clear(&r);
        return 1;
    }
    moat_pg_result_clear(&r);
    if (holder != NULL &&
        run(s, "SELECT owner FROM moat.leases WHERE name = $1", 1, vals, NULL, NULL, &r) == 0) {
        *holder = r.nrows == 1 ? dup_cell(&r, 0, 0) : NULL;
        moat_pg_result_clear(&r);
    }
    return 0;
}

static int op_lease_renew(moat_storage_t *base, const char *name, int64_t token, int ttl_s)
{
    pg_storage_t *s = from_base(base);
    if (name == NULL || ttl_s <= 0)
        return MOAT_EINVAL;
    char tok[24], ttl[16];
    snprintf(tok, sizeof tok, "%" PRId64, token);
    snprintf(ttl, sizeof ttl, "%d", ttl_s);
    const char *vals[] = {name, tok, ttl};
    moat_pg_result_t r;
    int rc = run(s,
                 "UPDATE moat.leases SET expires_at = now() + make_interval(secs => $3::integer)"
                 " WHERE name = $1 AND token = $2::bigint RETURNING 1",
                 3, vals, NULL, NULL, &r);
    if (rc != 0)
        return rc;
    rc = r.nrows == 1 ? 0 : MOAT_ENOT_FOUND;
    moat_pg_result_clear(&r);
    if (rc != 0)
        set_err(s, "the lease \"%s\" was taken by another holder", name);
    return rc;
}

static int op_lease_release(moat_storage_t *base, const char *name, int64_t token)
{
    pg_storage_t *s = from_base(base);
    if (name == NULL)
        return MOAT_EINVAL;
    char tok[24];
    snprintf(tok, sizeof tok, "%" PRId64, token);
    const char *vals[] = {name, tok};
    return run(s,
               "UPDATE moat.leases SET expires_at = '-infinity'"
               " WHERE name = $1 AND token = $2::bigint",
               2, vals, NULL, NULL, NULL);
}

static int op_put_cert_fenced(moat_storage_t *base, const moat_cert_record_t *rec,
                              const char *lease, int64_t token)
{
    pg_storage_t *s = from_base(base);
    if (rec == NULL || rec->id == NULL || lease == NULL) {
        set_err(s, "put_cert_fenced: a record needs an id and a lease%s", "");
        return MOAT_EINVAL;
    }
    char nb[24], na[24], up[24], tok[24];
    snprintf(nb, sizeof nb, "%" PRId64, rec->not_before);
    snprintf(na, sizeof na, "%" PRId64, rec->not_after);
    snprintf(up, sizeof up, "%" PRId64,
             rec->updated_at != 0 ? rec->updated_at : (int64_t)time(NULL));
    snprintf(tok, sizeof tok, "%" PRId64, token);
    const char *vals[] = {rec->id,       rec->names,   rec->issuer, rec->source, nb, na,
                          rec->cert_pem, rec->key_pem, up,          lease,       tok};
    moat_pg_result_t r;
    /* The lease row is locked for the statement (FOR UPDATE): a holder taking it over at the
     * same moment waits for us, or, if it went first, our re-check sees its new token. */
    int rc = run(s,
                 "WITH lk AS (SELECT 1 FROM moat.leases WHERE name = $10 AND token = $11::bigint"
                 " FOR UPDATE)"
                 " INSERT INTO moat.certs AS c (" CERT_COLUMNS ")"
                 " SELECT $1, $2, $3, $4, $5::bigint, $6::bigint, $7, $8, $9::bigint FROM lk"
                 " ON CONFLICT (id) DO UPDATE SET names = excluded.names,"
                 " issuer = excluded.issuer, source = excluded.source,"
                 " not_before = excluded.not_before, not_after = excluded.not_after,"
                 " cert_pem = excluded.cert_pem, key_pem = excluded.key_pem,"
                 " updated_at = excluded.updated_at WHERE c.not_after <= excluded.not_after"
                 " RETURNING 1",
                 11, vals, NULL, NULL, &r);
    if (rc != 0)
        return rc;
    size_t written = r.nrows;
    moat_pg_result_clear(&r);
    if (written == 1)
        return 0;
    const char *chk[] = {lease, tok};
    rc = run(s, "SELECT 1 FROM moat.leases WHERE name = $1 AND token = $2::bigint", 2, chk, NULL,
             NULL, &r);
    if (rc != 0)
        return rc;
    int held = r.nrows == 1;
    moat_pg_result_clear(&r);
    if (held) {
        set_err(s, "a newer certificate than this one is stored as \"%s\"", rec->id);
        return MOAT_EEXISTS;
    }
    set_err(s,
            "the lease \"%s\" was lost before the certificate was stored; the holder that took "
            "it over writes instead",
            lease);
    return MOAT_EPERM;
}

/* ---- news ---- */

#define LISTEN_RETRY_MS 2000

static int op_watch_fd(moat_storage_t *base)
{
    pg_storage_t *s = from_base(base);
    if (s->listen != NULL && !s->listen_broken)
        return moat_pgconn_fd(s->listen);
    moat_pgconn_free(s->listen);
    s->listen = NULL;
    s->listen_broken = 0;
    int64_t now = mono_ms();
    if (now < s->listen_retry_at || s->down)
        return -1;
    s->listen_retry_at = now + LISTEN_RETRY_MS;
    char err[1024];
    if (moat_pgconn_open(&s->params, &s->listen, err, sizeof err) != 0) {
        MOAT_DEBUG("storage: cannot watch the shared store: %s", err);
        return -1;
    }
    if (moat_pgconn_exec(s->listen, "LISTEN moat", 0, NULL, NULL, NULL, NULL) != 0) {
        MOAT_WARN("storage: cannot watch the shared store: %s", moat_pgconn_error(s->listen));
        moat_pgconn_free(s->listen);
        s->listen = NULL;
        return -1;
    }
    if (s->listens++ > 0)
        s->resync_pending = 1;
    return moat_pgconn_fd(s->listen);
}

typedef struct {
    pg_storage_t *s;
    moat_storage_news_cb cb;
    void *arg;
} news_t;

static void on_notify(void *arg, int pid, const char *channel, const char *payload)
{
    news_t *n = arg;
    /* Our own writes come back too; the caller already knows about those. */
    if (n->s->conn != NULL && pid == moat_pgconn_backend_pid(n->s->conn))
        return;
    if (strcmp(channel, "moat") == 0)
        n->cb(n->arg, payload);
}

static int op_watch_drain(moat_storage_t *base, moat_storage_news_cb cb, void *arg)
{
    pg_storage_t *s = from_base(base);
    if (s->listen == NULL || s->listen_broken)
        return MOAT_ECLOSED;
    if (s->resync_pending) {
        s->resync_pending = 0;
        cb(arg, "resync");
    }
    news_t n = {s, cb, arg};
    if (moat_pgconn_drain(s->listen, on_notify, &n) != 0) {
        MOAT_DEBUG("storage: the watch on the shared store broke: %s",
                   moat_pgconn_error(s->listen));
        s->listen_broken = 1;
        return MOAT_ECLOSED;
    }
    return 0;
}

static void op_close(moat_storage_t *base)
{
    if (base == NULL)
        return;
    pg_storage_t *s = from_base(base);
    /* An open transaction dies with the connection: PostgreSQL rolls it back. */
    if (s->depth > 0 && !s->lost_in_tx)
        MOAT_WARN("storage: closing with an unfinished transaction; its changes are discarded");
    moat_pgconn_free(s->conn);
    moat_pgconn_free(s->listen);
    moat_pg_params_clear(&s->params);
    free(s);
}

static const moat_storage_ops_t pg_ops = {
    .put_cert = op_put_cert,
    .get_cert = op_get_cert,
    .list_certs = op_list_certs,
    .add_event = op_add_event,
    .list_events = op_list_events,
    .kv_put = op_kv_put,
    .kv_get = op_kv_get,
    .kv_list = op_kv_list,
    .begin = op_begin,
    .commit = op_commit,
    .rollback = op_rollback,
    .close = op_close,
    .check = op_check,
    .lease_take = op_lease_take,
    .lease_renew = op_lease_renew,
    .lease_release = op_lease_release,
    .put_cert_fenced = op_put_cert_fenced,
    .watch_fd = op_watch_fd,
    .watch_drain = op_watch_drain,
};

int moat_storage_open_postgres(const char *url, moat_storage_t **out, char *err, size_t errlen)
{
    char scratch[512];
    if (err == NULL || errlen == 0) {
        err = scratch;
        errlen = sizeof scratch;
    }
    err[0] = '\0';
    if (out == NULL || url == NULL)
        return MOAT_EINVAL;
    *out = NULL;
    pg_storage_t *s = moat_xcalloc(1, sizeof *s);
    s->base.ops = &pg_ops;
    s->base.shared = 1;
    int rc = moat_pg_params_parse(url, &s->params, err, errlen);
    if (rc != 0) {
        free(s);
        return rc;
    }
    rc = open_conn(s, err, errlen);
    if (rc == 0) {
        rc = migrate(s);
        if (rc != 0)
            moat_errf(err, errlen, "%s", s->base.last_error);
    }
    if (rc != 0) {
        op_close(&s->base);
        return rc;
    }
    *out = &s->base;
    return 0;
}
