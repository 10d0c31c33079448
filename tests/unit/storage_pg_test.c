/* Unit tests for PostgreSQL's own side of the store (storage/postgres.c, storage/pgconn.c)
 * against a real PostgreSQL 15 the test starts itself (storage_fixture.h): URLs, logging in
 * (wrong password, wrong CA, no TLS, a server that answers nonsense), channel binding, the
 * schema version, an outage and the notifications. The cases every backend shares are in
 * storage_test.c. Without the PostgreSQL binaries these cases are skipped, not passed. */
#include "moat/pgconn.h"
#include "storage_fixture.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>

static int open_pg(const char *url, moat_storage_t **s, char *err, size_t cap)
{
    *s = NULL;
    err[0] = '\0';
    return moat_storage_open_postgres(url, s, err, cap);
}

static void expect_pg_refused(const char *url, int want, const char *needle)
{
    moat_storage_t *s = NULL;
    char err[1024];
    int rc = open_pg(url, &s, err, sizeof err);
    CHECK_INT(rc, want);
    CHECK(s == NULL);
    if (strstr(err, needle) == NULL)
        fprintf(stderr, "message lacks \"%s\": %s\n", needle, err);
    CHECK(strstr(err, needle) != NULL);
}

static void test_pg_url(void)
{
    moat_pg_params_t p;
    char err[512];
    setenv("MOAT_STORAGE_PASSWORD", "from-env", 1);
    CHECK_INT(moat_pg_params_parse("postgres://u%40x:p%3Aw@[::1]:6543/d%20b?sslmode=require"
                                   "&sslrootcert=%2Ftmp%2Fca.pem&connect_timeout=5",
                                   &p, err, sizeof err),
              0);
    CHECK_STR(p.user, "u@x");
    CHECK_STR(p.password, "p:w");
    CHECK_STR(p.host, "::1");
    CHECK_INT(p.port, 6543);
    CHECK_STR(p.dbname, "d b");
    CHECK_INT(p.sslmode, MOAT_PG_SSL_REQUIRE);
    CHECK_STR(p.sslrootcert, "/tmp/ca.pem");
    CHECK_INT(p.timeout_ms, 5000);
    moat_pg_params_clear(&p);
    CHECK_INT(moat_pg_params_parse("postgresql://moat@db.example/moat", &p, err, sizeof err), 0);
    CHECK_INT(p.port, 5432);
    CHECK_INT(p.sslmode, MOAT_PG_SSL_VERIFY_FULL); /* the safe default */
    CHECK_STR(p.password, "from-env");
    moat_pg_params_clear(&p);
    unsetenv("MOAT_STORAGE_PASSWORD");

    /* A PGPASSFILE line, with wildcards and escapes. */
    char *pass = path_join(root, "pgpass");
    const char *lines = "# comment\nother:*:*:*:no\n*:5432:moat:moat:se\\:cret\n";
    write_file(pass, lines, strlen(lines));
    setenv("PGPASSFILE", pass, 1);
    CHECK_INT(moat_pg_params_parse("postgres://moat@h/moat", &p, err, sizeof err), 0);
    CHECK_STR(p.password, "se:cret");
    moat_pg_params_clear(&p);
    unsetenv("PGPASSFILE");
    free(pass);

    const char *bad[] = {"mysql://x@h/d",
                         "postgres://h/d",
                         "postgres://u@h:99999/d",
                         "postgres://u@h",
                         "postgres://u@h/d?sslmode=prefer",
                         "postgres://u@h/d?nope=1",
                         "postgres://u%zz@h/d",
                         "postgres://u@[::1/d"};
    for (size_t i = 0; i < MOAT_ARRAY_LEN(bad); i++) {
        CHECK_INT(moat_pg_params_parse(bad[i], &p, err, sizeof err), MOAT_EINVAL);
        CHECK(strstr(err, "postgres://USER") != NULL);
    }
    moat_storage_t *s = NULL;
    CHECK_INT(moat_storage_open("mysql://x", root, NULL, &s, err, sizeof err), MOAT_EINVAL);
    CHECK(strstr(err, "sqlite:FOLDER") != NULL);
    CHECK(moat_storage_is_postgres("postgres://a@b/c") && !moat_storage_is_postgres("sqlite:x"));
}

static int64_t ms_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* A fake server for one connection: reads what the client sends first (the TLS request, or
 * the startup message with sslmode=disable), answers `reply` (NULL: nothing at all), and
 * waits for the client to hang up. */
