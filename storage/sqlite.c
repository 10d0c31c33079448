/* The SQLite storage backend: one file, DATA/moat.db, in WAL mode.
 *
 * The file holds private keys, so opening it is careful: the folder is created 0700 and the
 * file 0600 before SQLite sees it (SQLite gives its -wal and -shm files the database's mode),
 * and a file moat cannot vouch for (damaged, another program's, or written by a newer moat)
 * is refused before anything is written to it. Every statement is prepared once, with bound
 * parameters, and cached on the handle.
 *
 * A handle belongs to one thread (the control thread). The connection is opened FULLMUTEX
 * anyway, so a stray call from another thread is serialised instead of corrupting memory. */
#include "moat/log.h"
#include "moat/storage.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <sqlite3.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* PRAGMA application_id of a moat database: "moat" in ASCII. Lets us tell our own file from
 * some other program's SQLite file that happens to be called moat.db. */
#define APP_ID          0x6d6f6174
#define BUSY_TIMEOUT_MS 5000
/* The event log is for people reading recent history; bound it so it cannot grow forever. */
#define EVENTS_KEEP 10000

enum {
    ST_PUT_CERT,
    ST_GET_CERT,
    ST_LIST_CERTS,
    ST_ADD_EVENT,
    ST_PRUNE_EVENTS,
    ST_LIST_EVENTS,
    ST_KV_PUT,
    ST_KV_DELETE,
    ST_KV_GET,
    ST_KV_LIST,
    ST_LEASE_TAKE,
    ST_LEASE_HOLDER,
    ST_LEASE_RENEW,
    ST_LEASE_RELEASE,
    ST_PUT_CERT_FENCED,
    ST_LEASE_CHECK,
    ST__COUNT
};

#define CERT_COLUMNS                                                                               \
    "id, names, issuer, source, not_before, not_after, cert_pem, key_pem, updated_at"

static const char *const stmt_sql[ST__COUNT] = {
    [ST_PUT_CERT] =
        "INSERT INTO certs (" CERT_COLUMNS ") VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
        " ON CONFLICT(id) DO UPDATE SET names = excluded.names,"
        " issuer = excluded.issuer, source = excluded.source,"
        " not_before = excluded.not_before, not_after = excluded.not_after,"
        " cert_pem = excluded.cert_pem, key_pem = excluded.key_pem,"
        " updated_at = excluded.updated_at",
    [ST_GET_CERT] = "SELECT " CERT_COLUMNS " FROM certs WHERE id = ?1",
    [ST_LIST_CERTS] = "SELECT " CERT_COLUMNS " FROM certs ORDER BY id",
    [ST_ADD_EVENT] = "INSERT INTO events (time, kind, names, detail) VALUES (?1, ?2, ?3, ?4)",
    [ST_PRUNE_EVENTS] = "DELETE FROM events WHERE id <= (SELECT max(id) FROM events) - ?1",
    /* Newest first by id, not time: ids grow with insertion even when the clock steps back or
     * several events share a second. */
    [ST_LIST_EVENTS] = "SELECT time, kind, names, detail FROM events ORDER BY id DESC LIMIT ?1",
    [ST_KV_PUT] = "INSERT INTO kv (key, value, updated_at) VALUES (?1, ?2, ?3)"
                  " ON CONFLICT(key) DO UPDATE SET value = excluded.value,"
                  " updated_at = excluded.updated_at",
    [ST_KV_DELETE] = "DELETE FROM kv WHERE key = ?1",
    [ST_KV_GET] = "SELECT value FROM kv WHERE key = ?1",
    /* A range on the primary key (?2 is the prefix with its last byte incremented, or NULL
     * when there is no upper bound), so SQLite walks the index instead of the table. */
    [ST_KV_LIST] = ("SELECT key, value, updated_at FROM kv WHERE key >= ?1"
                    " AND (?2 IS NULL OR key < ?2) ORDER BY key"),
    /* The same statements as storage/postgres.c, on SQLite's clock. */
    [ST_LEASE_TAKE] =
        "INSERT INTO leases (name, owner, token, expires_at)"
        " VALUES (?1, ?2, (SELECT coalesce(max(token), 0) + 1 FROM leases), unixepoch() + ?3)"
        " ON CONFLICT(name) DO UPDATE SET owner = excluded.owner, token = excluded.token,"
        " expires_at = excluded.expires_at WHERE leases.expires_at <= unixepoch()"
        " OR leases.owner = excluded.owner OR leases.owner = ?4 RETURNING token",
    [ST_LEASE_HOLDER] = "SELECT owner FROM leases WHERE name = ?1",
    [ST_LEASE_RENEW] = "UPDATE leases SET expires_at = unixepoch() + ?3"
                       " WHERE name = ?1 AND token = ?2",
    [ST_LEASE_RELEASE] = "UPDATE leases SET expires_at = 0 WHERE name = ?1 AND token = ?2",
    [ST_PUT_CERT_FENCED] =
        "INSERT INTO certs (" CERT_COLUMNS ") SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9"
        " WHERE EXISTS (SELECT 1 FROM leases WHERE name = ?10 AND token = ?11)"
        " ON CONFLICT(id) DO UPDATE SET names = excluded.names,"
        " issuer = excluded.issuer, source = excluded.source,"
        " not_before = excluded.not_before, not_after = excluded.not_after,"
        " cert_pem = excluded.cert_pem, key_pem = excluded.key_pem,"
        " updated_at = excluded.updated_at WHERE certs.not_after <= excluded.not_after",
    [ST_LEASE_CHECK] = "SELECT 1 FROM leases WHERE name = ?1 AND token = ?2",
};

typedef struct {
    moat_storage_t base;
    sqlite3 *db;
    char *path;
    /* Open transaction levels: 0 none, 1 BEGIN, >1 that many minus one SAVEPOINTs inside. */
    int depth;
    sqlite3_stmt *stmts[ST__COUNT];
} sqlite_storage_t;

