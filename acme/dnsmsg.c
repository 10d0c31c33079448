/* DNS messages for DNS-01 (include/moat/dnsmsg.h): RFC 1035 wire format, RFC 2136 UPDATE and
 * RFC 8945 TSIG with HMAC-SHA256. Pure functions over byte ranges; every read is bounds-checked
 * against the message length, and compression pointers must point strictly backwards, so a
 * hostile answer can neither read past the buffer nor loop. */
#include "moat/dnsmsg.h"
#include "moat/common.h"

#include <openssl/base64.h>
#include <openssl/digest.h>
#include <openssl/hmac.h>
#include <openssl/mem.h>

#include <stdio.h>
#include <string.h>
#include <strings.h>

#define TSIG_ALG   "hmac-sha256"
#define TSIG_FUDGE 300

static int lower(int ch)
{
    return ch >= 'A' && ch <= 'Z' ? ch + 32 : ch;
}

const char *moat_dns_rcode_name(int rcode)
{
    static const char *const names[] = {
        "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP",  "REFUSED", "YXDOMAIN",
        "YXRRSET", "NXRRSET", "NOTAUTH",  "NOTZONE",  NULL,      NULL,      NULL,
        NULL,      NULL,      "BADSIG",   "BADKEY",   "BADTIME",
    };
    static char other[4][16];
    static int next;
    if (rcode >= 0 && (size_t)rcode < MOAT_ARRAY_LEN(names) && names[rcode])
        return names[rcode];
    /* Rare (an unknown code in a log line); a small ring keeps it static without a lock
     * mattering: only the control thread calls this. */
    char *o = other[next++ & 3];
    snprintf(o, sizeof other[0], "RCODE%d", rcode);
    return o;
}

/* --- writing ------------------------------------------------------------------------------ */

typedef struct {
    uint8_t *p;
    size_t len, cap;
    int bad;
} wbuf_t;

static void put(wbuf_t *w, const void *d, size_t n)
{
    if (n == 0)
        return;
    if (w->bad || n > w->cap - w->len) {
        w->bad = 1;
        return;
    }
    memcpy(w->p + w->len, d, n);
    w->len += n;
}

static void put16(wbuf_t *w, uint16_t v)
{
    uint8_t b[2] = {(uint8_t)(v >> 8), (uint8_t)v};
    put(w, b, 2);
}

static void put32(wbuf_t *w, uint32_t v)
{
    uint8_t b[4] = {(uint8_t)(v >> 24), (uint8_t)(v >> 16), (uint8_t)(v >> 8), (uint8_t)v};
    put(w, b, 4);
}

/* A name in wire form, lower-cased (the canonical form TSIG needs; servers compare names
 * case-insensitively anyway). "" and "." are the root. */
static void put_name(wbuf_t *w, const char *name)
{
    size_t n = strlen(name), total = 0;
    if (n > 0 && name[n - 1] == '.')
        n--;
    size_t i = 0;
    while (i < n) {
        const char *dot = memchr(name + i, '.', n - i);
        size_t l = dot ? (size_t)(dot - (name + i)) : n - i;
        if (l == 0 || l > 63) {
            w->bad = 1;
            return;
        }
        uint8_t lab[64];
        lab[0] = (uint8_t)l;
        for (size_t k = 0; k < l; k++) {
            unsigned char ch = (unsigned char)name[i + k];
            if (ch <= 0x20 || ch >= 0x7f || ch == '\\') {
                w->bad = 1;
                return;
            }
            lab[k + 1] = (uint8_t)lower(ch);
        }
        put(w, lab, l + 1);
        total += l + 1;
        i += l + 1;
    }
    put(w, "", 1);
    if (total + 1 > 255)
        w->bad = 1;
}

static void put_header(wbuf_t *w, uint16_t id, uint16_t flags, uint16_t qd, uint16_t an,
                       uint16_t ns, uint16_t ar)
{
    put16(w, id);
    put16(w, flags);
    put16(w, qd);
    put16(w, an);
    put16(w, ns);
    put16(w, ar);
}

