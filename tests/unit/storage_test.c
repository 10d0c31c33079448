/* Unit tests for the storage backends. The record, event, kv, transaction, lease and copy
 * cases run against SQLite (storage/sqlite.c), again against a real PostgreSQL 15
 * (storage/postgres.c) that the test starts itself (storage_fixture.h), and both again
 * through the encrypting wrapper. SQLite's own cases cover file modes and refusing files moat
 * must not touch; PostgreSQL's own are in storage_pg_test.c. Without the PostgreSQL binaries
 * those cases are skipped, not passed. */
#include "storage_fixture.h"

#include <errno.h>
#include <fcntl.h>
#include <sqlite3.h>

static int file_mode(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 ? (int)(st.st_mode & 07777) : -1;
}

/* Run SQL on a file directly with SQLite, as another program (or a future moat) would. */
static void raw_exec(const char *path, const char *sql)
{
    sqlite3 *db = NULL;
    sqlite3_open(path, &db);
    char *msg = NULL;
    if (sqlite3_exec(db, sql, NULL, NULL, &msg) != SQLITE_OK)
        fprintf(stderr, "raw_exec(%s): %s\n", sql, msg);
    sqlite3_free(msg);
    sqlite3_close(db);
}

static long long raw_int(const char *path, const char *sql)
{
    sqlite3 *db = NULL;
    sqlite3_stmt *st = NULL;
    long long v = -1;
    sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL);
    if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK && sqlite3_step(st) == SQLITE_ROW)
        v = sqlite3_column_int64(st, 0);
    sqlite3_finalize(st);
    sqlite3_close(db);
    return v;
}

static void test_create_modes_reopen(void)
{
    char *base = case_dir("create");
    char *dir = path_join(base, "a/b/data");
    mode_t old = umask(0); /* the modes must not depend on the umask */
    moat_storage_t *s = open_ok(dir);
    umask(old);
    if (s == NULL)
        goto out;
    char *db = path_join(dir, "moat.db");
    CHECK_INT(file_mode(dir), 0700);
    CHECK_INT(file_mode(db), 0600);
    CHECK_INT(raw_int(db, "PRAGMA user_version"), MOAT_STORAGE_SCHEMA_VERSION);
    CHECK_INT(raw_int(db, "PRAGMA application_id"), 0x6d6f6174);

    moat_cert_record_t rec = sample("site:chat.example.com", "chat.example.com");
    CHECK_INT(s->ops->put_cert(s, &rec), 0);
    CHECK_INT(s->ops->kv_put(s, "acme.account", "{\"kid\":\"x\"}"), 0);
    s->ops->close(s);
    /* The -wal file must not be wider than the database. */
    char *wal = path_join(dir, "moat.db-wal");
    if (access(wal, F_OK) == 0)
        CHECK_INT(file_mode(wal) & 077, 0);
    free(wal);

    old = umask(0277);
    s = open_ok(dir);
    umask(old);
    if (s != NULL) {
        moat_cert_record_t got = {0};
        CHECK_INT(s->ops->get_cert(s, "site:chat.example.com", &got), 0);
        CHECK_STR(got.key_pem, rec.key_pem);
        moat_cert_record_clear(&got);
        char *v = NULL;
        CHECK_INT(s->ops->kv_get(s, "acme.account", &v), 0);
        CHECK_STR(v, "{\"kid\":\"x\"}");
        free(v);
        s->ops->close(s);
    }
    {
        sqlite3 *raw = NULL;
        sqlite3_stmt *st = NULL;
        sqlite3_open(db, &raw);
        sqlite3_prepare_v2(raw, "PRAGMA journal_mode", -1, &st, NULL);
        sqlite3_step(st);
        CHECK_STR((const char *)sqlite3_column_text(st, 0), "wal");
        sqlite3_finalize(st);
        sqlite3_close(raw);
    }
    /* A data folder given with a trailing slash names the same file. */
    char *slash = path_join(dir, "");
    s = open_ok(slash);
    if (s != NULL) {
        moat_cert_record_t got = {0};
        CHECK_INT(s->ops->get_cert(s, "site:chat.example.com", &got), 0);
        moat_cert_record_clear(&got);
        s->ops->close(s);
    }
    free(slash);
    free(db);
    /* A relative folder named like a SQLite URI is still a plain folder. */
    char cwd[4096];
    if (getcwd(cwd, sizeof cwd) != NULL && chdir(base) == 0) {
        s = open_ok("file:x?mode=ro");
        if (s != NULL) {
            moat_cert_record_t rec2 = sample("a", "a.example");
            CHECK_INT(s->ops->put_cert(s, &rec2), 0);
            s->ops->close(s);
        }
        CHECK_INT(access("file:x?mode=ro/moat.db", F_OK), 0);
        CHECK(chdir(cwd) == 0);
    }
out:
    free(dir);
    free(base);
}