/* Turn a SQLite result into a moat code and a sentence naming the file and what to do. */
static int describe_sqlite(const char *path, sqlite3 *db, int rc, const char *what, char *err,
                           size_t cap)
{
    const char *detail = db != NULL ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
    /* SQLite reports a file system turned read-only under an open database (a failing disk
     * under errors=remount-ro) and a full one as plain I/O errors; the errno says which. */
    int sys = db != NULL ? sqlite3_system_errno(db) : 0;
    if ((rc & 0xff) == SQLITE_IOERR && sys == EROFS) {
        moat_errf(err, cap,
                  "the file system holding %s has become read-only (while %s); the disk may be "
                  "failing: look at the kernel log (dmesg), repair it, then restart moat",
                  path, what);
        return MOAT_EIO;
    }
    if ((rc & 0xff) == SQLITE_IOERR && sys == ENOSPC)
        rc = SQLITE_FULL;
    switch (rc & 0xff) {
    case SQLITE_NOMEM:
        moat_errf(err, cap, "out of memory while %s (%s)", what, path);
        return MOAT_ENOMEM;
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB:
        moat_errf(err, cap,
                  "%s is not a moat database or is damaged (%s); moat will not overwrite it: "
                  "move it aside to start fresh",
                  path, detail);
        return MOAT_ESTORAGE;
    case SQLITE_READONLY:
    case SQLITE_CANTOPEN:
    case SQLITE_PERM:
    case SQLITE_AUTH:
        moat_errf(err, cap,
                  "moat needs write access to %s and its folder (%s while %s); run moat as their "
                  "owner, or choose another folder with --data",
                  path, detail, what);
        return MOAT_EPERM;
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
        moat_errf(err, cap,
                  "%s stayed locked by another process while %s (%s); is another moat using the "
                  "same --data folder?",
                  path, what, detail);
        return MOAT_EAGAIN;
    case SQLITE_FULL:
        moat_errf(err, cap, "the disk holding %s is full (while %s); free some space", path, what);
        return MOAT_EIO;
    case SQLITE_IOERR:
        moat_errf(err, cap, "input/output error on %s while %s (%s)", path, what, detail);
        return MOAT_EIO;
    default: moat_errf(err, cap, "%s: %s while %s", path, detail, what); return MOAT_ESTORAGE;
    }
}

static int fail(sqlite_storage_t *s, int rc, const char *what)
{
    return describe_sqlite(s->path, s->db, rc, what, s->base.last_error, sizeof s->base.last_error);
}

static int errno_code(int e)
{
    switch (e) {
    case EACCES:
    case EPERM:
    case EROFS: return MOAT_EPERM;
    case ENOMEM: return MOAT_ENOMEM;
    default: return MOAT_EIO;
    }
}

static int errno_fail(const char *path, const char *what, int e, char *err, size_t cap)
{
    moat_errf(err, cap,
              "cannot %s %s: %s; moat needs write access there (run moat as the folder's owner, "
              "or choose another folder with --data)",
              what, path, strerror(e));
    return errno_code(e);
}

/* mkdir -p: missing parents get the usual 0755, the data folder itself 0700. */
static int make_data_dir(const char *dir, char *err, size_t cap)
{
    struct stat st;
    if (stat(dir, &st) == 0) {
        if (S_ISDIR(st.st_mode))
            return 0;
        moat_errf(err, cap, "%s exists and is not a folder; choose another folder with --data",
                  dir);
        return MOAT_EINVAL;
    }
    if (errno != ENOENT)
        return errno_fail(dir, "use the data folder", errno, err, cap);

    char *p = moat_xstrdup(dir);
    size_t len = strlen(p);
    while (len > 1 && p[len - 1] == '/')
        p[--len] = '\0';
    int rc = 0;
    for (char *c = p + 1; *c != '\0'; c++) {
        if (*c != '/')
            continue;
        *c = '\0';
        if (mkdir(p, 0755) != 0 && errno != EEXIST) {
            rc = errno_fail(p, "create folder", errno, err, cap);
            goto out;
        }
        *c = '/';
    }
    if (mkdir(p, 0700) != 0) {
        if (errno != EEXIST)
            rc = errno_fail(p, "create the data folder", errno, err, cap);
        goto out;
    }
    /* The umask can only take bits away, but one that takes the owner's away would leave a
     * folder moat cannot use; set the mode outright. */
    if (chmod(p, 0700) != 0)
        rc = errno_fail(p, "set the mode of", errno, err, cap);
out:
    free(p);
    return rc;
}

