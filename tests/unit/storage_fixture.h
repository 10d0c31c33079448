/* What the storage unit tests share: a scratch folder, the test PostgreSQL 15 server
 * (tests/fixtures/pgserver.sh: TLS on, SCRAM only, a loopback port) and stores opened on the
 * backend under test. storage_test.c runs every backend's cases on SQLite and PostgreSQL;
 * storage_pg_test.c runs PostgreSQL's own (logging in, the schema, an outage, notifications).
 * Each test program has its own copy of this state. */
#ifndef MOAT_STORAGE_FIXTURE_H
#define MOAT_STORAGE_FIXTURE_H

#include "moat/storage.h"
#include "test.h"

#include <ftw.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static char root[64];
/* Set while the shared cases run against PostgreSQL: the store's URL, and the server's folder
 * for tests/fixtures/pgserver.sh. */
static char pg_url[512];
static char pg_dir[256];
/* Set while the shared cases run through the encrypting wrapper (moat_storage_encrypt). */
static char enc_key[256];

static inline char *path_join(const char *a, const char *b)
{
    size_t n = strlen(a) + strlen(b) + 2;
    char *p = malloc(n);
    snprintf(p, n, "%s/%s", a, b);
    return p;
}

static inline int pg_script(const char *args)
{
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "%s/tests/fixtures/pgserver.sh %s >/dev/null 2>&1", MOAT_SOURCE_DIR,
             args);
    int st = system(cmd);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

/* Run SQL on the test server as its superuser. */
static inline int pg_sql(const char *sql)
{
    char args[700];
    snprintf(args, sizeof args, "psql %s \"%s\"", pg_dir, sql);
    return pg_script(args);
}

/* A fresh empty store for one case: a folder under the test root for SQLite, an emptied
 * database for PostgreSQL. */
static inline char *case_dir(const char *name)
{
    char sub[128];
    snprintf(sub, sizeof sub, "%s%s", enc_key[0] ? "sealed-" : "", name);
    char *d = path_join(root, sub);
    mkdir(d, 0700);
    if (pg_url[0] != '\0')
        CHECK_INT(pg_sql("DROP SCHEMA IF EXISTS moat CASCADE"), 0);
    return d;
}

static inline int rm_cb(const char *p, const struct stat *st, int type, struct FTW *ftw)
{
    (void)st;
    (void)type;
    (void)ftw;
    return remove(p);
}

static inline char *slurp(const char *path, size_t *len)
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

static inline void write_file(const char *path, const void *data, size_t len)
{
    FILE *f = fopen(path, "wb");
    fwrite(data, 1, len, f);
    fclose(f);
}

static inline moat_storage_t *open_ok(const char *dir)
{
    moat_storage_t *s = NULL;
    char err[512] = "";
    int rc = pg_url[0] ? moat_storage_open_postgres(pg_url, &s, err, sizeof err)
                       : moat_storage_open_sqlite(dir, &s, err, sizeof err);
    if (rc == 0 && enc_key[0] != '\0') {
        moat_storage_t *w = NULL;
        rc = moat_storage_encrypt(s, enc_key, &w, err, sizeof err);
        if (rc != 0)
            s->ops->close(s);
        s = w;
    }
    if (rc != 0)
        fprintf(stderr, "open %s: %s (%s)\n", pg_url[0] ? pg_url : dir, moat_strerror(rc), err);
    CHECK_INT(rc, 0);
    return s;
}

static inline moat_cert_record_t sample(const char *id, const char *names)
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

static inline void pg_url_with(char *out, size_t cap, const char *user_pw, const char *opts)
{
    int port = 0;
    FILE *f = NULL;
    char path[300];
    snprintf(path, sizeof path, "%s/port", pg_dir);
    f = fopen(path, "r");
    if (f != NULL) {
        if (fscanf(f, "%d", &port) != 1)
            port = 0;
        fclose(f);
    }
    snprintf(out, cap, "postgres://%s@127.0.0.1:%d/moat?%s", user_pw, port, opts);
}

/* Pick a free loopback port below the ephemeral range. */
static inline int free_port(void)
{
    srand((unsigned)getpid() ^ (unsigned)time(NULL));
    for (int i = 0; i < 50; i++) {
        int port = 15000 + rand() % 15000;
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        struct sockaddr_in a = {.sin_family = AF_INET,
                                .sin_port = htons((uint16_t)port),
                                .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        int ok = bind(fd, (struct sockaddr *)&a, sizeof a) == 0;
        close(fd);
        if (ok)
            return port;
    }
    return 0;
}

/* The scratch folder (root) and the process settings every case assumes. 0 or -1. */
static inline int fixture_begin(void)
{
    snprintf(root, sizeof root, "/tmp/moat-storage-test-XXXXXX");
    if (mkdtemp(root) == NULL) {
        perror("mkdtemp");
        return -1;
    }
    chmod(root, 0755);        /* the PostgreSQL server runs as another user below it when root */
    signal(SIGPIPE, SIG_IGN); /* as moat does: a server gone away is an error, not a signal */
    return 0;
}

static inline void fixture_end(void)
{
    nftw(root, rm_cb, 16, FTW_DEPTH | FTW_PHYS);
}

/* Start the test server under root and point pg_url at it (verify-full). 0 when it runs;
 * otherwise the cases are skipped (no PostgreSQL binaries) or failed, and said so. */
static inline int pg_start(void)
{
    snprintf(pg_dir, sizeof pg_dir, "%s/pg", root);
    char args[400];
    snprintf(args, sizeof args, "start %s %d", pg_dir, free_port());
    int rc = pg_script(args);
    if (rc == 77) {
        TEST_SKIP("no PostgreSQL 15 binaries (/usr/lib/postgresql/15/bin) or openssl");
        return -1;
    }
    CHECK_INT(rc, 0);
    if (rc != 0) {
        char log[400];
        snprintf(log, sizeof log, "cat %s/log >&2", pg_dir);
        if (system(log) != 0)
            fprintf(stderr, "no server log\n");
        return -1;
    }
    char opts[400];
    snprintf(opts, sizeof opts, "sslmode=verify-full&sslrootcert=%s/ca.pem", pg_dir);
    pg_url_with(pg_url, sizeof pg_url, "moat:moat-test-pw", opts);
    return 0;
}

static inline void pg_stop(void)
{
    pg_url[0] = '\0';
    char args[400];
    snprintf(args, sizeof args, "stop %s", pg_dir);
    pg_script(args);
}

#endif
