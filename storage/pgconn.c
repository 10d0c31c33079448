/* A synchronous, deadline-bounded PostgreSQL connection (include/moat/pgconn.h). The protocol
 * bytes come from storage/pgwire.c; this file owns the socket, TLS and the login dialogue. */
#include "moat/pgconn.h"
#include "moat/log.h"
#include "moat/pgwire.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/digest.h>
#include <openssl/err.h>
#include <openssl/nid.h>
#include <openssl/obj.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define DEFAULT_TIMEOUT_MS 3000
#define READ_CHUNK         16384
#define MAX_PENDING_NOTIFY 256

typedef struct {
    int pid;
    char *channel, *payload;
} notify_t;

struct moat_pgconn {
    int fd;
    SSL_CTX *ctx;
    SSL *ssl;
    char where[300]; /* "PostgreSQL at host:port" for sentences */
    int timeout_ms;
    int64_t deadline; /* ms, monotonic, of the call under way */
    moat_buf_t rbuf, wbuf;
    size_t consume; /* bytes of rbuf the last message took, dropped before the next read */
    int broken;
    char tx;
    int channel_bound;
    int backend_pid;
    char err[1024];
    char sqlstate[6];
    notify_t *notes;
    size_t nnotes;
};

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ---- parameters ---- */

void moat_pg_params_clear(moat_pg_params_t *p)
{
    if (p == NULL)
        return;
    free(p->host);
    free(p->user);
    moat_secret_free(p->password);
    free(p->dbname);
    free(p->sslrootcert);
    memset(p, 0, sizeof *p);
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

/* Percent-decode s[0, n) into a new string; NULL when an escape is bad or decodes to NUL. */
static char *pct_decode(const char *s, size_t n)
{
    char *out = moat_xmalloc(n + 1);
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] != '%') {
            out[o++] = s[i];
            continue;
        }
        int hi = i + 1 < n ? hexval(s[i + 1]) : -1;
        int lo = i + 2 < n ? hexval(s[i + 2]) : -1;
        if (hi < 0 || lo < 0 || (hi == 0 && lo == 0)) {
            free(out);
            return NULL;
        }
        out[o++] = (char)(hi << 4 | lo);
        i += 2;
    }
    out[o] = '\0';
    return out;
}

/* A .pgpass field compares equal when it is '*' or the same text with \: and \\ unescaped. */
static int pgpass_field(const char **line, const char *want)
{
    const char *p = *line;
    int star = p[0] == '*' && (p[1] == ':' || p[1] == '\0');
    int same = 1;
    const char *w = want;
    while (*p && *p != ':') {
        char ch = *p;
        if (ch == '\\' && p[1])
            ch = *++p;
        if (*w == ch)
            w++;
        else
            same = 0;
        p++;
    }
    if (*w)
        same = 0;
    if (*p != ':')
        return -1;
    *line = p + 1;
    return star || same;
}

static char *pgpass_lookup(const moat_pg_params_t *p)
{
    const char *file = getenv("PGPASSFILE");
    char path[1024];
    if (file == NULL || *file == '\0') {
        const char *home = getenv("HOME");
        if (home == NULL)
            return NULL;
        snprintf(path, sizeof path, "%s/.pgpass", home);
        file = path;
    }
    FILE *f = fopen(file, "r");
    if (f == NULL)
        return NULL;
    char port[16];
    snprintf(port, sizeof port, "%d", p->port);
    char line[2048];
    char *found = NULL;
    while (found == NULL && fgets(line, sizeof line, f) != NULL) {
        line[strcspn(line, "\r\n")] = '\0';
        if (line[0] == '#' || line[0] == '\0')
            continue;
        const char *c = line;
        if (pgpass_field(&c, p->host) == 1 && pgpass_field(&c, port) == 1 &&
            pgpass_field(&c, p->dbname) == 1 && pgpass_field(&c, p->user) == 1) {
            char *pw = moat_xmalloc(strlen(c) + 1);
            size_t o = 0;
            for (; *c; c++) {
                if (*c == '\\' && c[1])
                    c++;
                pw[o++] = *c;
            }
            pw[o] = '\0';
            found = pw;
        }
    }
    moat_secret_wipe(line, sizeof line);
    fclose(f);
    return found;
}

static int url_bad(char *err, size_t errlen, const char *why)
{
    moat_errf(err, errlen,
              "--storage: %s; expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE"
              "[?sslmode=verify-full&sslrootcert=FILE]",
              why);
    return MOAT_EINVAL;
}

