/* The PostgreSQL protocol v3, sans-I/O (include/moat/pgwire.h). Message layouts follow the
 * PostgreSQL documentation, "Frontend/Backend Protocol" → "Message Formats"; SCRAM follows
 * RFC 5802 and RFC 7677, channel binding RFC 5929. */
#include "moat/pgwire.h"

#include <openssl/base64.h>
#include <openssl/crypto.h>
#include <openssl/digest.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/mem.h>
#include <openssl/rand.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>

#define PROTOCOL_3      196608   /* 3 << 16 */
#define SSL_REQUEST     80877103 /* 1234 << 16 | 5679 */
#define SCRAM_MAX_ITERS 1000000
#define SCRAM_MIN_ITERS 1

/* ---- encoding ---- */

static void put32(char *p, uint32_t v)
{
    p[0] = (char)(v >> 24);
    p[1] = (char)(v >> 16);
    p[2] = (char)(v >> 8);
    p[3] = (char)v;
}

static uint32_t get32(const char *p)
{
    const unsigned char *u = (const unsigned char *)p;
    return (uint32_t)u[0] << 24 | (uint32_t)u[1] << 16 | (uint32_t)u[2] << 8 | u[3];
}

static uint16_t get16(const char *p)
{
    const unsigned char *u = (const unsigned char *)p;
    return (uint16_t)(u[0] << 8 | u[1]);
}

/* A message under construction: its start offset in the buffer, so the length can be filled
 * in when it ends. type 0 is the untyped startup family. */
typedef struct {
    moat_buf_t *b;
    size_t start;
    int failed;
} msg_t;

static msg_t msg_begin(moat_buf_t *b, char type)
{
    msg_t m = {b, moat_buf_size(b), 0};
    char hdr[5] = {type, 0, 0, 0, 0};
    if (moat_buf_append(b, type ? hdr : hdr + 1, type ? 5 : 4) != 0)
        m.failed = 1;
    return m;
}

static void msg_bytes(msg_t *m, const void *p, size_t n)
{
    if (!m->failed && n > 0 && moat_buf_append(m->b, p, n) != 0)
        m->failed = 1;
}

static void msg_u32(msg_t *m, uint32_t v)
{
    char p[4];
    put32(p, v);
    msg_bytes(m, p, 4);
}

static void msg_u16(msg_t *m, uint16_t v)
{
    char p[2] = {(char)(v >> 8), (char)v};
    msg_bytes(m, p, 2);
}

static void msg_str(msg_t *m, const char *s)
{
    msg_bytes(m, s, strlen(s) + 1);
}

/* Fill in the length; a message over the protocol's limit, or one that ran out of memory, is
 * taken back out of the buffer whole. */
static int msg_end(msg_t *m, int typed)
{
    size_t len = moat_buf_size(m->b) - m->start - (typed ? 1 : 0);
    if (!m->failed && len > 0x3fffffff)
        m->failed = 2;
    if (m->failed) {
        if (moat_buf_size(m->b) >= m->start)
            m->b->len = m->b->off + m->start;
        return m->failed == 2 ? MOAT_EINVAL : MOAT_ENOMEM;
    }
    put32(moat_buf_data(m->b) + m->start + (typed ? 1 : 0), (uint32_t)len);
    return 0;
}

int moat_pgw_ssl_request(moat_buf_t *b)
{
    msg_t m = msg_begin(b, 0);
    msg_u32(&m, SSL_REQUEST);
    return msg_end(&m, 0);
}

int moat_pgw_startup(moat_buf_t *b, const char *user, const char *database, const char *app)
{
    if (user == NULL)
        return MOAT_EINVAL;
    msg_t m = msg_begin(b, 0);
    msg_u32(&m, PROTOCOL_3);
    msg_str(&m, "user");
    msg_str(&m, user);
    msg_str(&m, "database");
    msg_str(&m, database ? database : user);
    if (app != NULL) {
        msg_str(&m, "application_name");
        msg_str(&m, app);
    }
    /* Every value comes back and goes out as UTF-8, whatever the database's default. */
    msg_str(&m, "client_encoding");
    msg_str(&m, "UTF8");
    msg_bytes(&m, "", 1);
    return msg_end(&m, 0);
}