static void test_certs(void)
{
    char *dir = case_dir("certs");
    moat_storage_t *s = open_ok(dir);
    if (s == NULL)
        goto out;
    moat_cert_record_t b = sample("site:b.example", "b.example,www.b.example");
    moat_cert_record_t a = sample("internal-root", NULL);
    a.updated_at = 42;
    /* Bound parameters: quotes and SQL in values are just text. */
    moat_cert_record_t c = sample("x'); DROP TABLE certs; --", "o'brien.example");
    CHECK_INT(s->ops->put_cert(s, &b), 0);
    CHECK_INT(s->ops->put_cert(s, &a), 0);
    CHECK_INT(s->ops->put_cert(s, &c), 0);

    moat_cert_record_t got = {0};
    CHECK_INT(s->ops->get_cert(s, "internal-root", &got), 0);
    CHECK_STR(got.id, "internal-root");
    CHECK(got.names == NULL);
    CHECK_STR(got.issuer, "moat internal CA");
    CHECK_STR(got.source, "internal");
    CHECK_INT(got.not_before, 1700000000);
    CHECK_INT(got.not_after, 1800000000);
    CHECK_STR(got.cert_pem, a.cert_pem);
    CHECK_STR(got.key_pem, a.key_pem);
    CHECK_INT(got.updated_at, 42);
    moat_cert_record_clear(&got);
    CHECK(got.id == NULL && got.key_pem == NULL);

    CHECK_INT(s->ops->get_cert(s, "site:b.example", &got), 0);
    CHECK(got.updated_at > 1600000000); /* 0 means "now" */
    moat_cert_record_clear(&got);

    /* Replace keeps one row per id. */
    b.names = "b.example";
    b.not_after = 1900000000;
    CHECK_INT(s->ops->put_cert(s, &b), 0);
    CHECK_INT(s->ops->get_cert(s, "site:b.example", &got), 0);
    CHECK_STR(got.names, "b.example");
    CHECK_INT(got.not_after, 1900000000);
    moat_cert_record_clear(&got);

    CHECK_INT(s->ops->get_cert(s, "nope", &got), MOAT_ENOT_FOUND);
    CHECK(got.id == NULL);
    CHECK(strstr(moat_storage_last_error(s), "nope") != NULL);
    moat_cert_record_t bad = {0};
    CHECK_INT(s->ops->put_cert(s, &bad), MOAT_EINVAL);

    moat_cert_record_t *list = NULL;
    size_t n = 0;
    CHECK_INT(s->ops->list_certs(s, &list, &n), 0);
    CHECK_INT(n, 3);
    if (n == 3) {
        CHECK_STR(list[0].id, "internal-root");
        CHECK_STR(list[1].id, "site:b.example");
        CHECK_STR(list[2].id, c.id);
        CHECK_STR(list[2].names, "o'brien.example");
    }
    moat_cert_records_free(list, n);
    s->ops->close(s);
out:
    free(dir);
}

static void test_events(void)
{
    char *dir = case_dir("events");
    moat_storage_t *s = open_ok(dir);
    if (s == NULL)
        goto out;
    moat_event_t *ev = NULL;
    size_t n = 99;
    CHECK_INT(s->ops->list_events(s, 10, &ev, &n), 0);
    CHECK_INT(n, 0);
    moat_events_free(ev, n);

    CHECK_INT(s->ops->add_event(s, "ca-created", "", "internal root"), 0);
    CHECK_INT(s->ops->add_event(s, "issued", "a.example", "by internal CA"), 0);
    CHECK_INT(s->ops->add_event(s, "renewed", "a.example", NULL), 0);
    CHECK_INT(s->ops->list_events(s, 10, &ev, &n), 0);
    CHECK_INT(n, 3);
    if (n == 3) {
        CHECK_STR(ev[0].kind, "renewed");
        CHECK(ev[0].detail == NULL);
        CHECK_STR(ev[1].kind, "issued");
        CHECK_STR(ev[1].names, "a.example");
        CHECK_STR(ev[1].detail, "by internal CA");
        CHECK_STR(ev[2].kind, "ca-created");
        CHECK(ev[0].time >= ev[2].time && ev[2].time > 1600000000);
    }
    moat_events_free(ev, n);

    CHECK_INT(s->ops->list_events(s, 2, &ev, &n), 0);
    CHECK_INT(n, 2);
    if (n == 2)
        CHECK_STR(ev[1].kind, "issued");
    moat_events_free(ev, n);
    CHECK_INT(s->ops->list_events(s, 0, &ev, &n), 0);
    CHECK_INT(n, 0);
    CHECK_INT(s->ops->list_events(s, (size_t)-1, &ev, &n), 0);
    CHECK_INT(n, 3);
    moat_events_free(ev, n);
    s->ops->close(s);
out:
    free(dir);
}

static void test_kv(void)
{
    char *dir = case_dir("kv");
    moat_storage_t *s = open_ok(dir);
    if (s == NULL)
        goto out;
    char *v = (char *)"untouched";
    CHECK_INT(s->ops->kv_get(s, "missing", &v), MOAT_ENOT_FOUND);
    CHECK(v == NULL);
    CHECK_INT(s->ops->kv_put(s, "backoff:a.example", "3"), 0);
    CHECK_INT(s->ops->kv_put(s, "backoff:a.example", "4"), 0);
    CHECK_INT(s->ops->kv_put(s, "empty", ""), 0);
    CHECK_INT(s->ops->kv_get(s, "backoff:a.example", &v), 0);
    CHECK_STR(v, "4");
    free(v);
    CHECK_INT(s->ops->kv_get(s, "empty", &v), 0);
    CHECK_STR(v, "");
    free(v);
    /* A NULL value deletes. */
    CHECK_INT(s->ops->kv_put(s, "backoff:a.example", NULL), 0);
    CHECK_INT(s->ops->kv_get(s, "backoff:a.example", &v), MOAT_ENOT_FOUND);
    CHECK_INT(s->ops->kv_put(s, NULL, "x"), MOAT_EINVAL);
    s->ops->close(s);
out:
    free(dir);
}

