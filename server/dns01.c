/* ACME DNS-01 records (server/dns01.h) on the control loop.
 *
 * One operation (op_t) per record added or removed walks through its steps, each a DNS
 * exchange (exch_t: UDP, three tries of 1.5 s, then TCP for 5 s when the answer came back
 * truncated) or a timer:
 *
 *   add:    key file -> server address -> SOA query at the server (the zone) -> storage row ->
 *           signed UPDATE add -> NS of the zone at the resolver -> their addresses -> TXT at
 *           each until all answer the value (every second, until dns_wait) -> done
 *   remove: storage row -> key file -> server address -> signed UPDATE delete -> row removed
 *
 * Names the resolver is asked (the server's, the NS hosts') go through our own A queries,
 * never getaddrinfo: nothing here blocks and nothing runs on the thread pool. Cloudflare's
 * add is: token file -> zone (API) -> storage row -> create (API) -> the same NS/TXT wait;
 * its remove lists the zone's TXT records by name and deletes those with the value.
 * Both start by following a CNAME on _acme-challenge.<name>, if any. Not handled: IPv6-only
 * authoritative servers (only A records are looked up). */
#include "dns01.h"
#include "dns01_cloudflare.h"
#include "moat/common.h"
#include "moat/config.h"
#include "moat/dnsmsg.h"
#include "moat/log.h"

#include <openssl/mem.h>
#include <openssl/rand.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <uv.h>

#define UDP_TRY_MS   1500
#define UDP_TRIES    3
#define TCP_MS       5000
#define POLL_MS      1000
#define MAX_NS       8
#define RECORD_TTL   60
#define KEY_FILE_MAX 4096

typedef struct op op_t;
typedef struct exch exch_t;
typedef void (*exch_cb)(op_t *op, int rc, const moat_dns_msg_t *m);

struct moat_dns01 {
    char *owner;
    moat_httpc_t *http; /* Cloudflare's API; NULL when no client could be made */
    uv_loop_t *loop;
    moat_storage_t *st;
    op_t *ops;
    int closing;
};

struct exch {
    op_t *op;
    exch_cb cb;
    uv_udp_t udp;
    uv_tcp_t tcp;
    uv_timer_t timer;
    uv_connect_t conn;
    uv_write_t wr;
    int open; /* handles not yet closed */
    int tcp_used, tries, finished;
    struct sockaddr_storage to;
    uint16_t id;
    uint8_t req[2 + 1400]; /* TCP length prefix, then the message */
    size_t req_len;
    uint8_t ubuf[4096];
    uint8_t *tbuf; /* TCP answer, 2 + up to 65535 */
    size_t tlen;
    moat_dns_msg_t msg;
};

enum { OP_ADD, OP_REMOVE };
enum {
    ST_SERVER_ADDR, /* A query for the server's name at the resolver */
    ST_SOA,
    ST_UPDATE,
    ST_NS,
    ST_NS_ADDR,
    ST_TXT,
    ST_WAIT,
};

struct op {
    moat_dns01_t *d;
    op_t *next;
    int kind, state, withdrawn, cb_done, sent_update, freeing, http_pending, cname_hops;
    /* fqdn: _acme-challenge.<name>; rr: the record actually changed (fqdn, or where a CNAME
     * on it points) */
    char *name, *fqdn, *rr, *value, *rowkey;
    char *server_host, *tsig_path, *resolver_spec, *zone;
    char *token_file, *api, *token, *zone_id; /* cloudflare */
    int server_port;
    int provider;
    moat_dns_tsig_key_t key;
    uint8_t mac[32];
    struct sockaddr_storage server, resolver;
    int resolver_port, ns_port;
    char ns_names[MAX_NS][MOAT_DNS_NAME_MAX];
    struct sockaddr_storage ns[MAX_NS];
    size_t nns_names, ns_name_i, nns, ns_i, ns_seen;
    uint64_t started, deadline, wait_ms, last_log;
    exch_t *exch;
    uv_timer_t timer;
    moat_acme_dns01_cb cb;
    void *arg;
};

/* --- small helpers ------------------------------------------------------------------------ */

static uint64_t now_ms(moat_dns01_t *d)
{
    uv_update_time(d->loop);
    return uv_now(d->loop);
}

static void addr_text(const struct sockaddr_storage *ss, char *out, size_t cap)
{
    char ip[INET6_ADDRSTRLEN] = "?";
    int port = 0;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &a->sin_addr, ip, sizeof ip);
        port = ntohs(a->sin_port);
        snprintf(out, cap, "%s:%d", ip, port);
    } else {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, ip, sizeof ip);
        port = ntohs(a->sin6_port);
        snprintf(out, cap, "[%s]:%d", ip, port);
    }
}

/* An IP literal and port into ss. 0 or -1. */
static int make_addr(const char *ip, int port, struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof *ss);
    struct sockaddr_in *a = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, ip, &a->sin_addr) == 1) {
        a->sin_family = AF_INET;
        a->sin_port = htons((uint16_t)port);
        return 0;
    }
    if (inet_pton(AF_INET6, ip, &a6->sin6_addr) == 1) {
        a6->sin6_family = AF_INET6;
        a6->sin6_port = htons((uint16_t)port);
        return 0;
    }
    return -1;
}

/* "host:port", "[v6]:port", "host" -> host (new string) and port (def when absent). */
static char *split_hostport(const char *s, int def, int *port)
{
    *port = def;
    const char *colon;
    if (s[0] == '[') {
        const char *e = strchr(s, ']');
        if (e == NULL)
            return moat_xstrdup(s);
        if (e[1] == ':')
            *port = atoi(e + 2);
        return moat_xstrndup(s + 1, (size_t)(e - s - 1));
    }
    colon = strrchr(s, ':');
    if (colon && strchr(s, ':') == colon) {
        *port = atoi(colon + 1);
        return moat_xstrndup(s, (size_t)(colon - s));
    }
    return moat_xstrdup(s);
}

/* The first nameserver of /etc/resolv.conf (port 53), or 127.0.0.1. */
static void system_resolver(struct sockaddr_storage *ss)
{
    FILE *f = fopen("/etc/resolv.conf", "r");
    char line[512], ip[128];
    if (f != NULL) {
        while (fgets(line, sizeof line, f)) {
            if (sscanf(line, " nameserver %127s", ip) == 1 && make_addr(ip, 53, ss) == 0) {
                fclose(f);
                return;
            }
        }
        fclose(f);
    }
    make_addr("127.0.0.1", 53, ss);
}

/* --- exchanges ---------------------------------------------------------------------------- */

static void exch_closed(uv_handle_t *h)
{
    exch_t *x = h->data;
    if (--x->open == 0) {
        free(x->tbuf);
        free(x);
    }
}