int moat_pgw_sasl_initial(moat_buf_t *b, const char *mechanism, const void *data, size_t len)
{
    if (len > 0x3fff0000)
        return MOAT_EINVAL;
    msg_t m = msg_begin(b, 'p');
    msg_str(&m, mechanism);
    msg_u32(&m, (uint32_t)len);
    msg_bytes(&m, data, len);
    return msg_end(&m, 1);
}

int moat_pgw_sasl_response(moat_buf_t *b, const void *data, size_t len)
{
    msg_t m = msg_begin(b, 'p');
    msg_bytes(&m, data, len);
    return msg_end(&m, 1);
}

int moat_pgw_password(moat_buf_t *b, const char *password)
{
    msg_t m = msg_begin(b, 'p');
    msg_str(&m, password);
    return msg_end(&m, 1);
}

int moat_pgw_parse(moat_buf_t *b, const char *stmt, const char *sql)
{
    msg_t m = msg_begin(b, 'P');
    msg_str(&m, stmt ? stmt : "");
    msg_str(&m, sql);
    msg_u16(&m, 0); /* parameter types: the server infers them */
    return msg_end(&m, 1);
}

int moat_pgw_bind(moat_buf_t *b, const char *stmt, size_t n, const char *const *values,
                  const size_t *lens, const int *binary)
{
    if (n > 0xffff)
        return MOAT_EINVAL;
    for (size_t i = 0; i < n; i++)
        if (values[i] != NULL && lens[i] > 0x3fff0000)
            return MOAT_EINVAL;
    msg_t m = msg_begin(b, 'B');
    msg_str(&m, "");
    msg_str(&m, stmt ? stmt : "");
    msg_u16(&m, (uint16_t)n);
    for (size_t i = 0; i < n; i++)
        msg_u16(&m, binary != NULL && binary[i] ? 1 : 0);
    msg_u16(&m, (uint16_t)n);
    for (size_t i = 0; i < n; i++) {
        if (values[i] == NULL) {
            msg_u32(&m, 0xffffffffu);
            continue;
        }
        msg_u32(&m, (uint32_t)lens[i]);
        msg_bytes(&m, values[i], lens[i]);
    }
    msg_u16(&m, 0); /* results: all text */
    return msg_end(&m, 1);
}

int moat_pgw_describe(moat_buf_t *b, char kind, const char *name)
{
    if (kind != 'P' && kind != 'S')
        return MOAT_EINVAL;
    msg_t m = msg_begin(b, 'D');
    msg_bytes(&m, &kind, 1);
    msg_str(&m, name ? name : "");
    return msg_end(&m, 1);
}

int moat_pgw_execute(moat_buf_t *b, const char *portal, uint32_t max_rows)
{
    msg_t m = msg_begin(b, 'E');
    msg_str(&m, portal ? portal : "");
    msg_u32(&m, max_rows);
    return msg_end(&m, 1);
}

int moat_pgw_sync(moat_buf_t *b)
{
    msg_t m = msg_begin(b, 'S');
    return msg_end(&m, 1);
}

int moat_pgw_terminate(moat_buf_t *b)
{
    msg_t m = msg_begin(b, 'X');
    return msg_end(&m, 1);
}

/* ---- decoding ---- */

/* A cursor over a message body; any read past the end marks it bad. */
typedef struct {
    const char *p, *end;
    int bad;
} cur_t;

static int32_t cur_i32(cur_t *c)
{
    if (c->end - c->p < 4) {
        c->bad = 1;
        return 0;
    }
    int32_t v = (int32_t)get32(c->p);
    c->p += 4;
    return v;
}