static void test_transactions(void)
{
    char *dir = case_dir("tx");
    moat_storage_t *s = open_ok(dir);
    if (s == NULL)
        goto out;
    moat_cert_record_t a = sample("a", "a.example"), b = sample("b", "b.example");
    moat_cert_record_t got = {0};
    char *v = NULL;

    CHECK_INT(s->ops->commit(s), MOAT_EINVAL);
    CHECK_INT(s->ops->rollback(s), MOAT_EINVAL);

    /* A rolled-back group leaves nothing, though put_cert and add_event ran inside it. */
    CHECK_INT(s->ops->begin(s), 0);
    CHECK_INT(s->ops->put_cert(s, &a), 0);
    CHECK_INT(s->ops->add_event(s, "issued", "a.example", NULL), 0);
    CHECK_INT(s->ops->kv_put(s, "k", "v"), 0);
    CHECK_INT(s->ops->get_cert(s, "a", &got), 0); /* visible inside */
    moat_cert_record_clear(&got);
    CHECK_INT(s->ops->rollback(s), 0);
    CHECK_INT(s->ops->get_cert(s, "a", &got), MOAT_ENOT_FOUND);
    CHECK_INT(s->ops->kv_get(s, "k", &v), MOAT_ENOT_FOUND);
    moat_event_t *ev = NULL;
    size_t n = 0;
    CHECK_INT(s->ops->list_events(s, 10, &ev, &n), 0);
    CHECK_INT(n, 0);
    moat_events_free(ev, n);

    /* Nested: the inner rollback undoes only its own part. */
    CHECK_INT(s->ops->begin(s), 0);
    CHECK_INT(s->ops->put_cert(s, &a), 0);
    CHECK_INT(s->ops->begin(s), 0);
    CHECK_INT(s->ops->put_cert(s, &b), 0);
    CHECK_INT(s->ops->rollback(s), 0);
    CHECK_INT(s->ops->begin(s), 0);
    CHECK_INT(s->ops->kv_put(s, "k", "inner"), 0);
    CHECK_INT(s->ops->commit(s), 0);
    CHECK_INT(s->ops->commit(s), 0);
    CHECK_INT(s->ops->get_cert(s, "a", &got), 0);
    moat_cert_record_clear(&got);
    CHECK_INT(s->ops->get_cert(s, "b", &got), MOAT_ENOT_FOUND);
    CHECK_INT(s->ops->kv_get(s, "k", &v), 0);
    CHECK_STR(v, "inner");
    free(v);
    CHECK_INT(s->ops->commit(s), MOAT_EINVAL);

    /* An unfinished transaction at close is discarded, not committed. */
    CHECK_INT(s->ops->begin(s), 0);
    CHECK_INT(s->ops->put_cert(s, &b), 0);
    s->ops->close(s);
    s = open_ok(dir);
    if (s != NULL) {
        CHECK_INT(s->ops->get_cert(s, "b", &got), MOAT_ENOT_FOUND);
        CHECK_INT(s->ops->get_cert(s, "a", &got), 0);
        moat_cert_record_clear(&got);
        s->ops->close(s);
    }
out:
    free(dir);
}

/* Open must fail with `want`, mention `needle`, and leave moat.db byte-for-byte unchanged. */
static void expect_refused(const char *dir, int want, const char *needle)
{
    char *db = path_join(dir, "moat.db");
    size_t before_len = 0, after_len = 0;
    char *before = slurp(db, &before_len);
    int mode = file_mode(db);
    moat_storage_t *s = (moat_storage_t *)1;
    char err[512] = "";
    int rc = moat_storage_open_sqlite(dir, &s, err, sizeof err);
    CHECK_INT(rc, want);
    CHECK(s == NULL);
    if (strstr(err, needle) == NULL || strstr(err, db) == NULL)
        fprintf(stderr, "message lacks \"%s\" or the path: %s\n", needle, err);
    CHECK(strstr(err, needle) != NULL);
    CHECK(strstr(err, db) != NULL);
    char *after = slurp(db, &after_len);
    CHECK_INT(file_mode(db), mode); /* not even chmod */
    CHECK(before != NULL && after != NULL);
    CHECK_INT(after_len, before_len);
    CHECK(before && after && memcmp(before, after, before_len) == 0);
    free(before);
    free(after);
    free(db);
}

static void test_newer_schema(void)
{
    char *dir = case_dir("newer");
    moat_storage_t *s = open_ok(dir);
    if (s == NULL)
        goto out;
    s->ops->close(s);
    char *db = path_join(dir, "moat.db");
    raw_exec(db, "PRAGMA user_version = 7");
    expect_refused(dir, MOAT_ESCHEMA, "schema 7, this moat knows 2");
    expect_refused(dir, MOAT_ESCHEMA, "upgrade moat or point --data at another folder");
    CHECK_INT(raw_int(db, "PRAGMA user_version"), 7);
    free(db);
out:
    free(dir);
}

/* The newer version sits only in the -wal file (not yet checkpointed): the file header
 * still says 1, so the check through SQLite must catch it, and must not checkpoint. */