static void exch_close(exch_t *x)
{
    x->finished = 1;
    uv_close((uv_handle_t *)&x->udp, exch_closed);
    uv_close((uv_handle_t *)&x->timer, exch_closed);
    if (x->tcp_used)
        uv_close((uv_handle_t *)&x->tcp, exch_closed);
}

static void exch_finish(exch_t *x, int rc, const moat_dns_msg_t *m)
{
    if (x->finished)
        return;
    op_t *op = x->op;
    op->exch = NULL;
    exch_close(x);
    x->cb(op, rc, m);
}

/* An answer to our question: same id, QR set, same question. */
static int exch_accept(exch_t *x, const uint8_t *p, size_t n)
{
    if (moat_dns_parse(p, n, &x->msg) != 0)
        return 0;
    moat_dns_msg_t q;
    if (moat_dns_parse(x->req + 2, x->req_len, &q) != 0)
        return 0;
    return x->msg.id == x->id && x->msg.qr &&
           (x->msg.qdcount == 0 ||
            (moat_dns_name_eq(x->msg.qname, q.qname) && x->msg.qtype == q.qtype));
}

static void tcp_alloc(uv_handle_t *h, size_t sz, uv_buf_t *buf)
{
    exch_t *x = h->data;
    (void)sz;
    if (x->tbuf == NULL)
        x->tbuf = moat_xmalloc(2 + MOAT_DNS_MAX_MSG);
    buf->base = (char *)x->tbuf + x->tlen;
    buf->len = 2 + MOAT_DNS_MAX_MSG - x->tlen;
}

static void tcp_read(uv_stream_t *s, ssize_t n, const uv_buf_t *buf)
{
    exch_t *x = s->data;
    (void)buf;
    if (x->finished)
        return;
    if (n < 0) {
        exch_finish(x, MOAT_EIO, NULL);
        return;
    }
    x->tlen += (size_t)n;
    if (x->tlen < 2)
        return;
    size_t want = (size_t)x->tbuf[0] << 8 | x->tbuf[1];
    if (x->tlen < 2 + want)
        return;
    if (exch_accept(x, x->tbuf + 2, want))
        exch_finish(x, 0, &x->msg);
    else
        exch_finish(x, MOAT_EPARSE, NULL);
}

static void tcp_written(uv_write_t *w, int status)
{
    exch_t *x = w->data;
    if (status < 0 && !x->finished)
        exch_finish(x, MOAT_EIO, NULL);
}

static void tcp_connected(uv_connect_t *c, int status)
{
    exch_t *x = c->data;
    if (x->finished)
        return;
    if (status < 0) {
        exch_finish(x, MOAT_EIO, NULL);
        return;
    }
    x->req[0] = (uint8_t)(x->req_len >> 8);
    x->req[1] = (uint8_t)x->req_len;
    uv_buf_t b = uv_buf_init((char *)x->req, (unsigned)(x->req_len + 2));
    x->wr.data = x;
    uv_read_start((uv_stream_t *)&x->tcp, tcp_alloc, tcp_read);
    if (uv_write(&x->wr, (uv_stream_t *)&x->tcp, &b, 1, tcp_written) < 0)
        exch_finish(x, MOAT_EIO, NULL);
}

static void exch_timeout(uv_timer_t *t);

static void exch_tcp(exch_t *x)
{
    uv_udp_recv_stop(&x->udp);
    uv_tcp_init(x->op->d->loop, &x->tcp);
    x->tcp.data = x;
    x->tcp_used = 1;
    x->open++;
    x->conn.data = x;
    uv_timer_start(&x->timer, exch_timeout, TCP_MS, 0);
    if (uv_tcp_connect(&x->conn, &x->tcp, (const struct sockaddr *)&x->to, tcp_connected) < 0)
        exch_finish(x, MOAT_EIO, NULL);
}

static void udp_send(exch_t *x)
{
    uv_buf_t b = uv_buf_init((char *)x->req + 2, (unsigned)x->req_len);
    x->tries++;
    uv_timer_start(&x->timer, exch_timeout, UDP_TRY_MS, 0);
    int r = uv_udp_try_send(&x->udp, &b, 1, (const struct sockaddr *)&x->to);
    if (r < 0 && r != UV_EAGAIN)
        MOAT_DEBUG("dns-01: sending to the DNS server failed: %s", uv_strerror(r));
}

static void exch_timeout(uv_timer_t *t)
{
    exch_t *x = t->data;
    if (x->finished)
        return;
    if (!x->tcp_used && x->tries < UDP_TRIES) {
        udp_send(x);
        return;
    }
    exch_finish(x, MOAT_ETIMEOUT, NULL);
}

static void udp_alloc(uv_handle_t *h, size_t sz, uv_buf_t *buf)
{
    exch_t *x = h->data;
    (void)sz;
    buf->base = (char *)x->ubuf;
    buf->len = sizeof x->ubuf;
}