int moat_pg_params_parse(const char *url, moat_pg_params_t *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    const char *p;
    if (strncmp(url, "postgres://", 11) == 0)
        p = url + 11;
    else if (strncmp(url, "postgresql://", 13) == 0)
        p = url + 13;
    else
        return url_bad(err, errlen, "not a postgres:// URL");
    out->port = 5432;
    out->sslmode = MOAT_PG_SSL_VERIFY_FULL;
    const char *at = strchr(p, '@'), *slash = strchr(p, '/');
    if (at == NULL || (slash != NULL && at > slash))
        return url_bad(err, errlen, "no user name (USER@ before the host)");
    const char *colon = memchr(p, ':', (size_t)(at - p));
    out->user = pct_decode(p, (size_t)((colon ? colon : at) - p));
    if (colon != NULL)
        out->password = pct_decode(colon + 1, (size_t)(at - colon - 1));
    if (out->user == NULL || out->user[0] == '\0' || (colon != NULL && out->password == NULL)) {
        moat_pg_params_clear(out);
        return url_bad(err, errlen, "the user name or password is empty or badly escaped");
    }
    p = at + 1;
    const char *hend;
    if (*p == '[') {
        const char *rb = strchr(p, ']');
        if (rb == NULL) {
            moat_pg_params_clear(out);
            return url_bad(err, errlen, "an IPv6 host without its closing ]");
        }
        out->host = moat_xstrndup(p + 1, (size_t)(rb - p - 1));
        hend = rb + 1;
    } else {
        hend = p + strcspn(p, ":/?");
        out->host = pct_decode(p, (size_t)(hend - p));
    }
    if (out->host == NULL || out->host[0] == '\0') {
        moat_pg_params_clear(out);
        return url_bad(err, errlen, "no host");
    }
    p = hend;
    if (*p == ':') {
        char *end;
        long port = strtol(p + 1, &end, 10);
        if (end == p + 1 || port < 1 || port > 65535 || (*end && *end != '/' && *end != '?')) {
            moat_pg_params_clear(out);
            return url_bad(err, errlen, "the port is not a number from 1 to 65535");
        }
        out->port = (int)port;
        p = end;
    }
    if (*p != '/') {
        moat_pg_params_clear(out);
        return url_bad(err, errlen, "no database name (/DATABASE after the host)");
    }
    p++;
    size_t dl = strcspn(p, "?");
    out->dbname = pct_decode(p, dl);
    if (out->dbname == NULL || out->dbname[0] == '\0') {
        moat_pg_params_clear(out);
        return url_bad(err, errlen, "no database name (/DATABASE after the host)");
    }
    p += dl;
    if (*p == '?')
        p++;
    while (*p) {
        size_t len = strcspn(p, "&");
        const char *eq = memchr(p, '=', len);
        if (eq == NULL) {
            moat_pg_params_clear(out);
            return url_bad(err, errlen, "an option without =VALUE");
        }
        size_t kl = (size_t)(eq - p);
        char *val = pct_decode(eq + 1, len - kl - 1);
        int ok = val != NULL;
        if (ok && kl == 7 && strncmp(p, "sslmode", 7) == 0) {
            if (strcmp(val, "disable") == 0)
                out->sslmode = MOAT_PG_SSL_DISABLE;
            else if (strcmp(val, "require") == 0)
                out->sslmode = MOAT_PG_SSL_REQUIRE;
            else if (strcmp(val, "verify-ca") == 0)
                out->sslmode = MOAT_PG_SSL_VERIFY_CA;
            else if (strcmp(val, "verify-full") == 0)
                out->sslmode = MOAT_PG_SSL_VERIFY_FULL;
            else
                ok = 0;
        } else if (ok && kl == 15 && strncmp(p, "channel_binding", 15) == 0) {
            if (strcmp(val, "require") == 0)
                out->channel_binding_required = 1;
            else if (strcmp(val, "prefer") != 0)
                ok = 0;
        } else if (ok && kl == 11 && strncmp(p, "sslrootcert", 11) == 0) {
            free(out->sslrootcert);
            out->sslrootcert = val;
            val = NULL;
        } else if (ok && kl == 15 && strncmp(p, "connect_timeout", 15) == 0) {
            char *end;
            long s = strtol(val, &end, 10);
            ok = *end == '\0' && s >= 1 && s <= 60;
            out->timeout_ms = (int)s * 1000;
        } else {
            ok = 0;
        }
        free(val);
        if (!ok) {
            char why[200];
            snprintf(why, sizeof why,
                     "option \"%.*s\" is unknown or its value is not valid (known: sslmode="
                     "disable|require|verify-ca|verify-full, sslrootcert=FILE, "
                     "connect_timeout=SECONDS, channel_binding=prefer|require)",
                     (int)MOAT_MIN(kl, 40), p);
            moat_pg_params_clear(out);
            return url_bad(err, errlen, why);
        }
        p += len;
        if (*p == '&')
            p++;
    }
    if (out->password == NULL) {
        const char *env = getenv("MOAT_STORAGE_PASSWORD");
        if (env != NULL && *env != '\0')
            out->password = moat_xstrdup(env);
        else
            out->password = pgpass_lookup(out);
    }
    return 0;
}