static void test_newer_schema_in_wal(void)
{
    char *dir = case_dir("newer-wal");
    moat_storage_t *s = open_ok(dir);
    if (s == NULL)
        goto out;
    s->ops->close(s);
    char *db = path_join(dir, "moat.db");
    sqlite3 *raw = NULL;
    sqlite3_open(db, &raw);
    int persist = 1;
    sqlite3_file_control(raw, "main", SQLITE_FCNTL_PERSIST_WAL, &persist);
    sqlite3_db_config(raw, SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1, (int *)NULL);
    sqlite3_exec(raw, "PRAGMA user_version = 9", NULL, NULL, NULL);
    sqlite3_close(raw);
    size_t len = 0;
    char *hdr = slurp(db, &len);
    CHECK(hdr != NULL && len >= 100 &&
          hdr[63] == MOAT_STORAGE_SCHEMA_VERSION); /* the header has the current version */
    free(hdr);
    expect_refused(dir, MOAT_ESCHEMA, "schema 9, this moat knows 2");
    free(db);
out:
    free(dir);
}

static void test_corrupt(void)
{
    char *dir = case_dir("corrupt");
    char *db = path_join(dir, "moat.db");
    char junk[4096];
    for (size_t i = 0; i < sizeof junk; i++)
        junk[i] = (char)(i * 7 + 3);
    write_file(db, junk, sizeof junk);
    expect_refused(dir, MOAT_ESTORAGE, "move it aside to start fresh");
    expect_refused(dir, MOAT_ESTORAGE, "not a moat database or is damaged");

    /* A short file and a file with a valid header but a damaged first page. */
    write_file(db, "SQLite format 3", 16);
    expect_refused(dir, MOAT_ESTORAGE, "move it aside");
    free(db);
    free(dir);

    dir = case_dir("corrupt2");
    db = path_join(dir, "moat.db");
    moat_storage_t *s = open_ok(dir);
    if (s != NULL) {
        moat_cert_record_t a = sample("a", "a.example");
        s->ops->put_cert(s, &a);
        s->ops->close(s);
        size_t len = 0;
        char *bytes = slurp(db, &len);
        if (bytes != NULL && len > 200) {
            memset(bytes + 100, 0xff, 60); /* page 1's b-tree header */
            write_file(db, bytes, len);
            expect_refused(dir, MOAT_ESTORAGE, "move it aside");
        }
        free(bytes);
    }
    free(db);
    free(dir);
}

/* Damage in the middle of the file (a table page, not the header): refused at open, before
 * the first write, with the file left byte for byte; and found by check() on an open store. */
static void test_damage_in_the_middle(void)
{
    char *dir = case_dir("middle");
    char *db = path_join(dir, "moat.db");
    moat_storage_t *s = open_ok(dir);
    if (s == NULL)
        goto out;
    /* Enough rows for several pages of the certs table. */
    char id[32], names[600];
    memset(names, 'n', sizeof names - 1);
    names[sizeof names - 1] = 0;
    for (int i = 0; i < 40; i++) {
        snprintf(id, sizeof id, "cert-%02d", i);
        moat_cert_record_t r = sample(id, names);
        CHECK_INT(s->ops->put_cert(s, &r), 0);
    }
    CHECK_INT(s->ops->check(s), 0);
    s->ops->close(s);
    CHECK_INT(raw_int(db, "PRAGMA page_count") >= 6, 1);

    size_t len = 0;
    char *bytes = slurp(db, &len);
    if (bytes == NULL || len < 6 * 4096) {
        CHECK(0);
        free(bytes);
        goto out;
    }
    /* 4 KiB of garbage over the last page: a leaf of the certs table. */
    size_t at = len - 4096;
    for (size_t i = 0; i < 4096; i++)
        bytes[at + i] = (char)(i * 13 + 5);
    write_file(db, bytes, len);
    expect_refused(dir, MOAT_ESTORAGE, "is damaged");
    expect_refused(dir, MOAT_ESTORAGE, "restore it from a backup");
    size_t len2 = 0;
    char *after = slurp(db, &len2);
    CHECK(after != NULL && len2 == len && memcmp(after, bytes, len) == 0); /* untouched */
    free(after);

    /* The same damage found by check() while the store is open (written behind its back). */
    char *good = NULL;
    write_file(db, "", 0);
    unlink(db);
    s = open_ok(dir);
    if (s != NULL) {
        for (int i = 0; i < 40; i++) {
            snprintf(id, sizeof id, "cert-%02d", i);
            moat_cert_record_t r = sample(id, names);
            s->ops->put_cert(s, &r);
        }
        CHECK_INT(s->ops->check(s), 0); /* also moves the WAL into the file */
        good = slurp(db, &len);
        if (good != NULL && len >= 6 * 4096) {
            FILE *f = fopen(db, "r+b");
            fseek(f, (long)(len - 4096), SEEK_SET);
            fwrite(bytes + at, 1, 4096, f);
            fclose(f);
            CHECK_INT(s->ops->check(s), MOAT_ESTORAGE);
            CHECK(strstr(moat_storage_last_error(s), "is damaged") != NULL);
        }
        s->ops->close(s);
    }
    free(good);
    free(bytes);
out:
    free(db);
    free(dir);
}