typedef struct {
    int lfd;
    const char *reply;
    size_t len;
} fake_t;

static void *fake_server(void *arg)
{
    fake_t *f = arg;
    int fd = accept(f->lfd, NULL, NULL);
    if (fd >= 0) {
        char req[512];
        struct timeval tv = {5, 0};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        if (recv(fd, req, sizeof req, 0) > 0 && f->reply != NULL &&
            send(fd, f->reply, f->len, MSG_NOSIGNAL) == (ssize_t)f->len)
            recv(fd, req, 1, 0); /* until the client hangs up */
        else if (f->reply == NULL)
            recv(fd, req, 1, 0);
        close(fd);
    }
    return NULL;
}

/* Open against a fake server answering `reply`: the code and the sentence. */
static void expect_fake(const char *opts, const char *reply, size_t len, int want,
                        const char *needle)
{
    fake_t f = {socket(AF_INET, SOCK_STREAM, 0), reply, len};
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    CHECK(bind(f.lfd, (struct sockaddr *)&a, sizeof a) == 0 && listen(f.lfd, 1) == 0);
    getsockname(f.lfd, (struct sockaddr *)&a, &al);
    pthread_t th;
    pthread_create(&th, NULL, fake_server, &f);
    char url[300];
    snprintf(url, sizeof url, "postgres://moat:pw@127.0.0.1:%d/moat?%s", ntohs(a.sin_port), opts);
    expect_pg_refused(url, want, needle);
    pthread_join(th, NULL);
    close(f.lfd);
}

static void test_pg_login_errors(void)
{
    char url[600], opts[400];
    snprintf(opts, sizeof opts, "sslmode=verify-full&sslrootcert=%s/ca.pem", pg_dir);

    pg_url_with(url, sizeof url, "moat:wrong-password", opts);
    expect_pg_refused(url, MOAT_EPERM, "password is wrong");
    expect_pg_refused(url, MOAT_EPERM, "127.0.0.1");

    char other[400];
    snprintf(other, sizeof other, "sslmode=verify-full&sslrootcert=%s/other-ca.pem", pg_dir);
    pg_url_with(url, sizeof url, "moat:moat-test-pw", other);
    expect_pg_refused(url, MOAT_ETLS, "certificate is not trusted");

    /* The certificate names 127.0.0.1 and localhost, not 127.0.0.2, where the same server
     * listens too: verify-full refuses it, require (encrypted, not verified) lets it in. */
    char *colon = NULL;
    pg_url_with(url, sizeof url, "moat:moat-test-pw", opts);
    colon = strstr(url, "127.0.0.1");
    if (colon != NULL) {
        char wrong[700];
        snprintf(wrong, sizeof wrong, "%.*s127.0.0.2%s", (int)(colon - url), url, colon + 9);
        expect_pg_refused(wrong, MOAT_ETLS, "names host 127.0.0.2");
        char *q = strchr(wrong, '?');
        if (q != NULL) {
            snprintf(q, sizeof wrong - (size_t)(q - wrong), "?sslmode=require");
            moat_storage_t *s = NULL;
            char err[1024];
            CHECK_INT(open_pg(wrong, &s, err, sizeof err), 0);
            if (s != NULL)
                s->ops->close(s);
        }
    }

    /* verify-ca checks the chain but not the name; channel_binding=require is met by a
     * PostgreSQL server over TLS, and cannot be without TLS. */
    {
        char vca[700];
        snprintf(vca, sizeof vca, "sslmode=verify-ca&sslrootcert=%s/ca.pem&channel_binding=require",
                 pg_dir);
        pg_url_with(url, sizeof url, "moat:moat-test-pw", vca);
        char *host = strstr(url, "127.0.0.1");
        if (host != NULL)
            host[8] = '2'; /* 127.0.0.2: not in the certificate, fine for verify-ca */
        moat_storage_t *s = NULL;
        char e2[1024];
        CHECK_INT(open_pg(url, &s, e2, sizeof e2), 0);
        if (s != NULL)
            s->ops->close(s);
        expect_fake("sslmode=disable&channel_binding=require",
                    "R\0\0\0\x17\0\0\0\x0aSCRAM-SHA-256\0\0", 24, MOAT_EPERM,
                    "channel_binding=require, but the server does not offer");
        snprintf(vca, sizeof vca, "sslmode=verify-ca&sslrootcert=%s/other-ca.pem", pg_dir);
        pg_url_with(url, sizeof url, "moat:moat-test-pw", vca);
        expect_pg_refused(url, MOAT_ETLS, "certificate is not trusted");
    }

    /* Without TLS the server's pg_hba.conf (hostssl only) refuses the login. */
    pg_url_with(url, sizeof url, "moat:moat-test-pw", "sslmode=disable");
    expect_pg_refused(url, MOAT_EPERM, "pg_hba.conf");

    /* A server that does not speak TLS at all. */
    expect_fake("sslmode=require", "N", 1, MOAT_ETLS, "does not accept TLS");
    /* Something else on the port, a server that never answers, one that wants MD5. */
    expect_fake("sslmode=require", "HTTP/1.1 400 Bad Request\r\n\r\n", 28, MOAT_EPARSE,
                "is this a PostgreSQL server?");
    int64_t t0 = ms_now();
    expect_fake("sslmode=require&connect_timeout=1", NULL, 0, MOAT_ETIMEOUT, "no answer within");
    CHECK(ms_now() - t0 < 2500);
    expect_fake("sslmode=disable", "R\0\0\0\x0c\0\0\0\x05salt", 13, MOAT_EPERM,
                "moat only logs in with SCRAM-SHA-256");
    expect_fake("sslmode=disable", "R\0\0\0\x15\0\0\0\x0aSCRAM-SHA-1\0\0", 22, MOAT_EPERM,
                "no SASL mechanism moat knows");

    /* Nothing listening (a port just given back): a sentence, within the deadline. */
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    CHECK(bind(lfd, (struct sockaddr *)&a, sizeof a) == 0);
    getsockname(lfd, (struct sockaddr *)&a, &al);
    close(lfd);
    snprintf(url, sizeof url, "postgres://moat:pw@127.0.0.1:%d/moat?connect_timeout=1",
             ntohs(a.sin_port));
    expect_pg_refused(url, MOAT_EIO, "is PostgreSQL running");
}