/* ---- socket and TLS with deadlines ---- */

static int fail_io(moat_pgconn_t *c, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static int fail_io(moat_pgconn_t *c, int code, const char *fmt, ...)
{
    char what[400];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    snprintf(c->err, sizeof c->err, "%s: %s", c->where, what);
    c->broken = 1;
    return code;
}

/* Wait until the socket is ready for `events` or the call's deadline passes. */
static int wait_fd(moat_pgconn_t *c, short events)
{
    for (;;) {
        int64_t left = c->deadline - now_ms();
        if (left <= 0)
            return fail_io(c, MOAT_ETIMEOUT,
                           "no answer within %d ms; is the server up and reachable from here?",
                           c->timeout_ms);
        struct pollfd pfd = {.fd = c->fd, .events = events};
        int n = poll(&pfd, 1, (int)left);
        if (n > 0)
            return 0;
        if (n < 0 && errno != EINTR)
            return fail_io(c, MOAT_EIO, "poll: %s", strerror(errno));
    }
}

static void tls_reason(char *out, size_t cap)
{
    unsigned long e = ERR_get_error();
    if (e == 0)
        snprintf(out, cap, "the connection was closed during the handshake");
    else
        ERR_error_string_n(e, out, cap);
    ERR_clear_error();
}

static int write_all(moat_pgconn_t *c, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w;
        if (c->ssl != NULL) {
            int r = SSL_write(c->ssl, p, (int)MOAT_MIN(n, (size_t)1 << 30));
            if (r <= 0) {
                int e = SSL_get_error(c->ssl, r);
                if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) {
                    int rc = wait_fd(c, e == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN);
                    if (rc != 0)
                        return rc;
                    continue;
                }
                char why[200];
                tls_reason(why, sizeof why);
                return fail_io(c, MOAT_EIO, "TLS write failed: %s", why);
            }
            w = r;
        } else {
            w = send(c->fd, p, n, MSG_NOSIGNAL);
            if (w < 0) {
                if (errno == EINTR)
                    continue;
                if (errno == EAGAIN || errno == EWOULDBLOCK) {
                    int rc = wait_fd(c, POLLOUT);
                    if (rc != 0)
                        return rc;
                    continue;
                }
                return fail_io(c, MOAT_EIO, "write failed: %s", strerror(errno));
            }
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int flush_wbuf(moat_pgconn_t *c)
{
    int rc = write_all(c, moat_buf_data(&c->wbuf), moat_buf_size(&c->wbuf));
    /* Bound values include private keys: do not leave them in the buffer for its next use. */
    moat_secret_wipe(moat_buf_data(&c->wbuf), moat_buf_size(&c->wbuf));
    moat_buf_reset(&c->wbuf);
    return rc;
}

/* Read some bytes into rbuf; wait when nothing is there unless `nowait`. 1 read, 0 nothing
 * (nowait only), < 0 broken. */
static int read_some(moat_pgconn_t *c, int nowait)
{
    for (;;) {
        char *dst = moat_buf_reserve(&c->rbuf, READ_CHUNK);
        if (dst == NULL)
            return fail_io(c, MOAT_ENOMEM, "out of memory");
        ssize_t r;
        short want = POLLIN;
        if (c->ssl != NULL) {
            int n = SSL_read(c->ssl, dst, READ_CHUNK);
            if (n > 0) {
                moat_buf_commit(&c->rbuf, (size_t)n);
                return 1;
            }
            int e = SSL_get_error(c->ssl, n);
            if (e == SSL_ERROR_ZERO_RETURN || (e == SSL_ERROR_SYSCALL && ERR_peek_error() == 0)) {
                ERR_clear_error();
                return fail_io(c, MOAT_ECLOSED, "the server closed the connection");
            }
            if (e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
                char why[200];
                tls_reason(why, sizeof why);
                return fail_io(c, MOAT_EIO, "TLS read failed: %s", why);
            }
            want = e == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN;
        } else {
            r = recv(c->fd, dst, READ_CHUNK, 0);
            if (r > 0) {
                moat_buf_commit(&c->rbuf, (size_t)r);
                return 1;
            }
            if (r == 0)
                return fail_io(c, MOAT_ECLOSED, "the server closed the connection");
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                return fail_io(c, MOAT_EIO, "read failed: %s", strerror(errno));
        }
        if (nowait)
            return 0;
        int rc = wait_fd(c, want);
        if (rc != 0)
            return rc;
    }
}

/* The next backend message; its slices are valid until the next call. */
static int next_msg(moat_pgconn_t *c, moat_pgw_msg_t *m, int nowait)
{
    moat_buf_consume(&c->rbuf, c->consume);
    c->consume = 0;
    for (;;) {
        size_t used = 0;
        char why[300];
        int rc = moat_pgw_next(moat_buf_data(&c->rbuf), moat_buf_size(&c->rbuf), m, &used, why,
                               sizeof why);
        if (rc < 0)
            return fail_io(c, MOAT_EPARSE, "%s", why);
        if (rc == 1) {
            c->consume = used;
            return 1;
        }
        rc = read_some(c, nowait);
        if (rc <= 0)
            return rc;
    }
}

static void queue_notify(moat_pgconn_t *c, const moat_pgw_msg_t *m)
{
    /* Bounded: a flood of notifications nobody drains costs at most this much memory; the
     * slow poll in the caller covers what is dropped. */
    if (c->nnotes >= MAX_PENDING_NOTIFY)
        return;
    c->notes = moat_xrealloc(c->notes, (c->nnotes + 1) * sizeof *c->notes);
    c->notes[c->nnotes].pid = m->u.notify.pid;
    c->notes[c->nnotes].channel = moat_xstrndup(m->u.notify.channel.base, m->u.notify.channel.len);
    c->notes[c->nnotes].payload = moat_xstrndup(m->u.notify.payload.base, m->u.notify.payload.len);
    c->nnotes++;
}

/* Messages the server may send at any time: notices, parameter changes, notifications. 1 when
 * m was one of them (handled), 0 otherwise. */
static int async_msg(moat_pgconn_t *c, const moat_pgw_msg_t *m)
{
    switch (m->type) {
    case 'N': {
        char s[400];
        moat_pgw_error_sentence(&m->u.error, s, sizeof s);
        MOAT_DEBUG("%s says: %s", c->where, s);
        return 1;
    }
    case 'S': return 1;
    case 'A': queue_notify(c, m); return 1;
    default: return 0;
    }
}

static int connect_tcp(moat_pgconn_t *c, const moat_pg_params_t *p)
{
    char port[16];
    snprintf(port, sizeof port, "%d", p->port);
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM};
    struct addrinfo *res = NULL;
    /* getaddrinfo blocks; a name is looked up once per connection attempt, and an IP address
     * (the usual setting for a database) is not looked up at all. */
    int g = getaddrinfo(p->host, port, &hints, &res);
    if (g != 0)
        return fail_io(c, MOAT_EIO, "cannot resolve the host name: %s", gai_strerror(g));
    int rc = MOAT_EIO;
    char last[200] = "no address";
    for (struct addrinfo *ai = res; ai != NULL; ai = ai->ai_next) {
        int fd = socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0)
            continue;
        c->fd = fd;
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) != 0 && errno != EINPROGRESS) {
            snprintf(last, sizeof last, "%s", strerror(errno));
            close(fd);
            c->fd = -1;
            continue;
        }
        rc = wait_fd(c, POLLOUT);
        if (rc != 0) {
            freeaddrinfo(res);
            return rc;
        }
        int soerr = 0;
        socklen_t sl = sizeof soerr;
        getsockopt(fd, SOL_SOCKET, SO_ERROR, &soerr, &sl);
        if (soerr == 0) {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
            setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof one);
            freeaddrinfo(res);
            return 0;
        }
        snprintf(last, sizeof last, "%s", strerror(soerr));
        close(fd);
        c->fd = -1;
        rc = MOAT_EIO;
    }
    freeaddrinfo(res);
    return fail_io(c, rc, "cannot connect (%s); is PostgreSQL running and listening there?", last);
}