static uint32_t be32(const unsigned char *b)
{
    return (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | (uint32_t)b[3];
}

static int newer_schema(const char *path, int version, char *err, size_t cap)
{
    moat_errf(err, cap,
              "%s was written by a newer moat (schema %d, this moat knows %d); upgrade moat or "
              "point --data at another folder",
              path, version, MOAT_STORAGE_SCHEMA_VERSION);
    return MOAT_ESCHEMA;
}

static int not_ours(const char *path, const char *why, char *err, size_t cap)
{
    moat_errf(err, cap,
              "%s is not a moat database or is damaged (%s); moat will not overwrite it: move it "
              "aside to start fresh",
              path, why);
    return MOAT_ESTORAGE;
}

/* Create the file 0600 when it is missing; otherwise vet its header with plain reads, before
 * SQLite opens it (SQLite may write while opening, for example to roll back a journal). */
static int prepare_file(const char *path, char *err, size_t cap)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) {
        fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd >= 0) {
            /* Umask-proof: the mode is exactly 0600 whatever the process umask. */
            int rc =
                fchmod(fd, 0600) == 0 ? 0 : errno_fail(path, "set the mode of", errno, err, cap);
            close(fd);
            return rc;
        }
        if (errno != EEXIST)
            return errno_fail(path, "create", errno, err, cap);
        /* Another process created it in between: vet it like any existing file. */
        fd = open(path, O_RDONLY | O_CLOEXEC);
    }
    if (fd < 0)
        return errno_fail(path, "open", errno, err, cap);

    int rc = 0;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        rc = errno_fail(path, "inspect", errno, err, cap);
        goto out;
    }
    if (!S_ISREG(st.st_mode)) {
        rc = not_ours(path, "not a regular file", err, cap);
        goto out;
    }
    unsigned char hdr[100];
    size_t got = 0;
    while (got < sizeof hdr) {
        ssize_t r = pread(fd, hdr + got, sizeof hdr - got, (off_t)got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            rc = errno_fail(path, "read", errno, err, cap);
            goto out;
        }
        if (r == 0)
            break;
        got += (size_t)r;
    }
    /* An empty file is a valid empty database (schema 0): migrate it. */
    if (got == 0)
        goto out;
    if (got < sizeof hdr || memcmp(hdr, "SQLite format 3", 16) != 0) {
        rc = not_ours(path, "no SQLite header", err, cap);
        goto out;
    }
    /* Offsets from the SQLite file format: user_version at 60, application_id at 68. The
     * header can lag the -wal file; the caller checks again through SQLite. */
    int32_t version = (int32_t)be32(hdr + 60);
    uint32_t app = be32(hdr + 68);
    if (app != 0 && app != APP_ID) {
        rc = not_ours(path, "another program's SQLite file", err, cap);
        goto out;
    }
    if (version > MOAT_STORAGE_SCHEMA_VERSION) {
        rc = newer_schema(path, version, err, cap);
        goto out;
    }
    if (version < 0) {
        rc = not_ours(path, "negative schema version", err, cap);
        goto out;
    }
out:
    close(fd);
    return rc;
}

/* A file readable by others leaks private keys. Called once the file is known to be ours;
 * the -wal and -shm files copied the database's mode when SQLite created them, so they are
 * tightened too. */
static void tighten_modes(const char *path)
{
    static const char *const suffixes[] = {"", "-wal", "-shm"};
    char p[4096];
    for (size_t i = 0; i < MOAT_ARRAY_LEN(suffixes); i++) {
        struct stat st;
        if ((size_t)snprintf(p, sizeof p, "%s%s", path, suffixes[i]) >= sizeof p)
            return;
        if (stat(p, &st) != 0 || (st.st_mode & 077) == 0)
            continue;
        if (chmod(p, 0600) == 0)
            MOAT_WARN("%s was readable by other users; its mode is now 0600", p);
        else
            MOAT_WARN("%s is readable by other users and chmod failed: %s", p, strerror(errno));
    }
}

static int query_int(sqlite3 *db, const char *sql, int64_t *out)
{
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(db, sql, -1, &st, NULL);
    if (rc == SQLITE_OK) {
        rc = sqlite3_step(st);
        if (rc == SQLITE_ROW) {
            *out = sqlite3_column_int64(st, 0);
            rc = SQLITE_OK;
        } else if (rc == SQLITE_DONE) {
            rc = SQLITE_ERROR;
        }
    }
    sqlite3_finalize(st);
    return rc;
}

/* Apply migration steps forward, each with its version bump in one IMMEDIATE transaction.
 * The version is re-read inside the transaction so that two moats starting together on the
 * same folder apply each step once. */
static int migrate(sqlite_storage_t *s, char *err, size_t cap)
{
    /* Usually there is nothing to do; find that out without taking the write lock, so that
     * opening next to a busy writer (a second moat command, say) does not wait on it. */
    int64_t current = 0;
    int qrc = query_int(s->db, "PRAGMA user_version", &current);
    if (qrc != SQLITE_OK)
        return describe_sqlite(s->path, s->db, qrc, "reading the schema version", err, cap);
    if (current == MOAT_STORAGE_SCHEMA_VERSION)
        return 0;
    for (;;) {
        int rc = sqlite3_exec(s->db, "BEGIN IMMEDIATE", NULL, NULL, NULL);
        if (rc != SQLITE_OK)
            return describe_sqlite(s->path, s->db, rc, "starting the schema upgrade", err, cap);
        int64_t version = 0;
        rc = query_int(s->db, "PRAGMA user_version", &version);
        if (rc != SQLITE_OK) {
            int code = describe_sqlite(s->path, s->db, rc, "reading the schema version", err, cap);
            sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
            return code;
        }
        if (version >= MOAT_STORAGE_SCHEMA_VERSION) {
            sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
            if (version > MOAT_STORAGE_SCHEMA_VERSION)
                return newer_schema(s->path, (int)version, err, cap);
            return 0;
        }
        int next = (int)version + 1;
        /* PRAGMA values cannot be bound; these are integers this file computes, never input. */
        char bump[96];
        snprintf(bump, sizeof bump, "PRAGMA user_version = %d; PRAGMA application_id = %d", next,
                 APP_ID);
        char what[64];
        snprintf(what, sizeof what, "upgrading the schema to version %d", next);
        rc = sqlite3_exec(s->db, moat__storage_migration_sql(next), NULL, NULL, NULL);
        if (rc == SQLITE_OK)
            rc = sqlite3_exec(s->db, bump, NULL, NULL, NULL);
        if (rc == SQLITE_OK)
            rc = sqlite3_exec(s->db, "COMMIT", NULL, NULL, NULL);
        if (rc != SQLITE_OK) {
            int code = describe_sqlite(s->path, s->db, rc, what, err, cap);
            if (!sqlite3_get_autocommit(s->db))
                sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
            return code;
        }
        MOAT_INFO("%s: schema upgraded to version %d", s->path, next);
    }
}