static uint16_t cur_u16(cur_t *c)
{
    if (c->end - c->p < 2) {
        c->bad = 1;
        return 0;
    }
    uint16_t v = get16(c->p);
    c->p += 2;
    return v;
}

/* A NUL-terminated string inside the body, as a slice without the NUL. */
static moat_slice_t cur_str(cur_t *c)
{
    const char *nul = c->p < c->end ? memchr(c->p, 0, (size_t)(c->end - c->p)) : NULL;
    if (nul == NULL) {
        c->bad = 1;
        return moat_slice(NULL, 0);
    }
    moat_slice_t s = moat_slice(c->p, (size_t)(nul - c->p));
    c->p = nul + 1;
    return s;
}

static moat_slice_t cur_rest(cur_t *c)
{
    moat_slice_t s = moat_slice(c->p, (size_t)(c->end - c->p));
    c->p = c->end;
    return s;
}

static int bad(char *err, size_t errlen, const char *what, char type)
{
    moat_errf(err, errlen, "the server sent a malformed %s message (type '%c')", what,
              type >= 0x20 && type < 0x7f ? type : '?');
    return MOAT_EPARSE;
}

static int decode_error(cur_t *c, moat_pgw_error_t *e)
{
    memset(e, 0, sizeof *e);
    for (;;) {
        if (c->p >= c->end)
            return -1;
        char field = *c->p++;
        if (field == 0)
            return c->p == c->end ? 0 : -1;
        moat_slice_t v = cur_str(c);
        if (c->bad)
            return -1;
        switch (field) {
        case 'V': e->severity = v; break; /* never localised: preferred over 'S' */
        case 'S':
            if (e->severity.base == NULL)
                e->severity = v;
            break;
        case 'C': e->code = v; break;
        case 'M': e->message = v; break;
        case 'D': e->detail = v; break;
        case 'H': e->hint = v; break;
        case 'W': e->where = v; break;
        case 'n': e->constraint = v; break;
        default: break; /* fields added later are skipped, as the protocol asks */
        }
    }
}

/* Walk a DataRow's columns; -1 when they do not fill the body exactly. */
static int walk_row(const char *p, const char *end, uint16_t ncols, uint16_t want,
                    moat_slice_t *val, int *is_null)
{
    cur_t c = {p, end, 0};
    for (uint16_t i = 0; i < ncols; i++) {
        int32_t len = cur_i32(&c);
        if (c.bad || len < -1 || (len > 0 && c.end - c.p < len))
            return -1;
        if (i == want && val != NULL) {
            *val = len < 0 ? moat_slice(NULL, 0) : moat_slice(c.p, (size_t)len);
            *is_null = len < 0;
            return 0;
        }
        if (len > 0)
            c.p += len;
    }
    return val == NULL && c.p == c.end ? 0 : -1;
}

int moat_pgw_row_col(const moat_pgw_msg_t *msg, uint16_t i, moat_slice_t *val, int *is_null)
{
    if (msg->type != 'D' || i >= msg->u.row.ncols)
        return MOAT_EINVAL;
    int n = 0;
    if (is_null == NULL)
        is_null = &n;
    return walk_row(msg->body.base + 2, msg->body.base + msg->body.len, msg->u.row.ncols, i, val,
                    is_null) == 0
               ? 0
               : MOAT_EINVAL;
}