static void test_foreign_database(void)
{
    char *dir = case_dir("foreign");
    char *db = path_join(dir, "moat.db");
    raw_exec(db, "CREATE TABLE notes(x)");
    chmod(db, 0644);
    expect_refused(dir, MOAT_ESTORAGE, "not a moat database");
    raw_exec(db, "PRAGMA application_id = 1234");
    expect_refused(dir, MOAT_ESTORAGE, "another program");
    free(db);
    free(dir);
}

static void test_migrate_from_v0(void)
{
    /* A zero-byte file is an empty database at schema 0. */
    char *dir = case_dir("v0-empty");
    char *db = path_join(dir, "moat.db");
    write_file(db, "", 0);
    chmod(db, 0644);
    moat_storage_t *s = open_ok(dir);
    if (s != NULL) {
        moat_cert_record_t a = sample("a", "a.example");
        CHECK_INT(s->ops->put_cert(s, &a), 0);
        s->ops->close(s);
    }
    CHECK_INT(raw_int(db, "PRAGMA user_version"), MOAT_STORAGE_SCHEMA_VERSION);
    CHECK_INT(raw_int(db, "SELECT count(*) FROM certs"), 1);
    CHECK_INT(file_mode(db), 0600); /* a loose existing file is tightened */
    free(db);
    free(dir);

    /* A real SQLite file with no tables, as an interrupted first start could leave. */
    dir = case_dir("v0-sqlite");
    db = path_join(dir, "moat.db");
    raw_exec(db, "CREATE TABLE t(x); DROP TABLE t;");
    CHECK_INT(raw_int(db, "PRAGMA user_version"), 0);
    s = open_ok(dir);
    if (s != NULL) {
        CHECK_INT(s->ops->kv_put(s, "k", "v"), 0);
        s->ops->close(s);
    }
    CHECK_INT(raw_int(db, "PRAGMA user_version"), MOAT_STORAGE_SCHEMA_VERSION);
    CHECK_INT(raw_int(db, "SELECT count(*) FROM sqlite_schema WHERE name IN "
                          "('certs', 'events', 'kv')"),
              3);
    free(db);
    free(dir);

    CHECK(moat__storage_migration_sql(0) == NULL);
    CHECK(moat__storage_migration_sql(1) != NULL);
    CHECK(moat__storage_migration_sql(MOAT_STORAGE_SCHEMA_VERSION + 1) == NULL);
}

/* A version 1 store (before leases) moves to version 2 and keeps its records. */
static void test_migrate_from_v1(void)
{
    char *dir = case_dir("v1");
    moat_storage_t *s = open_ok(dir);
    if (s == NULL)
        goto out;
    moat_cert_record_t rec = sample("site:v1.example", "v1.example");
    CHECK_INT(s->ops->put_cert(s, &rec), 0);
    s->ops->close(s);
    char *db = path_join(dir, "moat.db");
    raw_exec(db, "DROP TABLE leases; PRAGMA user_version = 1");
    CHECK_INT(raw_int(db, "PRAGMA user_version"), 1);
    s = open_ok(dir);
    if (s != NULL) {
        CHECK_INT(raw_int(db, "PRAGMA user_version"), 2);
        moat_cert_record_t got = {0};
        CHECK_INT(s->ops->get_cert(s, "site:v1.example", &got), 0);
        moat_cert_record_clear(&got);
        int64_t t = 0;
        CHECK_INT(s->ops->lease_take(s, "x", "o", 10, NULL, &t, NULL), 1);
        s->ops->close(s);
    }
    free(db);
out:
    free(dir);
}

static void test_no_write_access(void)
{
    char err[512] = "";
    moat_storage_t *s = (moat_storage_t *)1;

    /* A data folder below a regular file cannot be created, even by root. */
    char *dir = case_dir("nowrite");
    char *file = path_join(dir, "file");
    write_file(file, "x", 1);
    char *data = path_join(file, "data");
    int rc = moat_storage_open_sqlite(data, &s, err, sizeof err);
    CHECK(rc < 0);
    CHECK(s == NULL);
    CHECK(strstr(err, file) != NULL);
    CHECK(strstr(err, "write access") != NULL);
    CHECK(strstr(err, "--data") != NULL);

    /* The data folder is itself a regular file. */
    s = (moat_storage_t *)1;
    rc = moat_storage_open_sqlite(file, &s, err, sizeof err);
    CHECK_INT(rc, MOAT_EINVAL);
    CHECK(strstr(err, "not a folder") != NULL);

    s = NULL;
    CHECK_INT(moat_storage_open_sqlite("", &s, err, sizeof err), MOAT_EINVAL);
    CHECK_INT(moat_storage_open_sqlite(NULL, &s, NULL, 0), MOAT_EINVAL);

    if (geteuid() == 0) {
        TEST_SKIP("running as root: chmod does not stop root from writing");
    } else {
        char *ro = case_dir("readonly");
        chmod(ro, 0500);
        rc = moat_storage_open_sqlite(ro, &s, err, sizeof err);
        CHECK_INT(rc, MOAT_EPERM);
        CHECK(strstr(err, ro) != NULL);
        CHECK(strstr(err, "write access") != NULL);
        chmod(ro, 0700);
        free(ro);
    }
    free(data);
    free(file);
    free(dir);
}