/* ---- statements and transactions ---- */

static sqlite3_stmt *stmt_get(sqlite_storage_t *s, int which, int *rc)
{
    if (s->stmts[which] == NULL) {
        *rc = sqlite3_prepare_v3(s->db, stmt_sql[which], -1, SQLITE_PREPARE_PERSISTENT,
                                 &s->stmts[which], NULL);
        if (*rc != SQLITE_OK) {
            sqlite3_finalize(s->stmts[which]);
            s->stmts[which] = NULL;
            return NULL;
        }
    }
    *rc = SQLITE_OK;
    return s->stmts[which];
}

/* Ready a cached statement for its next use and drop the bindings, which may point at the
 * caller's strings (private keys among them). */
static void stmt_done(sqlite3_stmt *st)
{
    sqlite3_reset(st);
    sqlite3_clear_bindings(st);
}

static int bind_text(sqlite3_stmt *st, int i, const char *v)
{
    /* A NULL pointer binds SQL NULL. */
    return sqlite3_bind_text(st, i, v, -1, SQLITE_STATIC);
}

static char *col_str(sqlite3_stmt *st, int i)
{
    const unsigned char *t = sqlite3_column_text(st, i);
    if (t == NULL)
        return NULL;
    return moat_xstrndup((const char *)t, (size_t)sqlite3_column_bytes(st, i));
}

static int tx_begin(sqlite_storage_t *s)
{
    if (s->depth > 0 && sqlite3_get_autocommit(s->db)) {
        /* SQLite already rolled the enclosing transaction back (after a disk-full or I/O
         * error); a SAVEPOINT now would silently start a new, unrelated one. */
        moat_errf(s->base.last_error, sizeof s->base.last_error,
                  "%s: the enclosing transaction was rolled back after an earlier error", s->path);
        return MOAT_ESTORAGE;
    }
    const char *sql = s->depth == 0 ? "BEGIN IMMEDIATE" : "SAVEPOINT moat_nested";
    int rc = sqlite3_exec(s->db, sql, NULL, NULL, NULL);
    if (rc != SQLITE_OK)
        return fail(s, rc, "starting a transaction");
    s->depth++;
    return 0;
}

/* Undo the innermost level. SQLite may already have rolled the whole transaction back on its
 * own; that is not an error here. */
static int tx_rollback(sqlite_storage_t *s)
{
    if (s->depth == 0) {
        moat_errf(s->base.last_error, sizeof s->base.last_error, "rollback without a transaction");
        return MOAT_EINVAL;
    }
    s->depth--;
    if (sqlite3_get_autocommit(s->db))
        return 0;
    const char *sql = s->depth == 0 ? "ROLLBACK" : "ROLLBACK TO moat_nested; RELEASE moat_nested";
    int rc = sqlite3_exec(s->db, sql, NULL, NULL, NULL);
    return rc == SQLITE_OK ? 0 : fail(s, rc, "rolling back a transaction");
}

/* Roll back the innermost level without losing the message that explains why. */
static void tx_abandon(sqlite_storage_t *s)
{
    char saved[sizeof s->base.last_error];
    memcpy(saved, s->base.last_error, sizeof saved);
    tx_rollback(s);
    memcpy(s->base.last_error, saved, sizeof saved);
}

/* Commit the innermost level. On failure the level stays open, as SQLite leaves a failed
 * COMMIT: the caller rolls it back, which is what "on any error, rollback" code does. */
static int tx_commit(sqlite_storage_t *s)
{
    if (s->depth == 0) {
        moat_errf(s->base.last_error, sizeof s->base.last_error, "commit without a transaction");
        return MOAT_EINVAL;
    }
    if (sqlite3_get_autocommit(s->db)) {
        moat_errf(s->base.last_error, sizeof s->base.last_error,
                  "%s: the transaction was rolled back after an earlier error", s->path);
        return MOAT_ESTORAGE;
    }
    const char *sql = s->depth == 1 ? "COMMIT" : "RELEASE moat_nested";
    int rc = sqlite3_exec(s->db, sql, NULL, NULL, NULL);
    if (rc != SQLITE_OK)
        return fail(s, rc, "committing a transaction");
    s->depth--;
    return 0;
}

/* ---- the vtable ---- */

static sqlite_storage_t *from_base(moat_storage_t *base)
{
    return MOAT_CONTAINER_OF(base, sqlite_storage_t, base);
}

static int op_begin(moat_storage_t *base)
{
    return tx_begin(from_base(base));
}

static int op_commit(moat_storage_t *base)
{
    return tx_commit(from_base(base));
}

static int op_rollback(moat_storage_t *base)
{
    return tx_rollback(from_base(base));
}

/* Finish a one-statement change made inside its own transaction level. */
static int finish_change(sqlite_storage_t *s, int rc, const char *what)
{
    int code = rc == SQLITE_DONE ? tx_commit(s) : fail(s, rc, what);
    if (code != 0)
        tx_abandon(s);
    return code;
}

/* A record's columns as ?1..?9 of ST_PUT_CERT and ST_PUT_CERT_FENCED; updated_at 0 is now. */
static void bind_cert(sqlite3_stmt *st, const moat_cert_record_t *rec)
{
    bind_text(st, 1, rec->id);
    bind_text(st, 2, rec->names);
    bind_text(st, 3, rec->issuer);
    bind_text(st, 4, rec->source);
    sqlite3_bind_int64(st, 5, rec->not_before);
    sqlite3_bind_int64(st, 6, rec->not_after);
    bind_text(st, 7, rec->cert_pem);
    bind_text(st, 8, rec->key_pem);
    sqlite3_bind_int64(st, 9, rec->updated_at != 0 ? rec->updated_at : (int64_t)time(NULL));
}