int moat_pgw_next(const void *data, size_t len, moat_pgw_msg_t *msg, size_t *used, char *err,
                  size_t errlen)
{
    const char *p = data;
    memset(msg, 0, sizeof *msg);
    *used = 0;
    if (len < 5)
        return 0;
    char type = p[0];
    uint32_t mlen = get32(p + 1);
    if (mlen < 4 || mlen > MOAT_PGW_MAX_MSG) {
        moat_errf(err, errlen,
                  "the server sent a message of %u bytes (type '%c'); is this a PostgreSQL "
                  "server?",
                  (unsigned)mlen, type >= 0x20 && type < 0x7f ? type : '?');
        return MOAT_EPARSE;
    }
    if (len - 1 < mlen)
        return 0;
    msg->type = type;
    msg->body = moat_slice(p + 5, mlen - 4);
    cur_t c = {p + 5, p + 1 + mlen, 0};
    switch (type) {
    case 'R':
        msg->u.auth.code = cur_i32(&c);
        msg->u.auth.data = cur_rest(&c);
        if (c.bad)
            return bad(err, errlen, "authentication", type);
        if (msg->u.auth.code == MOAT_PGW_AUTH_SASL) {
            /* A list of NUL-terminated names ending with an empty one. */
            cur_t l = {msg->u.auth.data.base, msg->u.auth.data.base + msg->u.auth.data.len, 0};
            while (!l.bad && cur_str(&l).len > 0)
                ;
            if (l.bad || l.p != l.end)
                return bad(err, errlen, "SASL mechanism list", type);
        }
        break;
    case 'E':
    case 'N':
        if (decode_error(&c, &msg->u.error) != 0)
            return bad(err, errlen, type == 'E' ? "error" : "notice", type);
        break;
    case 'S':
        msg->u.param.name = cur_str(&c);
        msg->u.param.value = cur_str(&c);
        if (c.bad || c.p != c.end)
            return bad(err, errlen, "parameter status", type);
        break;
    case 'K':
        msg->u.key.pid = cur_i32(&c);
        msg->u.key.key = cur_i32(&c);
        if (c.bad || c.p != c.end)
            return bad(err, errlen, "backend key", type);
        break;
    case 'Z':
        if (c.end - c.p != 1 || (c.p[0] != 'I' && c.p[0] != 'T' && c.p[0] != 'E'))
            return bad(err, errlen, "ready-for-query", type);
        msg->u.ready = c.p[0];
        break;
    case 'D':
        msg->u.row.ncols = cur_u16(&c);
        if (c.bad || walk_row(c.p, c.end, msg->u.row.ncols, 0xffff, NULL, NULL) != 0)
            return bad(err, errlen, "data row", type);
        break;
    case 'T': {
        msg->u.desc.nfields = cur_u16(&c);
        for (uint16_t i = 0; i < msg->u.desc.nfields && !c.bad; i++) {
            cur_str(&c);
            cur_i32(&c); /* table oid */
            cur_u16(&c); /* column number */
            cur_i32(&c); /* type oid */
            cur_u16(&c); /* type size */
            cur_i32(&c); /* type modifier */
            cur_u16(&c); /* format */
        }
        if (c.bad || c.p != c.end)
            return bad(err, errlen, "row description", type);
        break;
    }
    case 'C':
        msg->u.tag = cur_str(&c);
        if (c.bad || c.p != c.end)
            return bad(err, errlen, "command complete", type);
        break;
    case 'A':
        msg->u.notify.pid = cur_i32(&c);
        msg->u.notify.channel = cur_str(&c);
        msg->u.notify.payload = cur_str(&c);
        if (c.bad || c.p != c.end)
            return bad(err, errlen, "notification", type);
        break;
    case '1': /* ParseComplete */
    case '2': /* BindComplete */
    case '3': /* CloseComplete */
    case 'n': /* NoData */
    case 's': /* PortalSuspended */
    case 'I': /* EmptyQueryResponse */
        if (c.p != c.end)
            return bad(err, errlen, "empty", type);
        break;
    case 't': { /* ParameterDescription */
        uint16_t n = cur_u16(&c);
        if (c.bad || (size_t)(c.end - c.p) != (size_t)n * 4)
            return bad(err, errlen, "parameter description", type);
        break;
    }
    case 'v': /* NegotiateProtocolVersion: newest minor version, then unrecognised options */
        cur_i32(&c);
        {
            int32_t n = cur_i32(&c);
            for (int32_t i = 0; i < n && !c.bad; i++)
                cur_str(&c);
        }
        if (c.bad || c.p != c.end)
            return bad(err, errlen, "protocol negotiation", type);
        break;
    default:
        /* COPY and function-call messages are never asked for. */
        moat_errf(err, errlen, "the server sent an unexpected message (type 0x%02x)",
                  (unsigned char)type);
        return MOAT_EPARSE;
    }
    *used = 1 + mlen;
    return 1;
}