static void test_kv_list(void)
{
    char *dir = case_dir("kv-list");
    moat_storage_t *s = open_ok(dir);
    if (s == NULL)
        goto out;
    moat_kv_t *rows = NULL;
    size_t n = 99;
    CHECK_INT(s->ops->kv_list(s, "acme-token:", &rows, &n), 0);
    CHECK_INT(n, 0);
    moat_kv_free(rows, n);
    CHECK_INT(s->ops->kv_put(s, "acme-token:b", "kb"), 0);
    CHECK_INT(s->ops->kv_put(s, "acme-token:a", "ka"), 0);
    CHECK_INT(s->ops->kv_put(s, "acme-token;", "not a token (next byte after ':')"), 0);
    CHECK_INT(s->ops->kv_put(s, "acme-token", "shorter than the prefix"), 0);
    CHECK_INT(s->ops->kv_put(s, "acme-tokens", "other"), 0);
    CHECK_INT(s->ops->kv_put(s, "\xff\xff", "high bytes"), 0);
    CHECK_INT(s->ops->kv_list(s, "acme-token:", &rows, &n), 0);
    CHECK_INT(n, 2);
    if (n == 2) {
        CHECK_STR(rows[0].key, "acme-token:a");
        CHECK_STR(rows[0].value, "ka");
        CHECK_STR(rows[1].key, "acme-token:b");
        CHECK(rows[1].updated_at > 1600000000);
    }
    moat_kv_free(rows, n);
    /* A prefix that ends in 0xff bytes has its upper bound computed past them. */
    CHECK_INT(s->ops->kv_list(s, "\xff", &rows, &n), 0);
    CHECK_INT(n, 1);
    moat_kv_free(rows, n);
    CHECK_INT(s->ops->kv_list(s, "", &rows, &n), 0);
    CHECK_INT(n, 6);
    moat_kv_free(rows, n);
    CHECK_INT(s->ops->kv_put(s, "acme-token:a", NULL), 0);
    CHECK_INT(s->ops->kv_list(s, "acme-token:", &rows, &n), 0);
    CHECK_INT(n, 1);
    moat_kv_free(rows, n);
    CHECK_INT(s->ops->kv_list(s, NULL, &rows, &n), MOAT_EINVAL);
    s->ops->close(s);
out:
    free(dir);
}

/* Secrets sealed at rest: what lands in the file, a wrong key, a store written before the key. */
static void test_encrypted(void)
{
    char *dir = case_dir("enc");
    char *key = path_join(root, "enc.key");
    char *db = path_join(dir, "moat.db");
    moat_storage_t *plain = open_ok(dir), *s = NULL;
    char err[512] = "";
    if (plain == NULL)
        goto out;
    /* Written before there was a key: read as it is through the wrapper. */
    moat_cert_record_t old = sample("site:old.example", "old.example");
    CHECK_INT(plain->ops->put_cert(plain, &old), 0);
    CHECK_INT(plain->ops->kv_put(plain, "k-old", "plain"), 0);
    mode_t um = umask(0);
    CHECK_INT(moat_storage_encrypt(plain, key, &s, err, sizeof err), 0);
    umask(um);
    CHECK_INT(file_mode(key), 0600);
    if (s == NULL) {
        plain->ops->close(plain);
        goto out;
    }
    moat_cert_record_t got = {0};
    CHECK_INT(s->ops->get_cert(s, "site:old.example", &got), 0);
    CHECK_STR(got.key_pem, old.key_pem);
    moat_cert_record_clear(&got);
    char *v = NULL;
    CHECK_INT(s->ops->kv_get(s, "k-old", &v), 0);
    CHECK_STR(v, "plain");
    free(v);

    moat_cert_record_t rec = sample("site:new.example", "new.example");
    CHECK_INT(s->ops->put_cert(s, &rec), 0);
    CHECK_INT(s->ops->kv_put(s, "acme-account-key:x", "-----BEGIN PRIVATE KEY-----"), 0);
    CHECK_INT(s->ops->get_cert(s, "site:new.example", &got), 0);
    CHECK_STR(got.key_pem, rec.key_pem);
    CHECK_STR(got.cert_pem, rec.cert_pem);
    moat_cert_record_clear(&got);
    moat_kv_t *rows = NULL;
    size_t n = 0;
    CHECK_INT(s->ops->kv_list(s, "acme-account-key:", &rows, &n), 0);
    CHECK(n == 1 && strcmp(rows[0].value, "-----BEGIN PRIVATE KEY-----") == 0);
    moat_kv_free(rows, n);
    s->ops->close(s);
    /* In the file: sealed, and the certificate itself readable. */
    sqlite3 *raw = NULL;
    sqlite3_stmt *st = NULL;
    sqlite3_open_v2(db, &raw, SQLITE_OPEN_READONLY, NULL);
    if (sqlite3_prepare_v2(raw, "SELECT key_pem, cert_pem FROM certs WHERE id = 'site:new.example'",
                           -1, &st, NULL) == SQLITE_OK &&
        sqlite3_step(st) == SQLITE_ROW) {
        CHECK(strncmp((const char *)sqlite3_column_text(st, 0), "moat-enc:v1:", 12) == 0);
        CHECK(strstr((const char *)sqlite3_column_text(st, 0), "BBBB") == NULL);
        CHECK_STR((const char *)sqlite3_column_text(st, 1), rec.cert_pem);
    } else {
        CHECK(!"the record is in the file");
    }
    sqlite3_finalize(st);
    sqlite3_close(raw);
    CHECK(raw_int(db, "SELECT count(*) FROM kv WHERE key = 'acme-account-key:x'"
                      " AND value LIKE 'moat-enc:v1:%'") == 1);
    /* A sealed value moved to another row does not open there. */
    raw_exec(db, "UPDATE kv SET value = (SELECT value FROM kv WHERE key = 'acme-account-key:x')"
                 " WHERE key = 'k-old'");

    /* Another key: the secret does not open, and the message names the key file. */
    char *other = path_join(root, "other.key");
    plain = open_ok(dir);
    if (plain != NULL && moat_storage_encrypt(plain, other, &s, err, sizeof err) == 0) {
        CHECK_INT(s->ops->get_cert(s, "site:new.example", &got), MOAT_ECRYPTO);
        CHECK(strstr(moat_storage_last_error(s), "other.key") != NULL);
        CHECK_INT(s->ops->get_cert(s, "site:old.example", &got), 0); /* not sealed */
        moat_cert_record_clear(&got);
        s->ops->close(s);
    }
    plain = open_ok(dir);
    if (plain != NULL && moat_storage_encrypt(plain, key, &s, err, sizeof err) == 0) {
        CHECK_INT(s->ops->kv_get(s, "k-old", &v), MOAT_ECRYPTO);
        CHECK_INT(s->ops->kv_get(s, "acme-account-key:x", &v), 0);
        free(v);
        s->ops->close(s);
    }
    /* Not a key file. */
    write_file(other, "short\n", 6);
    plain = open_ok(dir);
    if (plain != NULL) {
        CHECK_INT(moat_storage_encrypt(plain, other, &s, err, sizeof err), MOAT_EINVAL);
        CHECK(strstr(err, "not a moat storage key") != NULL);
        plain->ops->close(plain);
    }
    free(other);
out:
    free(db);
    free(key);
    free(dir);
}