static int same_addr(const struct sockaddr *a, const struct sockaddr_storage *b)
{
    if (a == NULL || a->sa_family != b->ss_family)
        return 0;
    if (a->sa_family == AF_INET) {
        const struct sockaddr_in *x = (const struct sockaddr_in *)a,
                                 *y = (const struct sockaddr_in *)b;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    const struct sockaddr_in6 *x = (const struct sockaddr_in6 *)a,
                              *y = (const struct sockaddr_in6 *)b;
    return x->sin6_port == y->sin6_port && memcmp(&x->sin6_addr, &y->sin6_addr, 16) == 0;
}

static void udp_recv(uv_udp_t *u, ssize_t n, const uv_buf_t *buf, const struct sockaddr *from,
                     unsigned flags)
{
    exch_t *x = u->data;
    (void)buf;
    if (x->finished || n <= 0 || (flags & UV_UDP_PARTIAL) || !same_addr(from, &x->to))
        return; /* not for us: keep waiting for the real answer until the timer */
    if (!exch_accept(x, x->ubuf, (size_t)n))
        return;
    if (x->msg.tc) {
        char where[80];
        addr_text(&x->to, where, sizeof where);
        MOAT_DEBUG("dns-01: the answer from %s was truncated; asking again over TCP", where);
        exch_tcp(x);
        return;
    }
    exch_finish(x, 0, &x->msg);
}

/* Send msg (built with id) to `to`; cb gets the parsed answer (valid during the call). */
static void exch_start(op_t *op, const struct sockaddr_storage *to, const uint8_t *msg, size_t len,
                       exch_cb cb)
{
    exch_t *x = moat_xcalloc(1, sizeof *x);
    x->op = op;
    x->cb = cb;
    x->to = *to;
    x->id = (uint16_t)(msg[0] << 8 | msg[1]);
    memcpy(x->req + 2, msg, len);
    x->req_len = len;
    uv_udp_init(op->d->loop, &x->udp);
    uv_timer_init(op->d->loop, &x->timer);
    x->udp.data = x->timer.data = x;
    x->open = 2;
    op->exch = x;
    struct sockaddr_storage any;
    make_addr(to->ss_family == AF_INET ? "0.0.0.0" : "::", 0, &any);
    int r = uv_udp_bind(&x->udp, (const struct sockaddr *)&any, 0);
    if (r == 0)
        r = uv_udp_recv_start(&x->udp, udp_alloc, udp_recv);
    if (r < 0) {
        /* Report from the loop, never inside the caller's step. */
        x->tries = UDP_TRIES;
        uv_timer_start(&x->timer, exch_timeout, 0, 0);
        return;
    }
    udp_send(x);
}

static uint16_t new_id(void)
{
    uint16_t id;
    RAND_bytes((uint8_t *)&id, sizeof id);
    return id;
}

/* --- operations --------------------------------------------------------------------------- */

static void op_closed(uv_handle_t *h)
{
    op_t *op = h->data;
    free(op->name);
    free(op->fqdn);
    free(op->rr);
    free(op->value);
    free(op->rowkey);
    free(op->server_host);
    free(op->tsig_path);
    free(op->resolver_spec);
    free(op->zone);
    free(op->token_file);
    free(op->api);
    free(op->zone_id);
    moat_secret_free(op->token);
    OPENSSL_cleanse(&op->key, sizeof op->key);
    free(op);
}

static void op_free(op_t *op)
{
    if (op->freeing)
        return;
    op->freeing = 1;
    for (op_t **pp = &op->d->ops; *pp; pp = &(*pp)->next)
        if (*pp == op) {
            *pp = op->next;
            break;
        }
    if (op->exch) {
        op->exch->finished = 1;
        exch_close(op->exch);
        op->exch = NULL;
    }
    /* A Cloudflare call cannot be cancelled: its callback completes the free. */
    if (!op->http_pending)
        uv_close((uv_handle_t *)&op->timer, op_closed);
}

/* Back from a Cloudflare call: 1 when the operation was freed meanwhile (stop there). */
static int cf_back(op_t *op)
{
    op->http_pending = 0;
    if (op->freeing) {
        uv_close((uv_handle_t *)&op->timer, op_closed);
        return 1;
    }
    return 0;
}

static void set_state(op_t *op, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void set_state(op_t *op, const char *fmt, ...)
{
    char key[600], msg[1024], when[64];
    time_t t = time(NULL);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(when, sizeof when, "%Y-%m-%d %H:%M:%S UTC", &tm);
    va_list ap;
    va_start(ap, fmt);
    int n = snprintf(msg, sizeof msg, "%s: ", when);
    vsnprintf(msg + n, sizeof msg - (size_t)n, fmt, ap);
    va_end(ap);
    snprintf(key, sizeof key, MOAT_DNS01_STATE_PREFIX "%s", op->name);
    op->d->st->ops->kv_put(op->d->st, key, msg);
}

static void op_report(op_t *op, int rc, const char *error)
{
    if (op->cb_done || op->cb == NULL)
        return;
    op->cb_done = 1;
    op->cb(op->arg, rc, error);
}

static void remove_begin(op_t *op);
static void cf_add_begin(op_t *op, const moat_dns01_cfg_t *cfg);

/* End an add: report, and when it failed after the update may have been sent (or the order
 * withdrew it meanwhile), go on to delete the record. */
static void add_end(op_t *op, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void add_end(op_t *op, int rc, const char *fmt, ...)
{
    char msg[1024] = "";
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, sizeof msg, fmt, ap);
        va_end(ap);
    }
    if (rc != 0) {
        /* Withdrawn: the order ended for its own reason (perhaps another record's failure,
         * whose sentence the state row already holds). */
        if (!op->withdrawn)
            set_state(op, "failed: %s", msg);
        if (!op->sent_update && op->rowkey)
            op->d->st->ops->kv_put(op->d->st, op->rowkey, NULL);
    }
    op_report(op, rc, msg);
    if (rc != 0 && op->sent_update) {
        /* It may exist (a lost answer, a propagation timeout): delete it now. */
        op->kind = OP_REMOVE;
        remove_begin(op);
        return;
    }
    op_free(op);
}

/* Read a secret file of at most cap - 1 bytes into buf (NUL-terminated); it must not be
 * readable by group or others. Returns its length, or < 0 with a sentence in err. */
static int read_secret(const char *path, const char *what, char *buf, size_t cap, char *err,
                       size_t errlen)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat sb;
    if (fd < 0 || fstat(fd, &sb) < 0) {
        moat_errf(err, errlen, "cannot read the %s %s: %s", what, path, strerror(errno));
        if (fd >= 0)
            close(fd);
        return MOAT_EIO;
    }
    if (sb.st_mode & 077) {
        moat_errf(err, errlen,
                  "the %s %s can be read by other users (mode %04o); run 'chmod 600 %s' (and "
                  "chown it to the user moat runs as)",
                  what, path, (unsigned)(sb.st_mode & 07777), path);
        close(fd);
        return MOAT_EPERM;
    }
    ssize_t n = read(fd, buf, cap - 1);
    close(fd);
    if (n < 0 || (size_t)n >= cap - 1) {
        moat_errf(err, errlen, "cannot read the %s %s: %s", what, path,
                  n < 0 ? strerror(errno) : "it is too large");
        OPENSSL_cleanse(buf, cap);
        return MOAT_EIO;
    }
    buf[n] = '\0';
    return (int)n;
}

static int load_key(op_t *op, char *err, size_t errlen)
{
    char buf[KEY_FILE_MAX];
    int n = read_secret(op->tsig_path, "TSIG key file", buf, sizeof buf, err, errlen);
    if (n < 0)
        return n;
    char why[256];
    int rc = moat_dns_tsig_key_parse(buf, (size_t)n, &op->key, why, sizeof why);
    OPENSSL_cleanse(buf, sizeof buf);
    if (rc != 0)
        moat_errf(err, errlen, "the TSIG key file %s: %s", op->tsig_path, why);
    return rc;
}