static void put_slice(char *out, size_t cap, size_t *at, const char *pre, moat_slice_t s)
{
    if (s.base == NULL || s.len == 0 || *at >= cap)
        return;
    int n = snprintf(out + *at, cap - *at, "%s%.*s", pre, (int)MOAT_MIN(s.len, 400), s.base);
    if (n > 0)
        *at = MOAT_MIN(cap - 1, *at + (size_t)n);
}

void moat_pgw_error_sentence(const moat_pgw_error_t *e, char *out, size_t cap)
{
    if (cap == 0)
        return;
    out[0] = '\0';
    size_t at = 0;
    put_slice(out, cap, &at, "", e->severity);
    put_slice(out, cap, &at, at ? ": " : "", e->message);
    if (at == 0)
        put_slice(out, cap, &at, "", MOAT_SLICE_LIT("the server reported an error"));
    put_slice(out, cap, &at, " (", e->detail);
    if (e->detail.len > 0)
        put_slice(out, cap, &at, "", MOAT_SLICE_LIT(")"));
    put_slice(out, cap, &at, "; hint: ", e->hint);
    put_slice(out, cap, &at, " [SQLSTATE ", e->code);
    if (e->code.len > 0)
        put_slice(out, cap, &at, "", MOAT_SLICE_LIT("]"));
    /* The server's text is shown to people and written to logs: no control bytes. */
    for (size_t i = 0; i < at; i++)
        if ((unsigned char)out[i] < 0x20)
            out[i] = ' ';
}

int moat_pgw_sasl_offers(moat_slice_t list, const char *mech)
{
    cur_t c = {list.base, list.base + list.len, 0};
    for (;;) {
        moat_slice_t m = cur_str(&c);
        if (c.bad || m.len == 0)
            return 0;
        if (moat_slice_eq(m, mech))
            return 1;
    }
}

/* ---- SCRAM-SHA-256 ---- */

static char *b64(const void *p, size_t n)
{
    size_t cap = 0;
    EVP_EncodedLength(&cap, n);
    char *out = moat_xmalloc(cap);
    EVP_EncodeBlock((uint8_t *)out, p, n);
    return out;
}

static char *dup_slice(moat_slice_t s)
{
    return moat_xstrndup(s.base ? s.base : "", s.len);
}

void moat_pgw_scram_clear(moat_pgw_scram_t *s)
{
    free(s->client_first_bare);
    free(s->gs2);
    free(s->cbind);
    free(s->auth_message);
    OPENSSL_cleanse(s, sizeof *s);
}

int moat_pgw_scram_first(moat_pgw_scram_t *s, const char *nonce, const void *cbind,
                         size_t cbind_len, int over_tls, moat_buf_t *out)
{
    memset(s, 0, sizeof *s);
    if (nonce == NULL) {
        unsigned char raw[18];
        RAND_bytes(raw, sizeof raw);
        char *n = b64(raw, sizeof raw);
        snprintf(s->nonce, sizeof s->nonce, "%s", n);
        free(n);
    } else {
        if (strlen(nonce) >= sizeof s->nonce || strchr(nonce, ',') != NULL)
            return MOAT_EINVAL;
        snprintf(s->nonce, sizeof s->nonce, "%s", nonce);
    }
    /* The user name is sent empty: PostgreSQL takes it from the startup message. */
    s->gs2 = moat_xstrdup(cbind != NULL ? "p=tls-server-end-point,," : over_tls ? "y,," : "n,,");
    if (cbind != NULL) {
        s->cbind = moat_xmalloc(cbind_len ? cbind_len : 1);
        memcpy(s->cbind, cbind, cbind_len);
        s->cbind_len = cbind_len;
    }
    size_t n = strlen(s->nonce) + sizeof "n=,r=";
    s->client_first_bare = moat_xmalloc(n);
    snprintf(s->client_first_bare, n, "n=,r=%s", s->nonce);
    if (moat_buf_puts(out, s->gs2) != 0 || moat_buf_puts(out, s->client_first_bare) != 0)
        return MOAT_ENOMEM;
    return 0;
}