int moat_dns_build_query(uint8_t *out, size_t cap, uint16_t id, const char *name, uint16_t qtype)
{
    wbuf_t w = {out, 0, cap, 0};
    put_header(&w, id, 0x0100 /* RD */, 1, 0, 0, 0);
    put_name(&w, name);
    put16(&w, qtype);
    put16(&w, MOAT_DNS_IN);
    return w.bad ? MOAT_EINVAL : (int)w.len;
}

int moat_dns_build_update(uint8_t *out, size_t cap, uint16_t id, const char *zone, const char *name,
                          uint32_t ttl, const char *txt, int add)
{
    size_t tl = strlen(txt);
    if (tl > 255)
        return MOAT_EINVAL;
    wbuf_t w = {out, 0, cap, 0};
    /* Zone section (ZOCOUNT=1, SOA IN), no prerequisites, one update record. */
    put_header(&w, id, MOAT_DNS_OP_UPDATE << 11, 1, 0, 1, 0);
    put_name(&w, zone);
    put16(&w, MOAT_DNS_SOA);
    put16(&w, MOAT_DNS_IN);
    put_name(&w, name);
    put16(&w, MOAT_DNS_TXT);
    put16(&w, add ? MOAT_DNS_IN : MOAT_DNS_CLASS_NONE);
    put32(&w, add ? ttl : 0);
    put16(&w, (uint16_t)(tl + 1));
    uint8_t l = (uint8_t)tl;
    put(&w, &l, 1);
    put(&w, txt, tl);
    return w.bad ? MOAT_EINVAL : (int)w.len;
}

/* The TSIG variables after the key name (RFC 8945 §4.3.3): class ANY, TTL 0, algorithm, time
 * signed, fudge, error, other. */
static void put_tsig_vars(wbuf_t *w, const char *key, const char *alg, uint64_t t, uint16_t fudge,
                          uint16_t error, const uint8_t *other, uint16_t olen)
{
    put_name(w, key);
    put16(w, MOAT_DNS_CLASS_ANY);
    put32(w, 0);
    put_name(w, alg);
    put16(w, (uint16_t)(t >> 32));
    put32(w, (uint32_t)t);
    put16(w, fudge);
    put16(w, error);
    put16(w, olen);
    put(w, other, olen);
}

static int hmac256(const moat_dns_tsig_key_t *k, const uint8_t *req_mac, size_t req_len,
                   const uint8_t *msg, size_t len, const uint8_t *vars, size_t vlen,
                   uint8_t out[32])
{
    HMAC_CTX ctx;
    HMAC_CTX_init(&ctx);
    unsigned ol = 0;
    int ok = HMAC_Init_ex(&ctx, k->secret, k->secret_len, EVP_sha256(), NULL);
    if (ok && req_mac) {
        uint8_t l[2] = {(uint8_t)(req_len >> 8), (uint8_t)req_len};
        ok = HMAC_Update(&ctx, l, 2) && HMAC_Update(&ctx, req_mac, req_len);
    }
    ok = ok && HMAC_Update(&ctx, msg, len) && HMAC_Update(&ctx, vars, vlen) &&
         HMAC_Final(&ctx, out, &ol) && ol == 32;
    HMAC_CTX_cleanup(&ctx);
    return ok ? 0 : MOAT_ECRYPTO;
}