static int is_ip_literal(const char *h)
{
    unsigned char buf[16];
    return inet_pton(AF_INET, h, buf) == 1 || inet_pton(AF_INET6, h, buf) == 1;
}

static int start_tls(moat_pgconn_t *c, const moat_pg_params_t *p)
{
    if (moat_pgw_ssl_request(&c->wbuf) != 0)
        return fail_io(c, MOAT_ENOMEM, "out of memory");
    int rc = flush_wbuf(c);
    if (rc != 0)
        return rc;
    /* The answer is one byte, 'S' or 'N', not a message. Nothing else may follow it before
     * the handshake (CVE-2021-23222): anything buffered is refused. */
    while (moat_buf_size(&c->rbuf) == 0) {
        rc = read_some(c, 0);
        if (rc < 0)
            return rc;
    }
    char answer = moat_buf_data(&c->rbuf)[0];
    if (answer != 'S') {
        if (answer == 'N')
            return fail_io(c, MOAT_ETLS,
                           "the server does not accept TLS connections (ssl = off in its "
                           "postgresql.conf); turn TLS on there, or use sslmode=disable only "
                           "for a server on this host");
        return fail_io(c, MOAT_EPARSE,
                       "the server did not answer the TLS request; is this a PostgreSQL server?");
    }
    if (moat_buf_size(&c->rbuf) != 1)
        return fail_io(c, MOAT_EPARSE, "the server sent data before the TLS handshake");
    moat_buf_reset(&c->rbuf);

    c->ctx = SSL_CTX_new(TLS_method());
    if (c->ctx == NULL)
        return fail_io(c, MOAT_ENOMEM, "out of memory");
    SSL_CTX_set_min_proto_version(c->ctx, TLS1_2_VERSION);
    if (p->sslmode >= MOAT_PG_SSL_VERIFY_CA) {
        int ok = p->sslrootcert != NULL
                     ? SSL_CTX_load_verify_locations(c->ctx, p->sslrootcert, NULL)
                     : SSL_CTX_set_default_verify_paths(c->ctx);
        if (!ok) {
            ERR_clear_error();
            return fail_io(c, MOAT_ETLS, "cannot read the trusted certificates from %s",
                           p->sslrootcert ? p->sslrootcert : "the system store");
        }
        SSL_CTX_set_verify(c->ctx, SSL_VERIFY_PEER, NULL);
    } else {
        SSL_CTX_set_verify(c->ctx, SSL_VERIFY_NONE, NULL);
    }
    c->ssl = SSL_new(c->ctx);
    if (c->ssl == NULL)
        return fail_io(c, MOAT_ENOMEM, "out of memory");
    SSL_set_fd(c->ssl, c->fd);
    if (!is_ip_literal(p->host))
        SSL_set_tlsext_host_name(c->ssl, p->host);
    if (p->sslmode == MOAT_PG_SSL_VERIFY_FULL) {
        X509_VERIFY_PARAM *vp = SSL_get0_param(c->ssl);
        int ok = is_ip_literal(p->host) ? X509_VERIFY_PARAM_set1_ip_asc(vp, p->host)
                                        : X509_VERIFY_PARAM_set1_host(vp, p->host, 0);
        if (!ok)
            return fail_io(c, MOAT_ETLS, "cannot check the certificate against host %s", p->host);
    }
    for (;;) {
        int r = SSL_connect(c->ssl);
        if (r == 1)
            return 0;
        int e = SSL_get_error(c->ssl, r);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
            rc = wait_fd(c, e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT);
            if (rc != 0)
                return rc;
            continue;
        }
        long v = SSL_get_verify_result(c->ssl);
        if (v != X509_V_OK) {
            ERR_clear_error();
            return fail_io(c, MOAT_ETLS,
                           "its certificate is not trusted (%s); check sslrootcert= names the "
                           "CA that signed the server's certificate and that the certificate "
                           "names host %s",
                           X509_verify_cert_error_string(v), p->host);
        }
        char why[200];
        tls_reason(why, sizeof why);
        return fail_io(c, MOAT_ETLS, "TLS handshake failed: %s", why);
    }
}