static int op_put_cert(moat_storage_t *base, const moat_cert_record_t *rec)
{
    sqlite_storage_t *s = from_base(base);
    if (rec == NULL || rec->id == NULL) {
        moat_errf(base->last_error, sizeof base->last_error, "put_cert: a record needs an id");
        return MOAT_EINVAL;
    }
    int rc = tx_begin(s);
    if (rc != 0)
        return rc;
    sqlite3_stmt *st = stmt_get(s, ST_PUT_CERT, &rc);
    if (st != NULL) {
        bind_cert(st, rec);
        rc = sqlite3_step(st);
        stmt_done(st);
    }
    return finish_change(s, rc, "saving a certificate");
}

static void read_cert(sqlite3_stmt *st, moat_cert_record_t *r)
{
    r->id = col_str(st, 0);
    r->names = col_str(st, 1);
    r->issuer = col_str(st, 2);
    r->source = col_str(st, 3);
    r->not_before = sqlite3_column_int64(st, 4);
    r->not_after = sqlite3_column_int64(st, 5);
    r->cert_pem = col_str(st, 6);
    r->key_pem = col_str(st, 7);
    r->updated_at = sqlite3_column_int64(st, 8);
}

static int op_get_cert(moat_storage_t *base, const char *id, moat_cert_record_t *out)
{
    sqlite_storage_t *s = from_base(base);
    if (out == NULL || id == NULL) {
        moat_errf(base->last_error, sizeof base->last_error, "get_cert: missing argument");
        return MOAT_EINVAL;
    }
    memset(out, 0, sizeof *out);
    int rc;
    sqlite3_stmt *st = stmt_get(s, ST_GET_CERT, &rc);
    if (st == NULL)
        return fail(s, rc, "reading a certificate");
    bind_text(st, 1, id);
    rc = sqlite3_step(st);
    int code = 0;
    if (rc == SQLITE_ROW) {
        read_cert(st, out);
    } else if (rc == SQLITE_DONE) {
        moat_errf(base->last_error, sizeof base->last_error, "no certificate stored as \"%s\"", id);
        code = MOAT_ENOT_FOUND;
    } else {
        code = fail(s, rc, "reading a certificate");
    }
    stmt_done(st);
    return code;
}

static int op_list_certs(moat_storage_t *base, moat_cert_record_t **out, size_t *n)
{
    sqlite_storage_t *s = from_base(base);
    if (out == NULL || n == NULL)
        return MOAT_EINVAL;
    *out = NULL;
    *n = 0;
    int rc;
    sqlite3_stmt *st = stmt_get(s, ST_LIST_CERTS, &rc);
    if (st == NULL)
        return fail(s, rc, "listing certificates");
    moat_cert_record_t *recs = NULL;
    size_t len = 0, cap = 0;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (len == cap) {
            cap = cap ? cap * 2 : 8;
            recs = moat_xrealloc(recs, cap * sizeof *recs);
        }
        memset(&recs[len], 0, sizeof recs[len]);
        read_cert(st, &recs[len++]);
    }
    stmt_done(st);
    if (rc != SQLITE_DONE) {
        moat_cert_records_free(recs, len);
        return fail(s, rc, "listing certificates");
    }
    *out = recs;
    *n = len;
    return 0;
}

static int op_add_event(moat_storage_t *base, const char *kind, const char *names,
                        const char *detail)
{
    sqlite_storage_t *s = from_base(base);
    int rc = tx_begin(s);
    if (rc != 0)
        return rc;
    sqlite3_stmt *st = stmt_get(s, ST_ADD_EVENT, &rc);
    if (st != NULL) {
        sqlite3_bind_int64(st, 1, (int64_t)time(NULL));
        bind_text(st, 2, kind);
        bind_text(st, 3, names);
        bind_text(st, 4, detail);
        rc = sqlite3_step(st);
        stmt_done(st);
    }
    if (rc == SQLITE_DONE && (st = stmt_get(s, ST_PRUNE_EVENTS, &rc)) != NULL) {
        sqlite3_bind_int64(st, 1, EVENTS_KEEP);
        rc = sqlite3_step(st);
        stmt_done(st);
    }
    return finish_change(s, rc, "recording an event");
}

static int op_list_events(moat_storage_t *base, size_t limit, moat_event_t **out, size_t *n)
{
    sqlite_storage_t *s = from_base(base);
    if (out == NULL || n == NULL)
        return MOAT_EINVAL;
    *out = NULL;
    *n = 0;
    if (limit == 0)
        return 0;
    int rc;
    sqlite3_stmt *st = stmt_get(s, ST_LIST_EVENTS, &rc);
    if (st == NULL)
        return fail(s, rc, "listing events");
    sqlite3_bind_int64(st, 1, limit > (size_t)INT64_MAX ? INT64_MAX : (int64_t)limit);
    moat_event_t *evs = NULL;
    size_t len = 0, cap = 0;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (len == cap) {
            cap = cap ? cap * 2 : 16;
            evs = moat_xrealloc(evs, cap * sizeof *evs);
        }
        moat_event_t *e = &evs[len++];
        e->time = sqlite3_column_int64(st, 0);
        e->kind = col_str(st, 1);
        e->names = col_str(st, 2);
        e->detail = col_str(st, 3);
    }
    stmt_done(st);
    if (rc != SQLITE_DONE) {
        moat_events_free(evs, len);
        return fail(s, rc, "listing events");
    }
    *out = evs;
    *n = len;
    return 0;
}

/* A NULL value deletes the key: the interface has no separate delete, and "no value" and
 * "absent" mean the same to every caller. */