static void test_pg_channel_binding(void)
{
    moat_pg_params_t p;
    char err[1024];
    CHECK_INT(moat_pg_params_parse(pg_url, &p, err, sizeof err), 0);
    moat_pgconn_t *c = NULL;
    CHECK_INT(moat_pgconn_open(&p, &c, err, sizeof err), 0);
    if (c != NULL) {
        /* PostgreSQL offers SCRAM-SHA-256-PLUS over TLS: moat must have taken it. */
        CHECK_INT(moat_pgconn_channel_bound(c), 1);
        moat_pg_result_t r;
        const char *vals[] = {"a'b", NULL};
        CHECK_INT(moat_pgconn_exec(c, "SELECT $1::text, $2::text, 1 + 1", 2, vals, NULL, NULL, &r),
                  0);
        CHECK_INT(r.nrows, 1);
        CHECK_STR(moat_pg_cell(&r, 0, 0), "a'b");
        CHECK(moat_pg_cell(&r, 0, 1) == NULL);
        CHECK_STR(moat_pg_cell(&r, 0, 2), "2");
        moat_pg_result_clear(&r);
        /* A statement the server refuses leaves the connection usable, with a sentence. */
        CHECK_INT(moat_pgconn_exec(c, "SELECT * FROM no_such_table", 0, NULL, NULL, NULL, NULL),
                  MOAT_ESTORAGE);
        CHECK_STR(moat_pgconn_sqlstate(c), "42P01");
        CHECK(strstr(moat_pgconn_error(c), "no_such_table") != NULL);
        CHECK_INT(moat_pgconn_broken(c), 0);
        CHECK_INT(moat_pgconn_exec(c, "SELECT 1", 0, NULL, NULL, NULL, NULL), 0);
        /* Two statements in one are refused by the extended protocol itself. */
        CHECK_INT(moat_pgconn_exec(c, "SELECT 1; SELECT 2", 0, NULL, NULL, NULL, NULL),
                  MOAT_ESTORAGE);
        moat_pgconn_free(c);
    }
    moat_pg_params_clear(&p);
}