/* tls-server-end-point (RFC 5929 section 4.1): the server certificate hashed with its
 * signature's hash, SHA-256 when that is MD5 or SHA-1. */
static int cert_hash(moat_pgconn_t *c, unsigned char *out, unsigned *len)
{
    X509 *cert = SSL_get_peer_certificate(c->ssl);
    if (cert == NULL)
        return -1;
    int md_nid = NID_undef;
    const EVP_MD *md = NULL;
    if (OBJ_find_sigid_algs(X509_get_signature_nid(cert), &md_nid, NULL) && md_nid != NID_md5 &&
        md_nid != NID_sha1)
        md = EVP_get_digestbynid(md_nid);
    if (md == NULL)
        md = EVP_sha256();
    int ok = X509_digest(cert, md, out, len);
    X509_free(cert);
    return ok ? 0 : -1;
}

static int login_refused(moat_pgconn_t *c, const moat_pgw_msg_t *m, const moat_pg_params_t *p)
{
    char s[400];
    moat_pgw_error_sentence(&m->u.error, s, sizeof s);
    snprintf(c->sqlstate, sizeof c->sqlstate, "%.*s", (int)MOAT_MIN(m->u.error.code.len, 5),
             m->u.error.code.base ? m->u.error.code.base : "");
    const char *what = "check the user, password and database in --storage";
    if (strcmp(c->sqlstate, "28P01") == 0)
        what = "the password is wrong (from the URL, MOAT_STORAGE_PASSWORD or PGPASSFILE)";
    else if (strcmp(c->sqlstate, "28000") == 0)
        what = "pg_hba.conf has no line letting this user in from here over this transport";
    else if (strcmp(c->sqlstate, "3D000") == 0)
        what = "create the database first (createdb)";
    return fail_io(c, MOAT_EPERM, "login as %s refused: %s; %s", p->user, s, what);
}