/* Leases with fencing tokens on the store's clock, and the fenced certificate write. */
static void test_leases(void)
{
    char *dir = case_dir("leases");
    moat_storage_t *s = open_ok(dir);
    if (s == NULL)
        goto out;
    int64_t a = 0, b = 0, c = 0;
    char *holder = NULL;
    CHECK_INT(s->ops->lease_take(s, "acme:x", "A", 1, NULL, &a, &holder), 1);
    CHECK(a > 0 && holder == NULL);
    CHECK_INT(s->ops->lease_take(s, "acme:x", "B", 30, NULL, &b, &holder), 0);
    CHECK_STR(holder, "A");
    free(holder);
    CHECK_INT(s->ops->lease_renew(s, "acme:x", a, 1), 0);
    /* Another name is another lease. */
    CHECK_INT(s->ops->lease_take(s, "acme:y", "B", 30, NULL, &c, NULL), 1);
    CHECK(c > a);

    /* A's lease runs out (the store's clock, whole seconds for SQLite): B takes it over with a
     * larger token, and A's renewal and late write are refused. */
    if (enc_key[0] == '\0') {
        struct timespec ts = {2, 200 * 1000 * 1000};
        nanosleep(&ts, NULL);
        CHECK_INT(s->ops->lease_take(s, "acme:x", "B", 30, NULL, &b, NULL), 1);
    } else {
        /* Through the wrapper the waiting adds nothing: B takes it from a "dead" A. */
        CHECK_INT(s->ops->lease_take(s, "acme:x", "B", 30, "A", &b, NULL), 1);
    }
    CHECK(b > c);
    CHECK_INT(s->ops->lease_renew(s, "acme:x", a, 30), MOAT_ENOT_FOUND);
    moat_cert_record_t rec = sample("acme:x", "x.example");
    rec.not_after = 2000000000;
    CHECK_INT(s->ops->put_cert_fenced(s, &rec, "acme:x", a), MOAT_EPERM);
    CHECK(strstr(moat_storage_last_error(s), "lost") != NULL);
    moat_cert_record_t got = {0};
    CHECK_INT(s->ops->get_cert(s, "acme:x", &got), MOAT_ENOT_FOUND);
    CHECK_INT(s->ops->put_cert_fenced(s, &rec, "acme:x", b), 0);
    /* Never an older certificate over a newer one; the same one again is fine. */
    moat_cert_record_t older = sample("acme:x", "x.example");
    older.not_after = 1900000000;
    CHECK_INT(s->ops->put_cert_fenced(s, &older, "acme:x", b), MOAT_EEXISTS);
    CHECK_INT(s->ops->put_cert_fenced(s, &rec, "acme:x", b), 0);
    CHECK_INT(s->ops->get_cert(s, "acme:x", &got), 0);
    CHECK_INT(got.not_after, 2000000000);
    moat_cert_record_clear(&got);
    /* Inside a transaction that is rolled back, a fenced write leaves nothing. */
    moat_cert_record_t newer = sample("acme:x", "x.example");
    newer.not_after = 2100000000;
    CHECK_INT(s->ops->begin(s), 0);
    CHECK_INT(s->ops->put_cert_fenced(s, &newer, "acme:x", b), 0);
    CHECK_INT(s->ops->rollback(s), 0);
    CHECK_INT(s->ops->get_cert(s, "acme:x", &got), 0);
    CHECK_INT(got.not_after, 2000000000);
    moat_cert_record_clear(&got);

    /* Released: free at once. A retake by the same owner gets a new token. */
    CHECK_INT(s->ops->lease_release(s, "acme:x", a), 0); /* not A's any more: no effect */
    CHECK_INT(s->ops->lease_take(s, "acme:x", "C", 30, NULL, &c, NULL), 0);
    CHECK_INT(s->ops->lease_release(s, "acme:x", b), 0);
    CHECK_INT(s->ops->lease_take(s, "acme:x", "C", 30, NULL, &c, NULL), 1);
    int64_t c2 = 0;
    CHECK_INT(s->ops->lease_take(s, "acme:x", "C", 30, NULL, &c2, NULL), 1);
    CHECK(c2 > c);
    /* Taken from a holder known to be dead. */
    CHECK_INT(s->ops->lease_take(s, "acme:x", "D", 30, "C", &b, NULL), 1);
    CHECK(b > c2);
    CHECK_INT(s->ops->lease_take(s, "acme:x", "E", 0, NULL, &b, NULL), MOAT_EINVAL);
    s->ops->close(s);
out:
    free(dir);
}