/* The Cloudflare API token: the file's one line, surrounding white space ignored. */
static int load_token(op_t *op, char *err, size_t errlen)
{
    char buf[1024];
    int n = read_secret(op->token_file, "API token file", buf, sizeof buf, err, errlen);
    if (n < 0)
        return n;
    char *b = buf, *e = buf + n;
    while (b < e && (*b == ' ' || *b == '\t' || *b == '\n' || *b == '\r'))
        b++;
    while (e > b && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\n' || e[-1] == '\r'))
        e--;
    int ok = e > b;
    for (char *p = b; ok && p < e; p++)
        ok = (unsigned char)*p > 0x20 && (unsigned char)*p < 0x7f;
    if (!ok) {
        OPENSSL_cleanse(buf, sizeof buf);
        moat_errf(err, errlen, "the API token file %s must hold the token on one line",
                  op->token_file);
        return MOAT_EPARSE;
    }
    op->token = moat_xstrndup(b, (size_t)(e - b));
    OPENSSL_cleanse(buf, sizeof buf);
    return 0;
}

static void step_server(op_t *op);
static void step_soa(op_t *op);
static void step_update(op_t *op);
static void step_ns(op_t *op);
static void step_ns_addr(op_t *op);
static void step_txt(op_t *op);

static void op_fail(op_t *op, int rc, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void op_fail(op_t *op, int rc, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (op->kind == OP_ADD) {
        add_end(op, rc, "%s", msg);
        return;
    }
    MOAT_WARN("dns-01: cannot delete %s TXT \"%s\": %s; it stays remembered and is deleted at "
              "the next start",
              op->rr, op->value, msg);
    op_free(op);
}

static const char *exch_why(int rc)
{
    return rc == MOAT_ETIMEOUT ? "no answer (timed out)"
           : rc == MOAT_EIO    ? "cannot reach it"
                               : moat_strerror(rc);
}

/* The server's address: an IP literal directly, a name through an A query at the resolver. */
static void on_server_addr(op_t *op, int rc, const moat_dns_msg_t *m)
{
    char where[80];
    addr_text(&op->resolver, where, sizeof where);
    if (rc != 0) {
        op_fail(op, rc, "cannot look up the DNS server %s at %s: %s", op->server_host, where,
                exch_why(rc));
        return;
    }
    for (size_t i = 0; i < m->nrr; i++) {
        const moat_dns_rr_t *rr = &m->rr[i];
        if (rr->section == MOAT_DNS_ANSWER && rr->type == MOAT_DNS_A && rr->rdlen == 4) {
            char ip[INET_ADDRSTRLEN];
            inet_ntop(AF_INET, m->msg + rr->rdoff, ip, sizeof ip);
            make_addr(ip, op->server_port, &op->server);
            op->kind == OP_ADD ? step_soa(op) : step_update(op);
            return;
        }
    }
    op_fail(op, MOAT_ENOT_FOUND, "the DNS server name %s has no address (%s at %s)",
            op->server_host, moat_dns_rcode_name(m->rcode), where);
}

static void step_server(op_t *op)
{
    if (make_addr(op->server_host, op->server_port, &op->server) == 0) {
        op->kind == OP_ADD ? step_soa(op) : step_update(op);
        return;
    }
    uint8_t q[512];
    int n = moat_dns_build_query(q, sizeof q, new_id(), op->server_host, MOAT_DNS_A);
    if (n < 0) {
        op_fail(op, MOAT_EINVAL, "%s is not a valid DNS server name", op->server_host);
        return;
    }
    exch_start(op, &op->resolver, q, (size_t)n, on_server_addr);
}

/* The zone: the owner of the SOA record the primary returns for the record's name (in the
 * answer at the apex, in the authority section below it). */
static void on_soa(op_t *op, int rc, const moat_dns_msg_t *m)
{
    char where[80];
    addr_text(&op->server, where, sizeof where);
    if (rc != 0) {
        op_fail(op, rc, "the DNS server %s: %s", where, exch_why(rc));
        return;
    }
    for (size_t i = 0; i < m->nrr; i++) {
        if (m->rr[i].type == MOAT_DNS_SOA && m->rr[i].section != MOAT_DNS_ADDITIONAL) {
            free(op->zone);
            op->zone = moat_xstrdup(m->rr[i].name);
            step_update(op);
            return;
        }
    }
    op_fail(op, MOAT_ENOT_FOUND,
            "the DNS server %s is not authoritative for %s (answered %s without a SOA record); "
            "dns_server= must be the zone's primary",
            where, op->rr, moat_dns_rcode_name(m->rcode));
}

static void step_soa(op_t *op)
{
    uint8_t q[512];
    int n = moat_dns_build_query(q, sizeof q, new_id(), op->rr, MOAT_DNS_SOA);
    if (n < 0) {
        op_fail(op, MOAT_EINVAL, "%s is not a valid DNS name", op->rr);
        return;
    }
    q[2] &= (uint8_t)~1u; /* the primary answers from its own zones, not by recursion */
    exch_start(op, &op->server, q, (size_t)n, on_soa);
}

static char *row_json(op_t *op)
{
    if (op->provider == MOAT_DNS_CLOUDFLARE) {
        json_t *c = json_pack("{s:s,s:s,s:s,s:s,s:s,s:s,s:s,s:s,s:s}", "provider", "cloudflare",
                              "name", op->name, "fqdn", op->fqdn, "value", op->value, "token_file",
                              op->token_file, "api", op->api, "zone_id", op->zone_id, "zone",
                              op->zone, "owner", op->d->owner);
        if (op->resolver_spec)
            json_object_set_new(c, "resolver", json_string(op->resolver_spec));
        json_object_set_new(c, "target", json_string(op->rr));
        char *cs = json_dumps(c, JSON_COMPACT | JSON_SORT_KEYS);
        json_decref(c);
        return cs;
    }
    json_t *j = json_pack("{s:s,s:s,s:s,s:s,s:s,s:s,s:s}", "provider", "rfc2136", "name", op->name,
                          "fqdn", op->fqdn, "value", op->value, "server", op->server_host, "tsig",
                          op->tsig_path, "zone", op->zone);
    char port[16];
    snprintf(port, sizeof port, "%d", op->server_port);
    json_object_set_new(j, "port", json_string(port));
    json_object_set_new(j, "owner", json_string(op->d->owner));
    json_object_set_new(j, "target", json_string(op->rr));
    if (op->resolver_spec)
        json_object_set_new(j, "resolver", json_string(op->resolver_spec));
    char *s = json_dumps(j, JSON_COMPACT | JSON_SORT_KEYS);
    json_decref(j);
    return s;
}

static void on_update(op_t *op, int rc, const moat_dns_msg_t *m)
{
    char where[80];
    addr_text(&op->server, where, sizeof where);
    const char *what = op->kind == OP_ADD ? "add" : "delete";
    if (rc != 0) {
        op_fail(op, rc, "the DNS server %s did not answer the update (%s): %s", where, what,
                exch_why(rc));
        return;
    }
    int terr = 0;
    int v = moat_dns_tsig_verify(m, &op->key, op->mac, (uint64_t)time(NULL), &terr);
    if (terr == MOAT_DNS_BADKEY || terr == MOAT_DNS_BADSIG || terr == MOAT_DNS_BADTIME ||
        (m->rcode == MOAT_DNS_NOTAUTH && v == MOAT_ENOT_FOUND)) {
        const char *why = terr == MOAT_DNS_BADKEY ? "it does not know the key"
                          : terr == MOAT_DNS_BADSIG
                              ? "the signature does not match (the key's secret differs from the "
                                "server's)"
                          : terr == MOAT_DNS_BADTIME ? "the clocks differ by more than 5 minutes"
                                                     : "the key is not allowed to update this zone";
        /* The update was refused, so nothing was made: no delete is needed. */
        op->sent_update = 0;
        op_fail(op, MOAT_EPERM,
                "the DNS server %s refused the TSIG key \"%s\" from %s (%s, %s): %s; check "
                "allow-update in the zone's configuration",
                where, op->key.name, op->tsig_path, moat_dns_rcode_name(m->rcode),
                terr ? moat_dns_rcode_name(terr) : "unsigned answer", why);
        return;
    }
    if (m->rcode != MOAT_DNS_NOERROR) {
        op->sent_update = op->kind == OP_ADD ? 0 : op->sent_update;
        const char *hint =
            m->rcode == MOAT_DNS_REFUSED
                ? "; the key may not change this name: check allow-update or update-policy"
            : m->rcode == MOAT_DNS_NOTZONE || m->rcode == MOAT_DNS_NOTAUTH
                ? "; dns_server= must be the primary of that zone"
                : "";
        op_fail(op, MOAT_EIO,
                "the DNS server %s refused to %s %s TXT in zone %s with key \"%s\": %s%s", where,
                what, op->rr, op->zone, op->key.name, moat_dns_rcode_name(m->rcode), hint);
        return;
    }
    if (v != 0) {
        op_fail(op, MOAT_ECRYPTO,
                "the DNS server %s answered the update without a valid TSIG signature", where);
        return;
    }
    if (op->kind == OP_REMOVE) {
        op->d->st->ops->kv_put(op->d->st, op->rowkey, NULL);
        /* A failure stays what `moat certs` shows; otherwise say the record served and went. */
        char key[600], *v = NULL;
        snprintf(key, sizeof key, MOAT_DNS01_STATE_PREFIX "%s", op->name);
        if (op->d->st->ops->kv_get(op->d->st, key, &v) != 0 || strstr(v, ": failed: ") == NULL)
            set_state(op, "done: %s TXT was published, then deleted", op->rr);
        free(v);
        MOAT_INFO("dns-01: deleted %s TXT \"%s\" (zone %s)", op->rr, op->value, op->zone);
        op_free(op);
        return;
    }
    MOAT_INFO("dns-01: added %s TXT \"%s\" in zone %s through %s", op->rr, op->value, op->zone,
              where);
    if (op->withdrawn) {
        add_end(op, MOAT_ECLOSED, "withdrawn while it was being added");
        return;
    }
    step_ns(op);
}

static void step_update(op_t *op)
{
    char err[512];
    if (op->kind == OP_ADD) {
        char *row = row_json(op);
        int rc = op->d->st->ops->kv_put(op->d->st, op->rowkey, row);
        free(row);
        if (rc != 0) {
            op_fail(op, rc, "cannot remember the record in storage: %s",
                    moat_storage_last_error(op->d->st));
            return;
        }
        if (op->withdrawn) {
            add_end(op, MOAT_ECLOSED, "withdrawn before it was added");
            return;
        }
    }
    uint8_t msg[1400];
    int n = moat_dns_build_update(msg, sizeof msg, new_id(), op->zone, op->rr, RECORD_TTL,
                                  op->value, op->kind == OP_ADD);
    if (n > 0)
        n = moat_dns_tsig_sign(msg, (size_t)n, sizeof msg, &op->key, (uint64_t)time(NULL), op->mac);
    if (n < 0) {
        snprintf(err, sizeof err, "cannot build the update for %s in zone %s", op->rr, op->zone);
        op_fail(op, MOAT_EINVAL, "%s", err);
        return;
    }
    op->sent_update = 1;
    if (op->kind == OP_ADD)
        set_state(op, "adding %s TXT through %s", op->rr, op->server_host);
    exch_start(op, &op->server, msg, (size_t)n, on_update);
}

/* --- propagation -------------------------------------------------------------------------- */

static void propagation_done_without_ns(op_t *op, const char *why)
{
    if (op->provider == MOAT_DNS_CLOUDFLARE) {
        MOAT_WARN("dns-01: cannot find the authoritative servers of %s (%s); telling the CA "
                  "without checking that %s is visible",
                  op->zone, why, op->rr);
        set_state(op, "published %s TXT (not checked); the CA is validating it", op->rr);
        add_end(op, 0, NULL);
        return;
    }
    /* Without the NS set, the primary that took the update is the one server we can ask. */
    MOAT_WARN("dns-01: cannot find the authoritative servers of %s (%s); checking at %s only",
              op->zone, why, op->server_host);
    op->ns[0] = op->server;
    snprintf(op->ns_names[0], sizeof op->ns_names[0], "%s", op->server_host);
    op->nns = 1;
    op->nns_names = 1;
    op->ns_i = 0;
    op->ns_seen = 0;
    step_txt(op);
}

static void on_ns(op_t *op, int rc, const moat_dns_msg_t *m)
{
    if (rc != 0) {
        propagation_done_without_ns(op, exch_why(rc));
        return;
    }
    op->nns_names = 0;
    for (size_t i = 0; i < m->nrr && op->nns_names < MAX_NS; i++) {
        const moat_dns_rr_t *rr = &m->rr[i];
        if (rr->section == MOAT_DNS_ANSWER && rr->type == MOAT_DNS_NS &&
            moat_dns_rr_name(m, rr, op->ns_names[op->nns_names], MOAT_DNS_NAME_MAX) == 0)
            op->nns_names++;
    }
    if (op->nns_names == 0) {
        propagation_done_without_ns(op, moat_dns_rcode_name(m->rcode));
        return;
    }
    /* Glue in the additional section saves the address lookups. */
    op->nns = 0;
    for (size_t k = 0; k < op->nns_names; k++)
        for (size_t i = 0; i < m->nrr; i++) {
            const moat_dns_rr_t *rr = &m->rr[i];
            if (rr->section == MOAT_DNS_ADDITIONAL && rr->type == MOAT_DNS_A && rr->rdlen == 4 &&
                moat_dns_name_eq(rr->name, op->ns_names[k]) && op->nns < MAX_NS) {
                char ip[INET_ADDRSTRLEN];
                inet_ntop(AF_INET, m->msg + rr->rdoff, ip, sizeof ip);
                make_addr(ip, op->ns_port, &op->ns[op->nns]);
                op->nns++;
                break;
            }
        }
    if (op->nns == op->nns_names) {
        op->ns_i = op->ns_seen = 0;
        step_txt(op);
        return;
    }
    op->nns = 0;
    op->ns_name_i = 0;
    step_ns_addr(op);
}

static void step_ns(op_t *op)
{
    uint8_t q[512];
    int n = moat_dns_build_query(q, sizeof q, new_id(), op->zone, MOAT_DNS_NS);
    op->deadline = now_ms(op->d) + op->wait_ms;
    if (n < 0) {
        propagation_done_without_ns(op, "not a valid zone name");
        return;
    }
    exch_start(op, &op->resolver, q, (size_t)n, on_ns);
}

static void on_ns_addr(op_t *op, int rc, const moat_dns_msg_t *m)
{
    size_t before = op->nns;
    if (rc == 0) {
        for (size_t i = 0; i < m->nrr; i++) {
            const moat_dns_rr_t *rr = &m->rr[i];
            if (rr->section == MOAT_DNS_ANSWER && rr->type == MOAT_DNS_A && rr->rdlen == 4) {
                char ip[INET_ADDRSTRLEN];
                inet_ntop(AF_INET, m->msg + rr->rdoff, ip, sizeof ip);
                make_addr(ip, op->ns_port, &op->ns[op->nns]);
                /* Keep the name beside its address: slot nns gets name ns_name_i. */
                if (op->nns != op->ns_name_i)
                    memcpy(op->ns_names[op->nns], op->ns_names[op->ns_name_i], MOAT_DNS_NAME_MAX);
                op->nns++;
                break;
            }
        }
    }
    if (op->nns == before)
        MOAT_WARN("dns-01: the authoritative server %s of %s has no IPv4 address here; not "
                  "checking it",
                  op->ns_names[op->ns_name_i], op->zone);
    op->ns_name_i++;
    step_ns_addr(op);
}

static void step_ns_addr(op_t *op)
{
    if (op->ns_name_i >= op->nns_names) {
        if (op->nns == 0) {
            propagation_done_without_ns(op, "none of its servers has an address");
            return;
        }
        op->ns_i = op->ns_seen = 0;
        step_txt(op);
        return;
    }
    uint8_t q[512];
    int n = moat_dns_build_query(q, sizeof q, new_id(), op->ns_names[op->ns_name_i], MOAT_DNS_A);
    if (n < 0) {
        op->ns_name_i++;
        step_ns_addr(op);
        return;
    }
    exch_start(op, &op->resolver, q, (size_t)n, on_ns_addr);
}

static void poll_fire(uv_timer_t *t)
{
    op_t *op = t->data;
    op->ns_i = op->ns_seen = 0;
    step_txt(op);
}

static void on_txt(op_t *op, int rc, const moat_dns_msg_t *m)
{
    int seen = 0;
    for (size_t i = 0; rc == 0 && i < m->nrr && !seen; i++) {
        char txt[300];
        if (m->rr[i].section == MOAT_DNS_ANSWER && m->rr[i].type == MOAT_DNS_TXT &&
            moat_dns_rr_txt(m, &m->rr[i], txt, sizeof txt) >= 0 && strcmp(txt, op->value) == 0)
            seen = 1;
    }
    op->ns_seen += (size_t)seen;
    op->ns_i++;
    step_txt(op);
}

/* Ask each authoritative server in turn; all of them answering the value ends the wait, else
 * the next round starts after POLL_MS, until the deadline. */
static void step_txt(op_t *op)
{
    if (op->withdrawn) {
        add_end(op, MOAT_ECLOSED, "withdrawn while waiting for it to show");
        return;
    }
    if (op->ns_i == 0 && op->ns_seen == 0 && op->started == 0) {
        char list[600] = "";
        size_t o = 0;
        for (size_t i = 0; i < op->nns && o < sizeof list; i++) {
            char a[80];
            addr_text(&op->ns[i], a, sizeof a);
            o += (size_t)snprintf(list + o, sizeof list - o, "%s%s (%s)", i ? ", " : "",
                                  op->ns_names[i], a);
        }
        op->started = op->last_log = now_ms(op->d);
        MOAT_INFO("dns-01: waiting up to %llu s for %s TXT to show on %zu authoritative "
                  "server(s): %s",
                  (unsigned long long)(op->wait_ms / 1000), op->rr, op->nns, list);
        set_state(op, "waiting up to %llu s for %s TXT on %s",
                  (unsigned long long)(op->wait_ms / 1000), op->rr, list);
    }
    if (op->ns_i < op->nns) {
        uint8_t q[512];
        int n = moat_dns_build_query(q, sizeof q, new_id(), op->rr, MOAT_DNS_TXT);
        if (n < 0) {
            add_end(op, MOAT_EINVAL, "%s is not a valid DNS name", op->rr);
            return;
        }
        /* No recursion wanted: an authoritative answer. */
        q[2] &= (uint8_t)~1u;
        exch_start(op, &op->ns[op->ns_i], q, (size_t)n, on_txt);
        return;
    }
    uint64_t now = now_ms(op->d);
    if (op->ns_seen == op->nns) {
        MOAT_INFO("dns-01: %s TXT is on all %zu authoritative server(s) after %.1f s", op->rr,
                  op->nns, (double)(now - op->started) / 1000.0);
        set_state(op, "published %s TXT; the CA is validating it", op->rr);
        add_end(op, 0, NULL);
        return;
    }
    if (now + POLL_MS > op->deadline) {
        add_end(op, MOAT_ETIMEOUT,
                "%s TXT did not show on all authoritative servers of %s within %llu s (%zu of "
                "%zu answer it); raise dns_wait= if the zone's secondaries are slow",
                op->rr, op->zone, (unsigned long long)(op->wait_ms / 1000), op->ns_seen, op->nns);
        return;
    }
    if (now - op->last_log >= 10000) {
        op->last_log = now;
        MOAT_INFO("dns-01: still waiting for %s TXT: %zu of %zu authoritative server(s) answer "
                  "it after %.0f s (giving up after %llu s)",
                  op->rr, op->ns_seen, op->nns, (double)(now - op->started) / 1000.0,
                  (unsigned long long)(op->wait_ms / 1000));
    }
    uv_timer_start(&op->timer, poll_fire, POLL_MS, 0);
}

/* --- the module --------------------------------------------------------------------------- */

static op_t *op_new(moat_dns01_t *d, int kind, const char *name, const char *value)
{
    op_t *op = moat_xcalloc(1, sizeof *op);
    op->d = d;
    op->kind = kind;
    op->name = moat_xstrdup(name);
    op->value = moat_xstrdup(value);
    size_t fl = strlen(name) + 17;
    op->fqdn = moat_xmalloc(fl);
    snprintf(op->fqdn, fl, "_acme-challenge.%s", name);
    op->rr = moat_xstrdup(op->fqdn);
    size_t kl = strlen(op->fqdn) + strlen(value) + sizeof MOAT_DNS01_RECORD_PREFIX + 2;
    op->rowkey = moat_xmalloc(kl);
    snprintf(op->rowkey, kl, MOAT_DNS01_RECORD_PREFIX "%s|%s", op->fqdn, value);
    uv_timer_init(d->loop, &op->timer);
    op->timer.data = op;
    op->next = d->ops;
    d->ops = op;
    return op;
}

static void set_resolver(op_t *op, const char *spec)
{
    int port = 53;
    if (spec && *spec) {
        char *h = split_hostport(spec, 53, &port);
        if (make_addr(h, port, &op->resolver) != 0)
            system_resolver(&op->resolver);
        free(h);
        op->resolver_spec = moat_xstrdup(spec);
        op->ns_port = port;
    } else {
        system_resolver(&op->resolver);
        op->ns_port = 53;
    }
}

/* Report a failure from the loop, never inside the caller. */
static void later_fail_fire(uv_timer_t *t)
{
    op_t *op = t->data;
    add_end(op, MOAT_EINVAL, "%s", op->zone ? op->zone : "failed");
}

static void fail_later(op_t *op, const char *msg)
{
    free(op->zone);
    op->zone = moat_xstrdup(msg); /* the message rides in zone until the timer fires */
    uv_timer_start(&op->timer, later_fail_fire, 0, 0);
}

/* --- CNAME on _acme-challenge -------------------------------------------------------------- */

static void cf_zone_found(void *arg, int rc, const char *error, const char *zone_id,
                          const char *zone);

/* The record to change is known: on with the provider. */
static void provider_begin(op_t *op)
{
    if (op->provider == MOAT_DNS_CLOUDFLARE) {
        op->http_pending = 1;
        moat_cf_zone(op->d->http, op->api, op->token, op->rr, cf_zone_found, op);
        return;
    }
    step_server(op);
}

static void step_cname(op_t *op);

/* _acme-challenge.<name> may be a CNAME into a zone kept for ACME (a common way to give the
 * updating key no power over the real zone): the record then goes where it points, as the
 * CA follows it too. A failed lookup is no CNAME: the provider step says what is wrong. */
static void on_cname(op_t *op, int rc, const moat_dns_msg_t *m)
{
    for (size_t i = 0; rc == 0 && i < m->nrr; i++) {
        const moat_dns_rr_t *rr = &m->rr[i];
        char target[MOAT_DNS_NAME_MAX];
        if (rr->section == MOAT_DNS_ANSWER && rr->type == MOAT_DNS_CNAME &&
            moat_dns_name_eq(rr->name, op->rr) &&
            moat_dns_rr_name(m, rr, target, sizeof target) == 0) {
            if (++op->cname_hops > 8) {
                add_end(op, MOAT_EINVAL, "%s: too many CNAMEs in a row", op->fqdn);
                return;
            }
            MOAT_INFO("dns-01: %s is a CNAME to %s; the record goes there", op->rr, target);
            free(op->rr);
            op->rr = moat_xstrdup(target);
            step_cname(op);
            return;
        }
    }
    provider_begin(op);
}

static void step_cname(op_t *op)
{
    uint8_t q[512];
    int n = moat_dns_build_query(q, sizeof q, new_id(), op->rr, MOAT_DNS_CNAME);
    if (n < 0) {
        add_end(op, MOAT_EINVAL, "%s is not a valid DNS name", op->rr);
        return;
    }
    exch_start(op, &op->resolver, q, (size_t)n, on_cname);
}

/* --- Cloudflare (server/dns01_cloudflare.c does the HTTP) ---------------------------------- */

static void cf_created(void *arg, int rc, const char *error, const char *zone_id, const char *zone)
{
    op_t *op = arg;
    (void)zone_id, (void)zone;
    if (cf_back(op))
        return;
    if (rc != 0) {
        add_end(op, rc, "%s", error ? error : moat_strerror(rc));
        return;
    }
    MOAT_INFO("dns-01: added %s TXT \"%s\" in Cloudflare zone %s", op->rr, op->value, op->zone);
    if (op->withdrawn) {
        add_end(op, MOAT_ECLOSED, "withdrawn while it was being added");
        return;
    }
    step_ns(op);
}

static void cf_zone_found(void *arg, int rc, const char *error, const char *zone_id,
                          const char *zone)
{
    op_t *op = arg;
    if (cf_back(op))
        return;
    if (rc != 0) {
        add_end(op, rc, "%s", error ? error : moat_strerror(rc));
        return;
    }
    op->zone_id = moat_xstrdup(zone_id);
    op->zone = moat_xstrdup(zone);
    char *row = row_json(op);
    int src = op->d->st->ops->kv_put(op->d->st, op->rowkey, row);
    free(row);
    if (src != 0) {
        add_end(op, src, "cannot remember the record in storage: %s",
                moat_storage_last_error(op->d->st));
        return;
    }
    if (op->withdrawn) {
        add_end(op, MOAT_ECLOSED, "withdrawn before it was added");
        return;
    }
    op->sent_update = 1;
    op->http_pending = 1;
    set_state(op, "adding %s TXT through the Cloudflare API", op->rr);
    moat_cf_create(op->d->http, op->api, op->token, op->zone_id, op->rr, op->value, cf_created, op);
}

static void cf_add_begin(op_t *op, const moat_dns01_cfg_t *cfg)
{
    char err[512];
    if (cfg->token_file == NULL) {
        fail_later(op, "dns=cloudflare needs dns_token_file=");
        return;
    }
    if (op->d->http == NULL) {
        fail_later(op, "no HTTP client for the Cloudflare API (see the log at start)");
        return;
    }
    op->token_file = moat_xstrdup(cfg->token_file);
    op->api = moat_xstrdup(cfg->api && *cfg->api ? cfg->api : MOAT_CF_API_DEFAULT);
    if (load_token(op, err, sizeof err) != 0) {
        fail_later(op, err);
        return;
    }
    step_cname(op);
}

static void cf_removed(void *arg, int rc, const char *error, const char *zone_id, const char *zone)
{
    op_t *op = arg;
    (void)zone_id, (void)zone;
    if (cf_back(op))
        return;
    if (rc != 0) {
        op_fail(op, rc, "%s", error ? error : moat_strerror(rc));
        return;
    }
    op->d->st->ops->kv_put(op->d->st, op->rowkey, NULL);
    MOAT_INFO("dns-01: deleted %s TXT \"%s\" (Cloudflare zone %s)", op->rr, op->value,
              op->zone ? op->zone : "?");
    char key[600], *v = NULL;
    snprintf(key, sizeof key, MOAT_DNS01_STATE_PREFIX "%s", op->name);
    if (op->d->st->ops->kv_get(op->d->st, key, &v) != 0 || strstr(v, ": failed: ") == NULL)
        set_state(op, "done: %s TXT was published, then deleted", op->rr);
    free(v);
    op_free(op);
}

static void cf_remove_begin(op_t *op, json_t *row)
{
    const char *tf = json_string_value(json_object_get(row, "token_file"));
    const char *api = json_string_value(json_object_get(row, "api"));
    const char *zid = json_string_value(json_object_get(row, "zone_id"));
    const char *zone = json_string_value(json_object_get(row, "zone"));
    if (tf == NULL || api == NULL || zid == NULL) {
        MOAT_WARN("dns-01: the stored record %s is malformed; forgetting it", op->rowkey);
        op->d->st->ops->kv_put(op->d->st, op->rowkey, NULL);
        op_free(op);
        return;
    }
    op->provider = MOAT_DNS_CLOUDFLARE;
    if (op->token == NULL) {
        free(op->token_file);
        op->token_file = moat_xstrdup(tf);
        char err[512];
        if (load_token(op, err, sizeof err) != 0) {
            op_fail(op, MOAT_EIO, "%s", err);
            return;
        }
    }
    free(op->api);
    op->api = moat_xstrdup(api);
    free(op->zone);
    op->zone = zone ? moat_xstrdup(zone) : NULL;
    if (op->d->http == NULL) {
        op_fail(op, MOAT_EIO, "no HTTP client for the Cloudflare API");
        return;
    }
    op->http_pending = 1;
    moat_cf_remove(op->d->http, op->api, op->token, zid, op->rr, op->value, cf_removed, op);
}

void moat_dns01_add(moat_dns01_t *d, const moat_dns01_cfg_t *cfg, const char *name,
                    const char *value, moat_acme_dns01_cb cb, void *arg)
{
    op_t *op = op_new(d, OP_ADD, name, value);
    op->cb = cb;
    op->arg = arg;
    op->provider = cfg->provider;
    op->wait_ms = cfg->wait_ms ? cfg->wait_ms : 120000;
    set_resolver(op, cfg->resolver);
    set_state(op, "adding %s TXT", op->rr);
    if (cfg->provider == MOAT_DNS_NONE) {
        fail_later(op, "the site has no dns= provider for the dns-01 challenge");
        return;
    }
    if (cfg->provider == MOAT_DNS_CLOUDFLARE) {
        cf_add_begin(op, cfg);
        return;
    }
    if (cfg->server == NULL || cfg->tsig == NULL) {
        fail_later(op, "dns=rfc2136 needs dns_server= and dns_tsig=");
        return;
    }
    op->server_host = split_hostport(cfg->server, 53, &op->server_port);
    op->tsig_path = moat_xstrdup(cfg->tsig);
    char err[512];
    if (load_key(op, err, sizeof err) != 0) {
        fail_later(op, err);
        return;
    }
    step_cname(op);
}

static void remove_begin(op_t *op)
{
    char *row = NULL;
    moat_storage_t *st = op->d->st;
    if (st->ops->kv_get(st, op->rowkey, &row) != 0) {
        op_free(op); /* nothing was made, or it is already deleted */
        return;
    }
    json_t *j = json_loads(row, 0, NULL);
    free(row);
    const char *target = json_string_value(json_object_get(j, "target"));
    if (target != NULL) {
        free(op->rr);
        op->rr = moat_xstrdup(target);
    }
    const char *provider = json_string_value(json_object_get(j, "provider"));
    if (provider && strcmp(provider, "cloudflare") == 0) {
        cf_remove_begin(op, j);
        json_decref(j);
        return;
    }
    const char *server = json_string_value(json_object_get(j, "server"));
    const char *port = json_string_value(json_object_get(j, "port"));
    const char *tsig = json_string_value(json_object_get(j, "tsig"));
    const char *zone = json_string_value(json_object_get(j, "zone"));
    const char *resolver = json_string_value(json_object_get(j, "resolver"));
    if (server == NULL || tsig == NULL || zone == NULL || port == NULL) {
        json_decref(j);
        MOAT_WARN("dns-01: the stored record %s is malformed; forgetting it", op->rowkey);
        st->ops->kv_put(st, op->rowkey, NULL);
        op_free(op);
        return;
    }
    free(op->server_host);
    free(op->tsig_path);
    free(op->zone);
    free(op->resolver_spec);
    op->resolver_spec = NULL;
    op->server_host = moat_xstrdup(server);
    op->server_port = atoi(port);
    op->tsig_path = moat_xstrdup(tsig);
    op->zone = moat_xstrdup(zone);
    set_resolver(op, resolver);
    json_decref(j);
    char err[512];
    if (op->key.secret_len == 0 && load_key(op, err, sizeof err) != 0) {
        op_fail(op, MOAT_EIO, "%s", err);
        return;
    }
    step_server(op);
}

void moat_dns01_remove(moat_dns01_t *d, const char *name, const char *value)
{
    /* An add of this very record still under way finishes its step, then turns into the
     * delete itself. */
    for (op_t *op = d->ops; op; op = op->next)
        if (op->kind == OP_ADD && !op->freeing && strcmp(op->name, name) == 0 &&
            strcmp(op->value, value) == 0) {
            op->withdrawn = 1;
            return;
        }
    op_t *op = op_new(d, OP_REMOVE, name, value);
    remove_begin(op);
}

void moat_dns01_cleanup(moat_dns01_t *d, int (*gone)(void *arg, const char *owner), void *arg)
{
    moat_kv_t *rows = NULL;
    size_t n = 0;
    if (d->st->ops->kv_list(d->st, MOAT_DNS01_RECORD_PREFIX, &rows, &n) != 0)
        return;
    for (size_t i = 0; i < n; i++) {
        json_t *j = json_loads(rows[i].value ? rows[i].value : "", 0, NULL);
        const char *name = json_string_value(json_object_get(j, "name"));
        const char *value = json_string_value(json_object_get(j, "value"));
        const char *owner = json_string_value(json_object_get(j, "owner"));
        int busy = 0;
        for (op_t *op = d->ops; op && name && value; op = op->next)
            busy |= strcmp(op->name, name) == 0 && strcmp(op->value, value) == 0;
        if (busy || (owner && !gone(arg, owner))) {
            json_decref(j);
            continue;
        }
        if (name && value) {
            MOAT_INFO("dns-01: deleting _acme-challenge.%s TXT \"%s\" left by an earlier run", name,
                      value);
            op_t *op = op_new(d, OP_REMOVE, name, value);
            remove_begin(op);
        } else {
            d->st->ops->kv_put(d->st, rows[i].key, NULL);
        }
        json_decref(j);
    }
    moat_kv_free(rows, n);
}

moat_dns01_t *moat_dns01_new(uv_loop_t *loop, moat_storage_t *st, const char *owner)
{
    moat_dns01_t *d = moat_xcalloc(1, sizeof *d);
    d->owner = moat_xstrdup(owner);
    d->loop = loop;
    d->st = st;
    char err[256];
    d->http = moat_httpc_new(loop, NULL, 30000, err, sizeof err);
    if (d->http == NULL)
        MOAT_WARN("dns-01: no HTTP client for the Cloudflare API: %s", err);
    return d;
}

void moat_dns01_free(moat_dns01_t *d)
{
    if (d == NULL)
        return;
    while (d->ops) {
        op_t *op = d->ops;
        op_report(op, MOAT_ECLOSED, "moat is stopping");
        op_free(op);
    }
    /* Calls in flight report MOAT_ECLOSED now; their operations finish freeing then. */
    if (d->http)
        moat_httpc_free(d->http);
    free(d->owner);
    free(d);
}