static int login(moat_pgconn_t *c, const moat_pg_params_t *p)
{
    if (moat_pgw_startup(&c->wbuf, p->user, p->dbname, "moat") != 0)
        return fail_io(c, MOAT_EINVAL, "the user or database name is too long");
    int rc = flush_wbuf(c);
    moat_pgw_scram_t scram = {0};
    int scram_started = 0, authed = 0;
    moat_buf_t out = {0};
    while (rc == 0) {
        moat_pgw_msg_t m;
        rc = next_msg(c, &m, 0);
        if (rc < 0)
            break;
        rc = 0;
        if (async_msg(c, &m))
            continue;
        if (m.type == 'E') {
            rc = login_refused(c, &m, p);
            break;
        }
        if (m.type == 'K')
            c->backend_pid = m.u.key.pid;
        if (m.type == 'K' || m.type == 'v')
            continue;
        if (m.type == 'Z') {
            if (!authed) {
                rc = fail_io(c, MOAT_EPARSE, "the server skipped authentication");
                break;
            }
            c->tx = m.u.ready;
            break;
        }
        if (m.type != 'R') {
            rc = fail_io(c, MOAT_EPARSE, "unexpected message '%c' during login", m.type);
            break;
        }
        moat_buf_reset(&out);
        char why[300] = "";
        switch (m.u.auth.code) {
        case MOAT_PGW_AUTH_OK:
            if (scram_started && !authed) {
                rc = fail_io(c, MOAT_EPERM, "the server ended SCRAM without proving itself");
                break;
            }
            if (p->channel_binding_required && !c->channel_bound) {
                rc = fail_io(c, MOAT_EPERM,
                             "channel_binding=require, but the server let moat in without "
                             "SCRAM-SHA-256-PLUS (trust or another method in pg_hba.conf)");
                break;
            }
            authed = 1;
            break;
        case MOAT_PGW_AUTH_SASL: {
            if (p->password == NULL) {
                rc = fail_io(c, MOAT_EPERM,
                             "the server asks for a password and none was given (in the URL, "
                             "MOAT_STORAGE_PASSWORD or a PGPASSFILE line)");
                break;
            }
            int plus = c->ssl != NULL && moat_pgw_sasl_offers(m.u.auth.data, "SCRAM-SHA-256-PLUS");
            if (!plus && !moat_pgw_sasl_offers(m.u.auth.data, "SCRAM-SHA-256")) {
                rc = fail_io(c, MOAT_EPERM, "the server offers no SASL mechanism moat knows");
                break;
            }
            if (!plus && p->channel_binding_required) {
                rc = fail_io(c, MOAT_EPERM,
                             "channel_binding=require, but the server does not offer "
                             "SCRAM-SHA-256-PLUS%s",
                             c->ssl == NULL ? " (it needs TLS: not with sslmode=disable)" : "");
                break;
            }
            unsigned char hash[EVP_MAX_MD_SIZE];
            unsigned hlen = 0;
            if (plus && cert_hash(c, hash, &hlen) != 0) {
                rc = fail_io(c, MOAT_ETLS, "cannot hash the server certificate for binding");
                break;
            }
            rc = moat_pgw_scram_first(&scram, NULL, plus ? hash : NULL, hlen, c->ssl != NULL, &out);
            scram_started = 1;
            c->channel_bound = plus;
            if (rc == 0)
                rc = moat_pgw_sasl_initial(&c->wbuf, plus ? "SCRAM-SHA-256-PLUS" : "SCRAM-SHA-256",
                                           moat_buf_data(&out), moat_buf_size(&out));
            if (rc == 0)
                rc = flush_wbuf(c);
            break;
        }
        case MOAT_PGW_AUTH_SASL_CONTINUE:
            if (!scram_started) {
                rc = fail_io(c, MOAT_EPARSE, "SASL continue before SASL started");
                break;
            }
            rc = moat_pgw_scram_final(&scram, p->password, m.u.auth.data, &out, why, sizeof why);
            if (rc != 0) {
                rc = fail_io(c, rc, "%s", why);
                break;
            }
            rc = moat_pgw_sasl_response(&c->wbuf, moat_buf_data(&out), moat_buf_size(&out));
            if (rc == 0)
                rc = flush_wbuf(c);
            break;
        case MOAT_PGW_AUTH_SASL_FINAL:
            if (!scram_started ||
                moat_pgw_scram_verify(&scram, m.u.auth.data, why, sizeof why) != 0) {
                rc = fail_io(c, MOAT_EPERM, "%s", why[0] ? why : "SASL final out of order");
                break;
            }
            authed = 1;
            break;
        case MOAT_PGW_AUTH_CLEARTEXT:
        case MOAT_PGW_AUTH_MD5:
            rc = fail_io(c, MOAT_EPERM,
                         "the server asks for a %s password; moat only logs in with "
                         "SCRAM-SHA-256: set password_encryption = scram-sha-256, set the "
                         "password again, and use scram-sha-256 in pg_hba.conf",
                         m.u.auth.code == MOAT_PGW_AUTH_MD5 ? "MD5" : "cleartext");
            break;
        default:
            rc = fail_io(c, MOAT_EPERM,
                         "the server asks for an authentication method moat does not speak "
                         "(code %d); use scram-sha-256 in pg_hba.conf",
                         (int)m.u.auth.code);
        }
    }
    moat_buf_free(&out);
    moat_pgw_scram_clear(&scram);
    return rc;
}