int moat_dns_tsig_sign(uint8_t *msg, size_t len, size_t cap, const moat_dns_tsig_key_t *k,
                       uint64_t now, uint8_t mac[32])
{
    if (len < 12 || len > cap)
        return MOAT_EINVAL;
    uint8_t vars[600];
    wbuf_t v = {vars, 0, sizeof vars, 0};
    put_tsig_vars(&v, k->name, TSIG_ALG, now, TSIG_FUDGE, 0, NULL, 0);
    if (v.bad || hmac256(k, NULL, 0, msg, len, vars, v.len, mac) != 0)
        return MOAT_EINVAL;
    uint16_t id = (uint16_t)(msg[0] << 8 | msg[1]);
    wbuf_t w = {msg, len, cap, 0};
    put_name(&w, k->name);
    put16(&w, MOAT_DNS_TSIG);
    put16(&w, MOAT_DNS_CLASS_ANY);
    put32(&w, 0);
    size_t rdlen_at = w.len;
    put16(&w, 0);
    size_t rd = w.len;
    put_name(&w, TSIG_ALG);
    put16(&w, (uint16_t)(now >> 32));
    put32(&w, (uint32_t)now);
    put16(&w, TSIG_FUDGE);
    put16(&w, 32);
    put(&w, mac, 32);
    put16(&w, id);
    put16(&w, 0);
    put16(&w, 0);
    if (w.bad)
        return MOAT_EINVAL;
    size_t rl = w.len - rd;
    msg[rdlen_at] = (uint8_t)(rl >> 8);
    msg[rdlen_at + 1] = (uint8_t)rl;
    uint16_t ar = (uint16_t)(msg[10] << 8 | msg[11]) + 1;
    msg[10] = (uint8_t)(ar >> 8);
    msg[11] = (uint8_t)ar;
    return (int)w.len;
}

/* --- reading ------------------------------------------------------------------------------ */

static uint16_t get16(const uint8_t *p)
{
    return (uint16_t)(p[0] << 8 | p[1]);
}

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* Read the name at *off (following compression pointers, each strictly backwards) into out as
 * text; *off moves past the name as written there. 0 or MOAT_EPARSE. */
static int read_name(const uint8_t *msg, size_t len, size_t *off, char *out, size_t cap)
{
    size_t pos = *off, o = 0, wire = 0;
    int jumped = 0;
    for (int hops = 0;; hops++) {
        if (pos >= len || hops > 255)
            return MOAT_EPARSE;
        uint8_t l = msg[pos];
        if ((l & 0xC0) == 0xC0) {
            if (pos + 1 >= len)
                return MOAT_EPARSE;
            size_t to = (size_t)(l & 0x3F) << 8 | msg[pos + 1];
            if (to >= pos)
                return MOAT_EPARSE;
            if (!jumped)
                *off = pos + 2;
            jumped = 1;
            pos = to;
            continue;
        }
        if (l & 0xC0)
            return MOAT_EPARSE; /* extended label types: not used by anyone */
        if (l == 0) {
            if (!jumped)
                *off = pos + 1;
            break;
        }
        if (pos + 1 + l > len || (wire += l + 1u) > 254)
            return MOAT_EPARSE;
        if (o > 0) {
            if (o + 1 >= cap)
                return MOAT_EPARSE;
            out[o++] = '.';
        }
        for (size_t k = 0; k < l; k++) {
            unsigned char ch = msg[pos + 1 + k];
            if (ch > 0x20 && ch < 0x7f && ch != '.' && ch != '\\') {
                if (o + 1 >= cap)
                    return MOAT_EPARSE;
                out[o++] = (char)ch;
            } else {
                if (o + 4 >= cap)
                    return MOAT_EPARSE;
                o += (size_t)snprintf(out + o, cap - o, "\\%03u", ch);
            }
        }
        pos += 1u + l;
    }
    if (cap == 0)
        return MOAT_EPARSE;
    out[o] = '\0';
    return 0;
}