static int op_kv_put(moat_storage_t *base, const char *key, const char *value)
{
    sqlite_storage_t *s = from_base(base);
    if (key == NULL) {
        moat_errf(base->last_error, sizeof base->last_error, "kv_put: missing key");
        return MOAT_EINVAL;
    }
    int rc;
    sqlite3_stmt *st = stmt_get(s, value != NULL ? ST_KV_PUT : ST_KV_DELETE, &rc);
    if (st == NULL)
        return fail(s, rc, "saving a setting");
    bind_text(st, 1, key);
    if (value != NULL) {
        bind_text(st, 2, value);
        sqlite3_bind_int64(st, 3, (int64_t)time(NULL));
    }
    rc = sqlite3_step(st);
    stmt_done(st);
    return rc == SQLITE_DONE ? 0 : fail(s, rc, "saving a setting");
}

static int op_kv_get(moat_storage_t *base, const char *key, char **value_out)
{
    sqlite_storage_t *s = from_base(base);
    if (key == NULL || value_out == NULL)
        return MOAT_EINVAL;
    *value_out = NULL;
    int rc;
    sqlite3_stmt *st = stmt_get(s, ST_KV_GET, &rc);
    if (st == NULL)
        return fail(s, rc, "reading a setting");
    bind_text(st, 1, key);
    rc = sqlite3_step(st);
    int code = 0;
    if (rc == SQLITE_ROW && sqlite3_column_type(st, 0) != SQLITE_NULL) {
        *value_out = col_str(st, 0);
    } else if (rc == SQLITE_ROW || rc == SQLITE_DONE) {
        moat_errf(base->last_error, sizeof base->last_error, "no value stored for \"%s\"", key);
        code = MOAT_ENOT_FOUND;
    } else {
        code = fail(s, rc, "reading a setting");
    }
    stmt_done(st);
    return code;
}

/* Here rather than in storage.c (which only frees records) to keep this change to one file;
 * it is backend-neutral. */
static int op_kv_list(moat_storage_t *base, const char *prefix, moat_kv_t **out, size_t *n)
{
    sqlite_storage_t *s = from_base(base);
    if (prefix == NULL || out == NULL || n == NULL)
        return MOAT_EINVAL;
    *out = NULL;
    *n = 0;
    /* The smallest string above every string with this prefix: drop trailing 0xff bytes and
     * increment the last remaining one; none left means no upper bound. */
    size_t pl = strlen(prefix);
    char *upper = moat_xstrndup(prefix, pl);
    while (pl > 0 && (unsigned char)upper[pl - 1] == 0xff)
        upper[--pl] = '\0';
    if (pl > 0)
        upper[pl - 1] = (char)((unsigned char)upper[pl - 1] + 1);
    int rc;
    sqlite3_stmt *st = stmt_get(s, ST_KV_LIST, &rc);
    if (st == NULL) {
        free(upper);
        return fail(s, rc, "listing settings");
    }
    bind_text(st, 1, prefix);
    if (pl > 0)
        bind_text(st, 2, upper);
    else
        sqlite3_bind_null(st, 2);
    moat_kv_t *rows = NULL;
    size_t len = 0, cap = 0;
    while ((rc = sqlite3_step(st)) == SQLITE_ROW) {
        if (len == cap) {
            cap = cap ? cap * 2 : 16;
            rows = moat_xrealloc(rows, cap * sizeof *rows);
        }
        moat_kv_t *r = &rows[len++];
        r->key = col_str(st, 0);
        r->value = col_str(st, 1);
        r->updated_at = sqlite3_column_int64(st, 2);
    }
    stmt_done(st);
    free(upper);
    if (rc != SQLITE_DONE) {
        moat_kv_free(rows, len);
        return fail(s, rc, "listing settings");
    }
    *out = rows;
    *n = len;
    return 0;
}

/* ---- leases ---- */

static int op_lease_take(moat_storage_t *base, const char *name, const char *owner, int ttl_s,
                         const char *steal, int64_t *token, char **holder)
{
    sqlite_storage_t *s = from_base(base);
    if (holder != NULL)
        *holder = NULL;
    if (name == NULL || owner == NULL || token == NULL || ttl_s <= 0)
        return MOAT_EINVAL;
    *token = 0;
    int rc;
    sqlite3_stmt *st = stmt_get(s, ST_LEASE_TAKE, &rc);
    if (st == NULL)
        return fail(s, rc, "taking a lease");
    bind_text(st, 1, name);
    bind_text(st, 2, owner);
    sqlite3_bind_int(st, 3, ttl_s);
    bind_text(st, 4, steal);
    rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        *token = sqlite3_column_int64(st, 0);
        rc = sqlite3_step(st);
    }
    stmt_done(st);
    if (rc != SQLITE_DONE)
        return fail(s, rc, "taking a lease");
    if (*token > 0)
        return 1;
    if (holder != NULL && (st = stmt_get(s, ST_LEASE_HOLDER, &rc)) != NULL) {
        bind_text(st, 1, name);
        if (sqlite3_step(st) == SQLITE_ROW)
            *holder = col_str(st, 0);
        stmt_done(st);
    }
    return 0;
}

static int lease_update(sqlite_storage_t *s, int which, const char *name, int64_t token, int ttl_s,
                        const char *what)
{
    int rc;
    sqlite3_stmt *st = stmt_get(s, which, &rc);
    if (st == NULL)
        return fail(s, rc, what);
    bind_text(st, 1, name);
    sqlite3_bind_int64(st, 2, token);
    if (which == ST_LEASE_RENEW)
        sqlite3_bind_int(st, 3, ttl_s);
    rc = sqlite3_step(st);
    stmt_done(st);
    if (rc != SQLITE_DONE)
        return fail(s, rc, what);
    return sqlite3_changes(s->db) == 1 ? 0 : MOAT_ENOT_FOUND;
}

static int op_lease_renew(moat_storage_t *base, const char *name, int64_t token, int ttl_s)
{
    sqlite_storage_t *s = from_base(base);
    if (name == NULL || ttl_s <= 0)
        return MOAT_EINVAL;
    int rc = lease_update(s, ST_LEASE_RENEW, name, token, ttl_s, "renewing a lease");
    if (rc == MOAT_ENOT_FOUND)
        moat_errf(base->last_error, sizeof base->last_error,
                  "the lease \"%s\" was taken by another holder", name);
    return rc;
}