int moat_pgconn_open(const moat_pg_params_t *p, moat_pgconn_t **out, char *err, size_t errlen)
{
    *out = NULL;
    moat_pgconn_t *c = moat_xcalloc(1, sizeof *c);
    c->fd = -1;
    c->tx = 'I';
    c->timeout_ms = p->timeout_ms > 0 ? p->timeout_ms : DEFAULT_TIMEOUT_MS;
    int v6 = strchr(p->host, ':') != NULL;
    snprintf(c->where, sizeof c->where, "PostgreSQL at %s%.200s%s:%d", v6 ? "[" : "", p->host,
             v6 ? "]" : "", p->port);
    c->deadline = now_ms() + c->timeout_ms;
    int rc = connect_tcp(c, p);
    if (rc == 0 && p->sslmode != MOAT_PG_SSL_DISABLE)
        rc = start_tls(c, p);
    if (rc == 0)
        rc = login(c, p);
    if (rc != 0) {
        moat_errf(err, errlen, "%s", c->err);
        moat_pgconn_free(c);
        return rc;
    }
    *out = c;
    return 0;
}

void moat_pgconn_free(moat_pgconn_t *c)
{
    if (c == NULL)
        return;
    if (!c->broken && c->fd >= 0) {
        /* A polite goodbye, never waited for. */
        moat_buf_reset(&c->wbuf);
        if (moat_pgw_terminate(&c->wbuf) == 0) {
            c->deadline = now_ms() + 200;
            write_all(c, moat_buf_data(&c->wbuf), moat_buf_size(&c->wbuf));
        }
    }
    if (c->ssl != NULL)
        SSL_free(c->ssl);
    if (c->ctx != NULL)
        SSL_CTX_free(c->ctx);
    if (c->fd >= 0)
        close(c->fd);
    if (c->rbuf.base != NULL)
        moat_secret_wipe(c->rbuf.base, c->rbuf.cap);
    moat_buf_free(&c->rbuf);
    moat_buf_free(&c->wbuf);
    for (size_t i = 0; i < c->nnotes; i++) {
        free(c->notes[i].channel);
        free(c->notes[i].payload);
    }
    free(c->notes);
    free(c);
}

/* ---- statements ---- */

void moat_pg_result_clear(moat_pg_result_t *r)
{
    if (r == NULL)
        return;
    for (size_t i = 0; i < r->nrows * r->ncols; i++)
        moat_secret_free(r->cells[i]); /* cells may hold private keys */
    free(r->cells);
    free(r->lens);
    memset(r, 0, sizeof *r);
}

static void add_row(moat_pg_result_t *r, const moat_pgw_msg_t *m, size_t *cap)
{
    if (r->nrows == 0 && r->ncols == 0)
        r->ncols = m->u.row.ncols;
    if (m->u.row.ncols != r->ncols || r->ncols == 0)
        return; /* one statement has one row shape */
    if (r->nrows == *cap) {
        *cap = *cap ? *cap * 2 : 8;
        r->cells = moat_xrealloc(r->cells, *cap * r->ncols * sizeof *r->cells);
        r->lens = moat_xrealloc(r->lens, *cap * r->ncols * sizeof *r->lens);
    }
    for (uint16_t i = 0; i < r->ncols; i++) {
        moat_slice_t v;
        int isnull = 0;
        moat_pgw_row_col(m, i, &v, &isnull);
        size_t at = r->nrows * r->ncols + i;
        r->cells[at] = isnull ? NULL : moat_xstrndup(v.base ? v.base : "", v.len);
        r->lens[at] = isnull ? 0 : v.len;
    }
    r->nrows++;
}