int moat_dns_parse(const uint8_t *msg, size_t len, moat_dns_msg_t *m)
{
    memset(m, 0, offsetof(moat_dns_msg_t, rr));
    m->nrr = 0;
    m->msg = msg;
    m->len = len;
    if (len < 12)
        return MOAT_EPARSE;
    m->id = get16(msg);
    uint16_t fl = get16(msg + 2);
    m->qr = fl >> 15;
    m->opcode = (fl >> 11) & 0xF;
    m->aa = (fl >> 10) & 1;
    m->tc = (fl >> 9) & 1;
    m->rcode = fl & 0xF;
    m->qdcount = get16(msg + 4);
    m->ancount = get16(msg + 6);
    m->nscount = get16(msg + 8);
    m->arcount = get16(msg + 10);
    if (m->qdcount > 1)
        return MOAT_EPARSE;
    size_t off = 12;
    if (m->qdcount == 1) {
        if (read_name(msg, len, &off, m->qname, sizeof m->qname) != 0 || off + 4 > len)
            return MOAT_EPARSE;
        m->qtype = get16(msg + off);
        off += 4;
    }
    size_t total = (size_t)m->ancount + m->nscount + m->arcount;
    if (total > MOAT_DNS_MAX_RR)
        return MOAT_EPARSE;
    for (size_t i = 0; i < total; i++) {
        moat_dns_rr_t *rr = &m->rr[i];
        rr->start = (uint16_t)off;
        if (off > 0xFFFF || read_name(msg, len, &off, rr->name, sizeof rr->name) != 0 ||
            off + 10 > len)
            return MOAT_EPARSE;
        rr->type = get16(msg + off);
        rr->cls = get16(msg + off + 2);
        rr->ttl = get32(msg + off + 4);
        rr->rdlen = get16(msg + off + 8);
        off += 10;
        if (off + rr->rdlen > len)
            return MOAT_EPARSE;
        rr->rdoff = (uint16_t)off;
        off += rr->rdlen;
        rr->section = i < m->ancount                ? MOAT_DNS_ANSWER
                      : i < m->ancount + m->nscount ? MOAT_DNS_AUTHORITY
                                                    : MOAT_DNS_ADDITIONAL;
        m->nrr = i + 1;
    }
    /* Trailing bytes after the last record: a malformed message. */
    return off == len ? 0 : MOAT_EPARSE;
}

int moat_dns_rr_name(const moat_dns_msg_t *m, const moat_dns_rr_t *rr, char *out, size_t cap)
{
    if (rr->type != MOAT_DNS_NS && rr->type != MOAT_DNS_CNAME && rr->type != MOAT_DNS_SOA)
        return MOAT_EPARSE;
    size_t off = rr->rdoff;
    /* The name must lie within the rdata (pointers may reach earlier in the message). */
    if (read_name(m->msg, (size_t)rr->rdoff + rr->rdlen, &off, out, cap) != 0)
        return MOAT_EPARSE;
    return 0;
}

int moat_dns_rr_txt(const moat_dns_msg_t *m, const moat_dns_rr_t *rr, char *out, size_t cap)
{
    if (rr->type != MOAT_DNS_TXT || cap == 0)
        return MOAT_EPARSE;
    const uint8_t *p = m->msg + rr->rdoff, *end = p + rr->rdlen;
    size_t o = 0;
    while (p < end) {
        size_t l = *p++;
        if (l > (size_t)(end - p) || o + l >= cap)
            return MOAT_EPARSE;
        memcpy(out + o, p, l);
        o += l;
        p += l;
    }
    out[o] = '\0';
    return (int)o;
}

int moat_dns_name_eq(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    if (la && a[la - 1] == '.')
        la--;
    if (lb && b[lb - 1] == '.')
        lb--;
    return moat_slices_ieq(moat_slice(a, la), moat_slice(b, lb));
}