static int hmac(const void *key, size_t klen, const void *msg, size_t mlen, unsigned char out[32])
{
    unsigned int olen = 32;
    return HMAC(EVP_sha256(), key, klen, msg, mlen, out, &olen) != NULL ? 0 : MOAT_ECRYPTO;
}

/* server-first: "r=<nonce>,s=<salt>,i=<iterations>" with possible extensions after. */
static int parse_server_first(moat_slice_t m, moat_slice_t *nonce, moat_slice_t *salt, long *iters)
{
    const char *p = m.base, *end = m.base + m.len;
    moat_slice_t parts[3] = {{0}};
    const char keys[3] = {'r', 's', 'i'};
    if (p == NULL)
        return -1;
    /* "m=" (mandatory extension) is refused by the caller: none is defined. */
    for (int i = 0; i < 3; i++) {
        if (end - p < 2 || p[0] != keys[i] || p[1] != '=')
            return -1;
        p += 2;
        const char *comma = memchr(p, ',', (size_t)(end - p));
        const char *stop = comma ? comma : end;
        parts[i] = moat_slice(p, (size_t)(stop - p));
        p = comma ? comma + 1 : end;
        if (i < 2 && comma == NULL)
            return -1;
    }
    *nonce = parts[0];
    *salt = parts[1];
    if (parts[2].len == 0 || parts[2].len > 9)
        return -1;
    long v = 0;
    for (size_t i = 0; i < parts[2].len; i++) {
        char ch = parts[2].base[i];
        if (ch < '0' || ch > '9')
            return -1;
        v = v * 10 + (ch - '0');
    }
    *iters = v;
    return 0;
}