int moat_pgconn_exec(moat_pgconn_t *c, const char *sql, size_t n, const char *const *vals,
                     const size_t *lens, const int *binary, moat_pg_result_t *res)
{
    moat_pg_result_t scratch = {0};
    if (res == NULL)
        res = &scratch;
    memset(res, 0, sizeof *res);
    c->sqlstate[0] = '\0';
    if (c->broken) {
        /* c->err still says how it broke. */
        return MOAT_ECLOSED;
    }
    size_t lbuf[16];
    size_t *l = (size_t *)lens;
    if (lens == NULL) {
        if (n > MOAT_ARRAY_LEN(lbuf))
            return MOAT_EINVAL;
        for (size_t i = 0; i < n; i++)
            lbuf[i] = vals[i] ? strlen(vals[i]) : 0;
        l = lbuf;
    }
    c->deadline = now_ms() + c->timeout_ms;
    moat_buf_reset(&c->wbuf);
    int rc = moat_pgw_parse(&c->wbuf, NULL, sql);
    if (rc == 0)
        rc = moat_pgw_bind(&c->wbuf, NULL, n, vals, l, binary);
    if (rc == 0)
        rc = moat_pgw_describe(&c->wbuf, 'P', NULL);
    if (rc == 0)
        rc = moat_pgw_execute(&c->wbuf, NULL, 0);
    if (rc == 0)
        rc = moat_pgw_sync(&c->wbuf);
    if (rc != 0) {
        moat_buf_reset(&c->wbuf);
        snprintf(c->err, sizeof c->err, "%s: a value is too large to send", c->where);
        return rc;
    }
    rc = flush_wbuf(c);
    int failed = 0;
    size_t cap = 0;
    while (rc == 0) {
        moat_pgw_msg_t m;
        rc = next_msg(c, &m, 0);
        if (rc < 0)
            break;
        rc = 0;
        if (async_msg(c, &m))
            continue;
        switch (m.type) {
        case 'D': add_row(res, &m, &cap); break;
        case 'C':
            snprintf(res->tag, sizeof res->tag, "%.*s", (int)MOAT_MIN(m.u.tag.len, 63),
                     m.u.tag.base);
            break;
        case 'E': {
            char s[400];
            moat_pgw_error_sentence(&m.u.error, s, sizeof s);
            snprintf(c->err, sizeof c->err, "%s: %s", c->where, s);
            snprintf(c->sqlstate, sizeof c->sqlstate, "%.*s", (int)MOAT_MIN(m.u.error.code.len, 5),
                     m.u.error.code.base ? m.u.error.code.base : "");
            failed = 1;
            break;
        }
        case 'Z': c->tx = m.u.ready; goto done;
        case '1':
        case '2':
        case 'T':
        case 'n':
        case 'I':
        case 's': break;
        default: rc = fail_io(c, MOAT_EPARSE, "unexpected message '%c' in a reply", m.type);
        }
    }
done:
    if (rc == 0 && failed)
        rc = MOAT_ESTORAGE;
    if (rc != 0)
        moat_pg_result_clear(res);
    moat_pg_result_clear(&scratch);
    return rc;
}

const char *moat_pgconn_error(const moat_pgconn_t *c)
{
    return c->err;
}

const char *moat_pgconn_sqlstate(const moat_pgconn_t *c)
{
    return c->sqlstate;
}

int moat_pgconn_broken(const moat_pgconn_t *c)
{
    return c->broken;
}

char moat_pgconn_tx_status(const moat_pgconn_t *c)
{
    return c->tx;
}

int moat_pgconn_channel_bound(const moat_pgconn_t *c)
{
    return c->channel_bound;
}

int moat_pgconn_backend_pid(const moat_pgconn_t *c)
{
    return c->backend_pid;
}

int moat_pgconn_fd(const moat_pgconn_t *c)
{
    return c->fd;
}

int moat_pgconn_drain(moat_pgconn_t *c, moat_pgconn_notify_cb cb, void *arg)
{
    if (c->broken)
        return MOAT_ECLOSED;
    c->deadline = now_ms() + c->timeout_ms;
    int rc = 0;
    for (;;) {
        moat_pgw_msg_t m;
        rc = next_msg(c, &m, 1);
        if (rc <= 0)
            break;
        if (!async_msg(c, &m)) {
            rc = fail_io(c, MOAT_EPARSE, "unexpected message '%c' while idle", m.type);
            break;
        }
    }
    /* Delivered after reading, so a callback that runs a statement sees an idle connection. */
    notify_t *notes = c->notes;
    size_t n = c->nnotes;
    c->notes = NULL;
    c->nnotes = 0;
    for (size_t i = 0; i < n; i++) {
        if (cb != NULL)
            cb(arg, notes[i].pid, notes[i].channel, notes[i].payload);
        free(notes[i].channel);
        free(notes[i].payload);
    }
    free(notes);
    return rc < 0 ? rc : 0;
}