int moat_dns_tsig_verify(const moat_dns_msg_t *m, const moat_dns_tsig_key_t *k,
                         const uint8_t req_mac[32], uint64_t now, int *tsig_error)
{
    *tsig_error = 0;
    if (m->nrr == 0 || m->rr[m->nrr - 1].type != MOAT_DNS_TSIG ||
        m->rr[m->nrr - 1].section != MOAT_DNS_ADDITIONAL)
        return MOAT_ENOT_FOUND;
    const moat_dns_rr_t *rr = &m->rr[m->nrr - 1];
    /* RDATA: algorithm name, time (48 bits), fudge, MAC size, MAC, original id, error, other. */
    size_t off = rr->rdoff, end = (size_t)rr->rdoff + rr->rdlen;
    char alg[MOAT_DNS_NAME_MAX];
    if (read_name(m->msg, end, &off, alg, sizeof alg) != 0 || off + 10 > end)
        return MOAT_ECRYPTO;
    uint64_t t = (uint64_t)get16(m->msg + off) << 32 | get32(m->msg + off + 2);
    uint16_t fudge = get16(m->msg + off + 6), maclen = get16(m->msg + off + 8);
    off += 10;
    if (off + maclen + 6 > end)
        return MOAT_ECRYPTO;
    const uint8_t *mac = m->msg + off;
    off += maclen;
    uint16_t orig_id = get16(m->msg + off), error = get16(m->msg + off + 2),
             olen = get16(m->msg + off + 4);
    off += 6;
    if (off + olen != end)
        return MOAT_ECRYPTO;
    *tsig_error = error;
    if (error != 0)
        return MOAT_ECRYPTO; /* BADSIG/BADKEY come unsigned; BADTIME we treat the same */
    if (!moat_dns_name_eq(rr->name, k->name) || !moat_dns_name_eq(alg, TSIG_ALG) || maclen != 32)
        return MOAT_ECRYPTO;
    /* The message as it was before the TSIG record was added: original id, ARCOUNT - 1. */
    uint8_t head[12];
    memcpy(head, m->msg, 12);
    head[0] = (uint8_t)(orig_id >> 8);
    head[1] = (uint8_t)orig_id;
    uint16_t ar = (uint16_t)(get16(m->msg + 10) - 1);
    head[10] = (uint8_t)(ar >> 8);
    head[11] = (uint8_t)ar;
    uint8_t vars[600], want[32];
    wbuf_t v = {vars, 0, sizeof vars, 0};
    put_tsig_vars(&v, rr->name, alg, t, fudge, error, m->msg + end - olen, olen);
    if (v.bad)
        return MOAT_ECRYPTO;
    /* The MAC covers the request MAC, the header copy and the rest of the message. */
    HMAC_CTX ctx;
    HMAC_CTX_init(&ctx);
    unsigned ol = 0;
    uint8_t l[2] = {0, 32};
    int ok = HMAC_Init_ex(&ctx, k->secret, k->secret_len, EVP_sha256(), NULL) &&
             (req_mac == NULL || (HMAC_Update(&ctx, l, 2) && HMAC_Update(&ctx, req_mac, 32))) &&
             HMAC_Update(&ctx, head, 12) &&
             HMAC_Update(&ctx, m->msg + 12, (size_t)rr->start - 12) &&
             HMAC_Update(&ctx, vars, v.len) && HMAC_Final(&ctx, want, &ol) && ol == 32;
    HMAC_CTX_cleanup(&ctx);
    if (!ok || CRYPTO_memcmp(want, mac, 32) != 0)
        return MOAT_ECRYPTO;
    if ((now > t ? now - t : t - now) > fudge) {
        *tsig_error = MOAT_DNS_BADTIME;
        return MOAT_ECRYPTO;
    }
    return 0;
}

/* --- key files ---------------------------------------------------------------------------- */

typedef struct {
    const char *p, *end;
    char tok[512];
    int quoted;
} lexer_t;

/* The next token: a word, a "quoted string" or one of { } ;. 0 at the end, -1 on an error. */
static int lex(lexer_t *x)
{
    for (;;) {
        while (x->p < x->end && (*x->p == ' ' || *x->p == '\t' || *x->p == '\n' || *x->p == '\r'))
            x->p++;
        if (x->p >= x->end)
            return 0;
        if (*x->p == '#' || (x->end - x->p >= 2 && x->p[0] == '/' && x->p[1] == '/')) {
            while (x->p < x->end && *x->p != '\n')
                x->p++;
            continue;
        }
        if (x->end - x->p >= 2 && x->p[0] == '/' && x->p[1] == '*') {
            const char *e = NULL;
            for (const char *q = x->p + 2; q + 1 < x->end; q++)
                if (q[0] == '*' && q[1] == '/') {
                    e = q;
                    break;
                }
            if (e == NULL)
                return -1;
            x->p = e + 2;
            continue;
        }
        break;
    }
    size_t n = 0;
    x->quoted = 0;
    if (*x->p == '{' || *x->p == '}' || *x->p == ';') {
        x->tok[n++] = *x->p++;
    } else if (*x->p == '"') {
        x->quoted = 1;
        x->p++;
        while (x->p < x->end && *x->p != '"') {
            if (n + 1 >= sizeof x->tok)
                return -1;
            x->tok[n++] = *x->p++;
        }
        if (x->p >= x->end)
            return -1;
        x->p++;
    } else {
        while (x->p < x->end && !strchr(" \t\r\n{};\"", *x->p)) {
            if (n + 1 >= sizeof x->tok)
                return -1;
            x->tok[n++] = *x->p++;
        }
    }
    x->tok[n] = '\0';
    return 1;
}