static int op_lease_release(moat_storage_t *base, const char *name, int64_t token)
{
    sqlite_storage_t *s = from_base(base);
    if (name == NULL)
        return MOAT_EINVAL;
    int rc = lease_update(s, ST_LEASE_RELEASE, name, token, 0, "releasing a lease");
    return rc == MOAT_ENOT_FOUND ? 0 : rc;
}

static int op_put_cert_fenced(moat_storage_t *base, const moat_cert_record_t *rec,
                              const char *lease, int64_t token)
{
    sqlite_storage_t *s = from_base(base);
    if (rec == NULL || rec->id == NULL || lease == NULL) {
        moat_errf(base->last_error, sizeof base->last_error,
                  "put_cert_fenced: a record needs an id and a lease");
        return MOAT_EINVAL;
    }
    int rc = tx_begin(s);
    if (rc != 0)
        return rc;
    sqlite3_stmt *st = stmt_get(s, ST_PUT_CERT_FENCED, &rc);
    int changed = 0;
    if (st != NULL) {
        bind_cert(st, rec);
        bind_text(st, 10, lease);
        sqlite3_bind_int64(st, 11, token);
        rc = sqlite3_step(st);
        stmt_done(st);
        changed = rc == SQLITE_DONE && sqlite3_changes(s->db) == 1;
    }
    if (rc == SQLITE_DONE && !changed) {
        /* Nothing written: say whether the lease was lost or a newer record is there. */
        int held = 0;
        if ((st = stmt_get(s, ST_LEASE_CHECK, &rc)) != NULL) {
            bind_text(st, 1, lease);
            sqlite3_bind_int64(st, 2, token);
            rc = sqlite3_step(st);
            held = rc == SQLITE_ROW;
            stmt_done(st);
        }
        if (rc == SQLITE_ROW || rc == SQLITE_DONE) {
            moat_errf(base->last_error, sizeof base->last_error,
                      held ? "a newer certificate than this one is stored as \"%s\""
                           : "the lease \"%s\" was lost before the certificate was stored; "
                             "the holder that took it over writes instead",
                      held ? rec->id : lease);
            tx_abandon(s);
            return held ? MOAT_EEXISTS : MOAT_EPERM;
        }
    }
    return finish_change(s, rc, "saving a certificate");
}

/* Nothing pushed: processes sharing one file see each other's changes through their polls. */
static int op_watch_fd(moat_storage_t *base)
{
    (void)base;
    return -1;
}

static int op_watch_drain(moat_storage_t *base, moat_storage_news_cb cb, void *arg)
{
    (void)base;
    (void)cb;
    (void)arg;
    return MOAT_ECLOSED;
}

static void op_close(moat_storage_t *base)
{
    if (base == NULL)
        return;
    sqlite_storage_t *s = from_base(base);
    for (int i = 0; i < ST__COUNT; i++)
        sqlite3_finalize(s->stmts[i]);
    /* An unfinished transaction is dropped, as if rolled back: sqlite3_close_v2 does that. */
    if (s->depth > 0)
        MOAT_WARN("%s: closing with an unfinished transaction; its changes are discarded", s->path);
    sqlite3_close_v2(s->db);
    free(s->path);
    free(s);
}

/* ---- integrity ---- */

/* PRAGMA quick_check walks every table and index page and the free list (it skips only the
 * index-to-table cross-checks of integrity_check), so damage in the middle of the file is
 * found now, not at the first write that lands on it. 0, or a sentence naming the file. */