/* moat storage copy: from a SQLite store into the backend under test, twice. */
static void test_copy(void)
{
    char *src_dir = path_join(root, enc_key[0] ? "copy-src-sealed" : "copy-src");
    char *dir = case_dir("copy-dst");
    moat_storage_t *src = NULL, *dst = open_ok(dir);
    char err[512] = "";
    mkdir(src_dir, 0700);
    if (moat_storage_open_sqlite(src_dir, &src, err, sizeof err) != 0 || dst == NULL)
        goto out;
    moat_cert_record_t a = sample("acme:a.example", "a.example"),
                       b = sample("acme:b.example", "b.example");
    CHECK_INT(src->ops->put_cert(src, &a), 0);
    CHECK_INT(src->ops->put_cert(src, &b), 0);
    CHECK_INT(src->ops->kv_put(src, "acme-account-key:x", "KEY"), 0);
    CHECK_INT(src->ops->kv_put(src, "acme-instance:h/1/2", "999"), 0); /* not copied */
    /* The destination already has a newer b. */
    moat_cert_record_t newer = sample("acme:b.example", "b.example");
    newer.not_after = 1900000000;
    CHECK_INT(dst->ops->put_cert(dst, &newer), 0);
    moat_storage_copy_stats_t st;
    CHECK_INT(moat_storage_copy(src, dst, &st, err, sizeof err), 0);
    CHECK_INT(st.certs_copied, 1);
    CHECK_INT(st.certs_newer_kept, 1);
    CHECK_INT(st.settings_copied, 1);
    moat_cert_record_t got = {0};
    CHECK_INT(dst->ops->get_cert(dst, "acme:b.example", &got), 0);
    CHECK_INT(got.not_after, 1900000000);
    moat_cert_record_clear(&got);
    CHECK_INT(dst->ops->get_cert(dst, "acme:a.example", &got), 0);
    CHECK_STR(got.key_pem, a.key_pem);
    moat_cert_record_clear(&got);
    char *v = NULL;
    CHECK_INT(dst->ops->kv_get(dst, "acme-instance:h/1/2", &v), MOAT_ENOT_FOUND);
    /* Again: nothing to do. */
    CHECK_INT(moat_storage_copy(src, dst, &st, err, sizeof err), 0);
    CHECK_INT(st.certs_copied + st.settings_copied, 0);
    CHECK_INT(st.certs_same, 1);
    CHECK_INT(st.settings_same, 1);
out:
    if (src)
        src->ops->close(src);
    if (dst)
        dst->ops->close(dst);
    free(dir);
    free(src_dir);
}

static void shared_cases(void)
{
    test_certs();
    test_events();
    test_kv();
    test_kv_list();
    test_transactions();
    test_leases();
    test_copy();
    if (pg_url[0] == '\0') {
        /* SQLite pushes nothing: processes on one file see changes through their polls. */
        char *dir = case_dir("watch");
        moat_storage_t *s = open_ok(dir);
        if (s != NULL) {
            CHECK_INT(s->ops->watch_fd(s), -1);
            CHECK_INT(s->ops->watch_drain(s, NULL, NULL), MOAT_ECLOSED);
            s->ops->close(s);
        }
        free(dir);
    }
}

static void postgres_cases(void)
{
    if (pg_start() != 0)
        return;
    shared_cases();
    /* The shared cases once more through the encrypting wrapper. */
    snprintf(enc_key, sizeof enc_key, "%s/shared-pg.key", root);
    shared_cases();
    enc_key[0] = '\0';
    pg_stop();
}

int main(void)
{
    if (fixture_begin() != 0)
        return 1;
    test_create_modes_reopen();
    shared_cases();
    test_newer_schema();
    test_newer_schema_in_wal();
    test_corrupt();
    test_damage_in_the_middle();
    test_foreign_database();
    test_migrate_from_v0();
    test_migrate_from_v1();
    test_no_write_access();
    test_encrypted();
    /* The shared cases again through the encrypting wrapper. */
    snprintf(enc_key, sizeof enc_key, "%s/shared.key", root);
    shared_cases();
    enc_key[0] = '\0';
    postgres_cases();
    fixture_end();
    return test_summary("storage");
}