static int is(lexer_t *x, const char *lit)
{
    return !x->quoted && strcasecmp(x->tok, lit) == 0;
}

int moat_dns_tsig_key_parse(const char *text, size_t len, moat_dns_tsig_key_t *k, char *err,
                            size_t errlen)
{
    lexer_t x = {.p = text, .end = text + len};
    int have_alg = 0, have_secret = 0, rc = MOAT_EPARSE;
    memset(k, 0, sizeof *k);
    if (lex(&x) != 1 || !is(&x, "key")) {
        moat_errf(err, errlen, "expected 'key \"NAME\" { ... };' as tsig-keygen writes it");
        goto out;
    }
    if (lex(&x) != 1 || x.tok[0] == '\0' || strlen(x.tok) >= sizeof k->name) {
        moat_errf(err, errlen, "expected the key's name after 'key'");
        goto out;
    }
    wbuf_t probe;
    uint8_t pb[300];
    probe = (wbuf_t){pb, 0, sizeof pb, 0};
    put_name(&probe, x.tok);
    if (probe.bad) {
        moat_errf(err, errlen, "the key name is not a valid DNS name");
        goto out;
    }
    size_t nl = strlen(x.tok);
    for (size_t i = 0; i < nl; i++)
        k->name[i] = (char)lower((unsigned char)x.tok[i]);
    if (nl && k->name[nl - 1] == '.')
        k->name[nl - 1] = '\0';
    if (lex(&x) != 1 || !is(&x, "{")) {
        moat_errf(err, errlen, "expected '{' after the key name");
        goto out;
    }
    for (;;) {
        int r = lex(&x);
        if (r != 1) {
            moat_errf(err, errlen, "the key block is not closed with '};'");
            goto out;
        }
        if (is(&x, "}"))
            break;
        if (is(&x, "algorithm")) {
            if (lex(&x) != 1)
                goto bad;
            if (strcasecmp(x.tok, TSIG_ALG) != 0) {
                moat_errf(err, errlen,
                          "algorithm %.40s is not supported: moat signs with hmac-sha256 (make a "
                          "key with 'tsig-keygen -a hmac-sha256 NAME')",
                          x.tok);
                goto out;
            }
            have_alg = 1;
        } else if (is(&x, "secret")) {
            if (lex(&x) != 1)
                goto bad;
            size_t out_len = 0, tl = strlen(x.tok);
            if (!EVP_DecodedLength(&out_len, tl) || out_len > sizeof k->secret ||
                !EVP_DecodeBase64(k->secret, &out_len, sizeof k->secret, (const uint8_t *)x.tok,
                                  tl) ||
                out_len == 0) {
                OPENSSL_cleanse(x.tok, sizeof x.tok);
                moat_errf(err, errlen, "the secret is not valid base64");
                goto out;
            }
            OPENSSL_cleanse(x.tok, sizeof x.tok);
            k->secret_len = out_len;
            have_secret = 1;
        } else {
            moat_errf(err, errlen, "unknown statement '%.40s' in the key block", x.tok);
            goto out;
        }
        if (lex(&x) != 1 || !is(&x, ";"))
            goto bad;
    }
    if (!have_alg || !have_secret) {
        moat_errf(err, errlen, "the key block needs both 'algorithm hmac-sha256;' and 'secret'");
        goto out;
    }
    rc = 0;
    goto out;
bad:
    moat_errf(err, errlen, "expected 'algorithm NAME;' or 'secret \"BASE64\";' in the key block");
out:
    OPENSSL_cleanse(x.tok, sizeof x.tok);
    if (rc != 0)
        OPENSSL_cleanse(k, sizeof *k);
    return rc;
}