static int quick_check(sqlite3 *db, const char *path, char *err, size_t cap)
{
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(db, "PRAGMA quick_check(1)", -1, &st, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_step(st);
    if (rc != SQLITE_ROW) {
        sqlite3_finalize(st);
        return describe_sqlite(path, db, rc, "checking the file for damage", err, cap);
    }
    const char *verdict = (const char *)sqlite3_column_text(st, 0);
    int ok = verdict != NULL && strcmp(verdict, "ok") == 0;
    if (!ok)
        moat_errf(err, cap,
                  "%s is damaged (%s); moat will not overwrite it: restore it from a backup, "
                  "or move it aside to start fresh (certificates are then issued again)",
                  path, verdict ? verdict : "no verdict");
    sqlite3_finalize(st);
    return ok ? 0 : MOAT_ESTORAGE;
}

static int op_check(moat_storage_t *base)
{
    sqlite_storage_t *s = from_base(base);
    /* Pages this connection holds in its cache would be checked instead of the file's. */
    sqlite3_db_release_memory(s->db);
    int rc = quick_check(s->db, s->path, s->base.last_error, sizeof s->base.last_error);
    if (rc != 0)
        return rc;
    /* PASSIVE: never waits for readers or writers (another moat on the same file). A
     * checkpoint that cannot write (a full or read-only disk) is not damage: the log keeps
     * the changes and the next check tries again. */
    sqlite3_wal_checkpoint_v2(s->db, NULL, SQLITE_CHECKPOINT_PASSIVE, NULL, NULL);
    return 0;
}

static const moat_storage_ops_t sqlite_ops = {
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

/* ---- open ---- */

/* Everything that reads before the first write: is this our file, and not from the future?
 * The connection is set not to checkpoint on close, so that refusing a file leaves it
 * byte-for-byte as it was even when its newest content sits in the -wal file. */
static int vet_connection(sqlite_storage_t *s, char *err, size_t cap)
{
    int64_t version = 0, app = 0, tables = 0;
    int rc = query_int(s->db, "PRAGMA user_version", &version);
    if (rc == SQLITE_OK)
        rc = query_int(s->db, "PRAGMA application_id", &app);
    if (rc == SQLITE_OK)
        rc = query_int(s->db, "SELECT count(*) FROM sqlite_schema", &tables);
    if (rc != SQLITE_OK)
        return describe_sqlite(s->path, s->db, rc, "reading the schema", err, cap);
    if ((uint32_t)app != 0 && (uint32_t)app != APP_ID)
        return not_ours(s->path, "another program's SQLite file", err, cap);
    if (version > MOAT_STORAGE_SCHEMA_VERSION)
        return newer_schema(s->path, (int)version, err, cap);
    if (version < 0)
        return not_ours(s->path, "negative schema version", err, cap);
    /* Schema 0 with tables in it is some other program's database: leave it alone. */
    if (version == 0 && tables > 0)
        return not_ours(s->path, "it holds tables moat did not create", err, cap);
    return quick_check(s->db, s->path, err, cap);
}

static int configure(sqlite_storage_t *s, char *err, size_t cap)
{
    sqlite3_stmt *st = NULL;
    int rc = sqlite3_prepare_v2(s->db, "PRAGMA journal_mode = WAL", -1, &st, NULL);
    if (rc == SQLITE_OK)
        rc = sqlite3_step(st);
    if (rc == SQLITE_ROW) {
        const char *mode = (const char *)sqlite3_column_text(st, 0);
        rc = mode != NULL && strcmp(mode, "wal") == 0 ? SQLITE_OK : SQLITE_ERROR;
        if (rc != SQLITE_OK)
            moat_errf(err, cap, "%s: could not switch to WAL journal mode (got %s)", s->path,
                      mode ? mode : "nothing");
        sqlite3_finalize(st);
        if (rc != SQLITE_OK)
            return MOAT_ESTORAGE;
    } else {
        sqlite3_finalize(st);
        return describe_sqlite(s->path, s->db, rc, "switching to WAL mode", err, cap);
    }
    /* synchronous=FULL: writes are rare (issuance, renewal) and a key lost to a power cut
     * costs a re-issuance against rate limits. secure_delete: a replaced private key is
     * zeroed in the file instead of lingering in a free page. */
    rc = sqlite3_exec(s->db,
                      "PRAGMA foreign_keys = ON; PRAGMA synchronous = FULL;"
                      " PRAGMA secure_delete = ON",
                      NULL, NULL, NULL);
    if (rc != SQLITE_OK)
        return describe_sqlite(s->path, s->db, rc, "configuring the connection", err, cap);
    return 0;
}

int moat_storage_open_sqlite(const char *data_dir, moat_storage_t **out, char *err, size_t errlen)
{
    char scratch[512];
    if (err == NULL || errlen == 0) {
        err = scratch;
        errlen = sizeof scratch;
    }
    err[0] = '\0';
    if (out == NULL)
        return MOAT_EINVAL;
    *out = NULL;
    if (data_dir == NULL || data_dir[0] == '\0') {
        moat_errf(err, errlen, "no data folder given; choose one with --data");
        return MOAT_EINVAL;
    }

    int rc = make_data_dir(data_dir, err, errlen);
    if (rc != 0)
        return rc;

    sqlite_storage_t *s = moat_xcalloc(1, sizeof *s);
    s->base.ops = &sqlite_ops;
    size_t dl = strlen(data_dir);
    while (dl > 1 && data_dir[dl - 1] == '/')
        dl--;
    s->path = moat_xmalloc(dl + sizeof "/moat.db");
    memcpy(s->path, data_dir, dl);
    strcpy(s->path + dl, dl == 1 && data_dir[0] == '/' ? "moat.db" : "/moat.db");

    rc = prepare_file(s->path, err, errlen);
    if (rc != 0)
        goto fail;

    /* No SQLITE_OPEN_CREATE: prepare_file made the file with the right mode; a file that
     * vanished since is an error, not something to recreate with SQLite's default mode. */
    /* Debian's SQLite is built with SQLITE_USE_URI, so a relative path starting "file:" would
     * be parsed as a URI (with ?mode=... options); "./" keeps it a plain file name. */
    char *name = s->path;
    if (strncmp(s->path, "file:", 5) == 0) {
        name = moat_xmalloc(strlen(s->path) + 3);
        strcpy(name, "./");
        strcat(name, s->path);
    }
    int src = sqlite3_open_v2(name, &s->db, SQLITE_OPEN_READWRITE | SQLITE_OPEN_FULLMUTEX, NULL);
    if (name != s->path)
        free(name);
    if (src == SQLITE_OK) {
        sqlite3_extended_result_codes(s->db, 1);
        sqlite3_db_config(s->db, SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1, (int *)NULL);
        src = sqlite3_busy_timeout(s->db, BUSY_TIMEOUT_MS);
    }
    if (src != SQLITE_OK) {
        rc = describe_sqlite(s->path, s->db, src, "opening the database", err, errlen);
        goto fail;
    }
    /* SQLite quietly falls back to read-only when the file is write-protected; say so now
     * rather than at the first certificate save. */
    if (sqlite3_db_readonly(s->db, "main") == 1) {
        rc = describe_sqlite(s->path, NULL, SQLITE_READONLY, "opening the database", err, errlen);
        goto fail;
    }
    rc = vet_connection(s, err, errlen);
    if (rc != 0)
        goto fail;
    /* Vetted: from here on this is our file, and checkpointing on close is wanted again. */
    tighten_modes(s->path);
    sqlite3_db_config(s->db, SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 0, (int *)NULL);

    rc = configure(s, err, errlen);
    if (rc == 0)
        rc = migrate(s, err, errlen);
    if (rc != 0)
        goto fail;
    *out = &s->base;
    return 0;

fail:
    sqlite3_close_v2(s->db);
    free(s->path);
    free(s);
    return rc;
}