static void test_pg_schema(void)
{
    char *dir = case_dir("pg-schema");
    moat_storage_t *a = open_ok(dir), *b = open_ok(dir);
    if (a != NULL && b != NULL) {
        CHECK_INT(a->ops->check(a), 0);
        CHECK_INT(pg_sql("UPDATE moat.schema_version SET version = 7"), 0);
        CHECK_INT(b->ops->check(b), MOAT_ESTORAGE);
        CHECK(strstr(moat_storage_last_error(b), "version 7") != NULL);
        expect_pg_refused(pg_url, MOAT_ESCHEMA, "schema 7, this moat knows 2");
        expect_pg_refused(pg_url, MOAT_ESCHEMA, "upgrade moat");
        /* A connection that comes back to a newer schema refuses to go on with it. */
        CHECK_INT(pg_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                         " WHERE usename = 'moat'"),
                  0);
        char *v = NULL;
        int rc = 0;
        for (int i = 0; i < 40 && rc != MOAT_ESCHEMA; i++) {
            rc = a->ops->kv_get(a, "x", &v);
            if (rc != MOAT_ESCHEMA) {
                struct timespec ts = {0, 100 * 1000 * 1000};
                nanosleep(&ts, NULL);
            }
        }
        CHECK_INT(rc, MOAT_ESCHEMA);
        CHECK(strstr(moat_storage_last_error(a), "newer moat") != NULL);
        CHECK_INT(pg_sql("UPDATE moat.schema_version SET version = 2"), 0);
        rc = -1;
        for (int i = 0; i < 60 && rc != 0; i++) { /* back after its backoff */
            rc = a->ops->check(a);
            if (rc != 0) {
                struct timespec ts = {0, 100 * 1000 * 1000};
                nanosleep(&ts, NULL);
            }
        }
        CHECK_INT(rc, 0);
        /* From version 1 (before leases): moved forward, records kept. */
        moat_cert_record_t rec = sample("site:v1.example", "v1.example");
        CHECK_INT(a->ops->put_cert(a, &rec), 0);
        CHECK_INT(
            pg_sql("DROP TABLE moat.leases; DROP SEQUENCE moat.lease_token;"
                   " DROP TRIGGER certs_notify ON moat.certs; DROP FUNCTION moat.notify_cert();"
                   " UPDATE moat.schema_version SET version = 1"),
            0);
        moat_storage_t *c = open_ok(dir);
        if (c != NULL) {
            CHECK_INT(c->ops->check(c), 0);
            moat_cert_record_t got = {0};
            CHECK_INT(c->ops->get_cert(c, "site:v1.example", &got), 0);
            moat_cert_record_clear(&got);
            int64_t t = 0;
            CHECK_INT(c->ops->lease_take(c, "x", "o", 10, NULL, &t, NULL), 1);
            c->ops->close(c);
        }
    }
    if (a)
        a->ops->close(a);
    if (b)
        b->ops->close(b);
    free(dir);
}

/* The server goes away: calls fail with a sentence, quickly after the first, and work again
 * once it is back (after the backoff). */
