/* Unit tests for the SQLite storage backend (storage/sqlite.c): file modes, persistence,
 * records, events, kv, transactions, and refusing files moat must not touch. */
#include "moat/storage.h"
#include "test.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

static char root[64];

static char *path_join(const char *a, const char *b)
{
    size_t n = strlen(a) + strlen(b) + 2;
    char *p = malloc(n);
    snprintf(p, n, "%s/%s", a, b);
    return p;
}

/* A fresh empty folder under the test root for one case. */
static char *case_dir(const char *name)
{
    char *d = path_join(root, name);
    mkdir(d, 0700);
    return d;
}

static int rm_cb(const char *p, const struct stat *st, int type, struct FTW *ftw)
{
    (void)st;
    (void)type;
    (void)ftw;
    return remove(p);
}

static char *slurp(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    *len = fread(buf, 1, (size_t)n, f);
    fclose(f);
    return buf;
}

static void write_file(const char *path, const void *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    fwrite(data, 1, len, f);
    fclose(f);
}

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

static moat_storage_t *open_ok(const char *dir)
{
    moat_storage_t *s = NULL;
    char err[512] = "";
    int rc = moat_storage_open_sqlite(dir, &s, err, sizeof err);
    if (rc != 0)
        fprintf(stderr, "open %s: %s (%s)\n", dir, moat_strerror(rc), err);
    CHECK_INT(rc, 0);
    return s;
}

static moat_cert_record_t sample(const char *id, const char *names)
{
    return (moat_cert_record_t){
        .id = (char *)id,
        .names = (char *)names,
        .issuer = "moat internal CA",
        .source = "internal",
        .not_before = 1700000000,
        .not_after = 1800000000,
        .cert_pem = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        .key_pem = "-----BEGIN PRIVATE KEY-----\nBBBB\n-----END PRIVATE KEY-----\n",
        .updated_at = 0,
    };
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
    expect_refused(dir, MOAT_ESCHEMA, "schema 7, this moat knows 1");
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
    CHECK(hdr != NULL && len >= 100 && hdr[63] == 1); /* header still at version 1 */
    free(hdr);
    expect_refused(dir, MOAT_ESCHEMA, "schema 9, this moat knows 1");
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

int main(void)
{
    snprintf(root, sizeof root, "/tmp/moat-storage-test-XXXXXX");
    if (mkdtemp(root) == NULL) {
        perror("mkdtemp");
        return 1;
    }
    test_create_modes_reopen();
    test_certs();
    test_events();
    test_kv();
    test_kv_list();
    test_transactions();
    test_newer_schema();
    test_newer_schema_in_wal();
    test_corrupt();
    test_damage_in_the_middle();
    test_foreign_database();
    test_migrate_from_v0();
    test_no_write_access();
    nftw(root, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
    return test_summary("storage");
}