int moat_pgw_scram_final(moat_pgw_scram_t *s, const char *password, moat_slice_t server_first,
                         moat_buf_t *out, char *err, size_t errlen)
{
    moat_slice_t rnonce, salt_b64;
    long iters = 0;
    if (s->client_first_bare == NULL)
        return MOAT_EINVAL;
    if (parse_server_first(server_first, &rnonce, &salt_b64, &iters) != 0) {
        moat_errf(err, errlen, "the server's SCRAM challenge is malformed");
        return MOAT_EPARSE;
    }
    size_t nl = strlen(s->nonce);
    if (rnonce.len <= nl || memcmp(rnonce.base, s->nonce, nl) != 0 ||
        memchr(rnonce.base, 0, rnonce.len) != NULL) {
        moat_errf(err, errlen, "the server's SCRAM nonce does not extend ours");
        return MOAT_EPARSE;
    }
    if (iters < SCRAM_MIN_ITERS || iters > SCRAM_MAX_ITERS) {
        moat_errf(err, errlen, "the server asks for %ld SCRAM iterations (moat accepts %d to %d)",
                  iters, SCRAM_MIN_ITERS, SCRAM_MAX_ITERS);
        return MOAT_EPARSE;
    }
    uint8_t salt[256];
    size_t salt_len = 0;
    if (salt_b64.len == 0 || salt_b64.len > 340 ||
        !EVP_DecodeBase64(salt, &salt_len, sizeof salt, (const uint8_t *)salt_b64.base,
                          salt_b64.len)) {
        moat_errf(err, errlen, "the server's SCRAM salt is not valid base64");
        return MOAT_EPARSE;
    }

    /* c= is base64 of the GS2 header followed by the channel-binding data, if any. */
    size_t gl = strlen(s->gs2);
    unsigned char *cb = moat_xmalloc(gl + s->cbind_len + 1);
    memcpy(cb, s->gs2, gl);
    if (s->cbind_len)
        memcpy(cb + gl, s->cbind, s->cbind_len);
    char *cb64 = b64(cb, gl + s->cbind_len);
    free(cb);

    moat_buf_t without = {0};
    int rc = moat_buf_appendf(&without, "c=%s,r=%.*s", cb64, (int)rnonce.len, rnonce.base);
    free(cb64);
    moat_buf_t am = {0};
    if (rc == 0)
        rc = moat_buf_appendf(&am, "%s,%.*s,%.*s", s->client_first_bare, (int)server_first.len,
                              server_first.base, (int)moat_buf_size(&without),
                              moat_buf_data(&without));
    if (rc != 0) {
        rc = MOAT_ENOMEM;
        goto out;
    }
    free(s->auth_message);
    s->auth_message = dup_slice(moat_slice(moat_buf_data(&am), moat_buf_size(&am)));

    unsigned char salted[32], client_key[32], stored_key[32], sig[32], proof[32];
    /* SASLprep is not applied: for ASCII passwords it changes nothing, and PostgreSQL itself
     * falls back to the raw bytes for passwords SASLprep rejects. */
    if (!PKCS5_PBKDF2_HMAC(password, strlen(password), salt, salt_len, (unsigned)iters,
                           EVP_sha256(), sizeof salted, salted) ||
        hmac(salted, 32, "Client Key", 10, client_key) != 0 ||
        hmac(salted, 32, "Server Key", 10, s->server_key) != 0) {
        rc = MOAT_ECRYPTO;
        goto wipe;
    }
    SHA256(client_key, 32, stored_key);
    if (hmac(stored_key, 32, s->auth_message, strlen(s->auth_message), sig) != 0) {
        rc = MOAT_ECRYPTO;
        goto wipe;
    }
    for (int i = 0; i < 32; i++)
        proof[i] = client_key[i] ^ sig[i];
    char *p64 = b64(proof, 32);
    rc = moat_buf_put(out, moat_slice(moat_buf_data(&without), moat_buf_size(&without)));
    if (rc == 0)
        rc = moat_buf_appendf(out, ",p=%s", p64);
    free(p64);
    if (rc != 0)
        rc = MOAT_ENOMEM;
wipe:
    OPENSSL_cleanse(salted, sizeof salted);
    OPENSSL_cleanse(client_key, sizeof client_key);
    OPENSSL_cleanse(stored_key, sizeof stored_key);
out:
    moat_buf_free(&without);
    moat_buf_free(&am);
    if (rc == MOAT_ECRYPTO)
        moat_errf(err, errlen, "SCRAM computation failed");
    return rc;
}

int moat_pgw_scram_verify(moat_pgw_scram_t *s, moat_slice_t server_final, char *err, size_t errlen)
{
    if (s->auth_message == NULL)
        return MOAT_EINVAL;
    if (server_final.len >= 2 && memcmp(server_final.base, "e=", 2) == 0) {
        moat_errf(err, errlen, "the server ended SCRAM with an error: %.*s",
                  (int)MOAT_MIN(server_final.len - 2, 100), server_final.base + 2);
        return MOAT_EPERM;
    }
    unsigned char want[32], got[64];
    size_t got_len = 0;
    const char *comma = server_final.base ? memchr(server_final.base, ',', server_final.len) : NULL;
    size_t vlen = comma ? (size_t)(comma - server_final.base) : server_final.len;
    if (vlen < 2 || vlen > 90 || memcmp(server_final.base, "v=", 2) != 0 ||
        !EVP_DecodeBase64(got, &got_len, sizeof got, (const uint8_t *)server_final.base + 2,
                          vlen - 2) ||
        got_len != 32 ||
        hmac(s->server_key, 32, s->auth_message, strlen(s->auth_message), want) != 0 ||
        CRYPTO_memcmp(want, got, 32) != 0) {
        moat_errf(err, errlen,
                  "the server did not prove it knows the password (SCRAM server signature "
                  "wrong); is something between moat and PostgreSQL?");
        return MOAT_EPERM;
    }
    return 0;
}