static void test_pg_outage(void)
{
    char *dir = case_dir("pg-outage");
    moat_storage_t *s = open_ok(dir);
    char args[300];
    if (s == NULL)
        goto out;
    CHECK_INT(s->ops->kv_put(s, "k", "before"), 0);
    snprintf(args, sizeof args, "pause %s", pg_dir);
    CHECK_INT(pg_script(args), 0);
    char *v = NULL;
    int64_t t0 = ms_now();
    CHECK_INT(s->ops->kv_get(s, "k", &v), MOAT_ESTORAGE);
    CHECK(strstr(moat_storage_last_error(s), "127.0.0.1") != NULL);
    int64_t t1 = ms_now();
    CHECK_INT(s->ops->kv_get(s, "k", &v), MOAT_ESTORAGE);
    CHECK(strstr(moat_storage_last_error(s), "unreachable") != NULL);
    CHECK(ms_now() - t1 < 100); /* no connect attempt inside the backoff */
    CHECK(t1 - t0 < 3500);
    /* A transaction lost with the connection stays failed until rolled back. */
    CHECK_INT(s->ops->begin(s), MOAT_ESTORAGE);
    snprintf(args, sizeof args, "resume %s", pg_dir);
    CHECK_INT(pg_script(args), 0);
    int rc = -1;
    for (int i = 0; i < 40 && rc != 0; i++) { /* the backoff is 1 s, then 2 s */
        rc = s->ops->kv_get(s, "k", &v);
        if (rc != 0) {
            struct timespec ts = {0, 100 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
    }
    if (rc != 0)
        fprintf(stderr, "after the outage: %s\n", moat_storage_last_error(s));
    CHECK_INT(rc, 0);
    CHECK_STR(v, "before");
    free(v);
    /* Inside a transaction, the connection breaks: the transaction is gone, the next one
     * works once the server is back. */
    CHECK_INT(s->ops->begin(s), 0);
    CHECK_INT(s->ops->kv_put(s, "k", "lost"), 0);
    snprintf(args, sizeof args, "pause %s", pg_dir);
    CHECK_INT(pg_script(args), 0);
    CHECK_INT(s->ops->kv_put(s, "k2", "x"), MOAT_ESTORAGE);
    CHECK_INT(s->ops->commit(s), MOAT_ESTORAGE);
    CHECK(strstr(moat_storage_last_error(s), "inside a transaction") != NULL);
    CHECK_INT(s->ops->rollback(s), 0);
    snprintf(args, sizeof args, "resume %s", pg_dir);
    CHECK_INT(pg_script(args), 0);
    rc = -1;
    for (int i = 0; i < 60 && rc != 0; i++) {
        rc = s->ops->kv_get(s, "k", &v);
        if (rc != 0) {
            struct timespec ts = {0, 100 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
    }
    CHECK_INT(rc, 0);
    CHECK_STR(v, "before");
    free(v);
    s->ops->close(s);
out:
    free(dir);
}

static void record_news(void *arg, const char *what)
{
    char *got = arg;
    size_t n = strlen(got);
    snprintf(got + n, 512 - n, "%s;", what);
}

static int wait_readable(int fd, int ms)
{
    struct pollfd p = {.fd = fd, .events = POLLIN};
    return poll(&p, 1, ms) == 1;
}

/* A certificate stored by one instance is news for another within moments (NOTIFY on commit);
 * its own writes are not news to itself; a broken watch comes back with "resync". */
static void test_pg_watch(void)
{
    char *dir = case_dir("pg-watch");
    moat_storage_t *a = open_ok(dir), *b = open_ok(dir);
    char got[512] = "";
    if (a == NULL || b == NULL)
        goto out;
    int fd = b->ops->watch_fd(b);
    CHECK(fd >= 0);
    CHECK_INT(b->ops->watch_fd(b), fd); /* the same watch while it works */
    moat_cert_record_t rec = sample("acme:w.example", "w.example");
    CHECK_INT(a->ops->put_cert(a, &rec), 0);
    CHECK(wait_readable(fd, 2000));
    CHECK_INT(b->ops->watch_drain(b, record_news, got), 0);
    CHECK_STR(got, "cert:acme:w.example;");
    /* Not before commit, and once per write. */
    got[0] = '\0';
    CHECK_INT(a->ops->begin(a), 0);
    CHECK_INT(a->ops->put_cert(a, &rec), 0);
    CHECK(!wait_readable(fd, 200));
    CHECK_INT(a->ops->commit(a), 0);
    CHECK(wait_readable(fd, 2000));
    CHECK_INT(b->ops->watch_drain(b, record_news, got), 0);
    CHECK_STR(got, "cert:acme:w.example;");
    /* B's own write is not news to B. */
    got[0] = '\0';
    CHECK_INT(b->ops->put_cert(b, &rec), 0);
    wait_readable(fd, 300);
    CHECK_INT(b->ops->watch_drain(b, record_news, got), 0);
    CHECK_STR(got, "");
    /* The listening connection is cut: the drain says so, a new watch starts with "resync". */
    CHECK_INT(pg_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                     " WHERE query = 'LISTEN moat'"),
              0);
    CHECK(wait_readable(fd, 2000));
    CHECK_INT(b->ops->watch_drain(b, record_news, got), MOAT_ECLOSED);
    int fd2 = -1;
    for (int i = 0; i < 40 && fd2 < 0; i++) { /* a new watch at most every 2 s */
        fd2 = b->ops->watch_fd(b);
        if (fd2 < 0) {
            struct timespec ts = {0, 100 * 1000 * 1000};
            nanosleep(&ts, NULL);
        }
    }
    CHECK(fd2 >= 0);
    got[0] = '\0';
    CHECK_INT(b->ops->watch_drain(b, record_news, got), 0);
    CHECK_STR(got, "resync;");
out:
    if (a)
        a->ops->close(a);
    if (b)
        b->ops->close(b);
    free(dir);
}

int main(void)
{
    if (fixture_begin() != 0)
        return 1;
    test_pg_url();
    if (pg_start() == 0) {
        test_pg_channel_binding();
        test_pg_schema();
        test_pg_watch();
        test_pg_login_errors();
        test_pg_outage();
        pg_stop();
    }
    fixture_end();
    return test_summary("storage_pg");
}
