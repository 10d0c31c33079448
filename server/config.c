/* The site-file parser (include/moat/config.h): lines -> tokens -> addresses, upstreams and
 * options. Options are rows of one table; a row names its parser kind and the site field it
 * fills, so adding an option is adding a row. Every error is collected rather than stopping
 * at the first: whoever fixes a site file wants the whole list at once. */
#include "address.h"
#include "moat/config.h"
#include "moat/common.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

/* A slice of the current line with its 1-based column, for messages. */
typedef struct {
    const char *p;
    size_t len;
    int col;
} tok_t;

/* One address already defined, keyed by scheme, host and effective port. */
typedef struct {
    char *key;
    int line, col;
} seen_t;

typedef struct {
    const char *file;
    moat_config_errors_t *errs;
    size_t nerrs; /* added by this parse, including the "too many" one */
    int stopped;
    int line;
    moat_config_t *cfg;
    size_t sitecap;
    seen_t *seen; /* open-addressing hash set, so duplicate checks stay linear */
    size_t nseen, seencap;
    tok_t *toks; /* reused for every line */
    size_t ntoks, tokcap;
} pctx_t;

/* ---- errors ---------------------------------------------------------------------------- */

static void errors_add(moat_config_errors_t *e, const char *file, int line, int col, char *msg)
{
    e->items = moat_xrealloc(e->items, (e->n + 1) * sizeof *e->items);
    e->items[e->n++] = (moat_config_error_t){moat_xstrdup(file), line, col, msg};
}

static char *vfmt(const char *fmt, va_list ap)
{
    va_list ap2;
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap);
    char *s = moat_xmalloc(n > 0 ? (size_t)n + 1 : 1);
    vsnprintf(s, n > 0 ? (size_t)n + 1 : 1, fmt, ap2);
    va_end(ap2);
    return s;
}

static void perr(pctx_t *c, int line, int col, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void perr(pctx_t *c, int line, int col, const char *fmt, ...)
{
    if (c->stopped)
        return;
    if (c->nerrs == MOAT_CONFIG_MAX_ERRORS) {
        /* A binary or badly mangled file would otherwise print a wall of errors. */
        errors_add(c->errs, c->file, 0, 0,
                   moat_xstrdup("too many errors; fix these and run again to see the rest"));
        c->nerrs++;
        c->stopped = 1;
        return;
    }
    va_list ap;
    va_start(ap, fmt);
    char *msg = vfmt(fmt, ap);
    va_end(ap);
    errors_add(c->errs, c->file, line, col, msg);
    c->nerrs++;
}

/* Text the user wrote, made safe to echo: control bytes escaped, long tokens cut. */
#define SHOW_MAX 80
typedef struct {
    char s[SHOW_MAX * 4 + 4];
} shown_t;

static const char *show(shown_t *o, const char *p, size_t n)
{
    size_t j = 0, lim = MOAT_MIN(n, (size_t)SHOW_MAX);
    for (size_t i = 0; i < lim; i++) {
        unsigned char ch = (unsigned char)p[i];
        if (ch < 0x20 || ch == 0x7f)
            j += (size_t)snprintf(o->s + j, sizeof o->s - j, "\\x%02x", ch);
        else
            o->s[j++] = (char)ch;
    }
    if (n > lim) {
        memcpy(o->s + j, "...", 3);
        j += 3;
    }
    o->s[j] = '\0';
    return o->s;
}

static const char *show_tok(shown_t *o, tok_t t)
{
    return show(o, t.p, t.len);
}

/* ---- small text helpers ---------------------------------------------------------------- */

static int tok_ieq(tok_t t, const char *lit)
{
    return moat_slice_ieq(moat_slice(t.p, t.len), lit);
}

/* Levenshtein distance, ASCII case-insensitive; long inputs are never close to a name. */
static size_t edit_distance(const char *a, size_t an, const char *b, size_t bn)
{
    size_t row[33];
    if (an > 32 || bn > 32)
        return SIZE_MAX;
    for (size_t j = 0; j <= bn; j++)
        row[j] = j;
    for (size_t i = 1; i <= an; i++) {
        size_t prev = row[0];
        row[0] = i;
        for (size_t j = 1; j <= bn; j++) {
            size_t cur = row[j];
            size_t cost =
                moat__lower((unsigned char)a[i - 1]) != moat__lower((unsigned char)b[j - 1]);
            size_t best = MOAT_MIN(row[j] + 1, row[j - 1] + 1);
            row[j] = MOAT_MIN(best, prev + cost);
            prev = cur;
        }
    }
    return row[bn];
}

/* The closest name within 2 edits (1 for names of 3 letters or fewer, where 2 edits reach
 * unrelated words such as "no" -> "on"), or NULL. */
static const char *suggest(tok_t t, const char *const *names, size_t n)
{
    const char *best = NULL;
    size_t bestd = SIZE_MAX;
    for (size_t i = 0; i < n; i++) {
        size_t len = strlen(names[i]);
        size_t d = edit_distance(t.p, t.len, names[i], len);
        if (d <= (len <= 3 ? 1u : 2u) && d < bestd) {
            best = names[i];
            bestd = d;
        }
    }
    return best;
}

/* Iterate the comma-separated items of t; *pos starts at 0. An empty token is one empty
 * item, so "a,,b" reports the empty one. */
static int next_item(tok_t t, size_t *pos, tok_t *item)
{
    if (*pos > t.len)
        return 0;
    const char *start = t.p + *pos;
    const char *comma = memchr(start, ',', t.len - *pos);
    size_t n = comma ? (size_t)(comma - start) : t.len - *pos;
    *item = (tok_t){start, n, t.col + (int)*pos};
    *pos += n + 1;
    return 1;
}

static int addr_port(const moat_site_addr_t *a)
{
    return a->port ? a->port : a->plain_http ? 80 : 443;
}

/* "chat.example.com:443", "http://[::1]:8080": how the address is shown in messages. */
static void format_addr(const moat_site_addr_t *a, int https_scheme, char *buf, size_t size)
{
    const char *scheme = a->plain_http ? "http://" : https_scheme ? "https://" : "";
    if (a->kind == MOAT_HOST_IPV6)
        snprintf(buf, size, "%s[%s]:%d", scheme, a->host, addr_port(a));
    else
        snprintf(buf, size, "%s%s:%d", scheme, a->host, addr_port(a));
}

static uint64_t fnv1a(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ull;
    return h;
}

/* Returns the earlier definition of key, or records this one and returns NULL. */
static seen_t *seen_check(pctx_t *c, const char *key, int line, int col)
{
    if ((c->nseen + 1) * 2 > c->seencap) {
        size_t cap = c->seencap ? c->seencap * 2 : 64;
        seen_t *tab = moat_xcalloc(cap, sizeof *tab);
        for (size_t i = 0; i < c->seencap; i++) {
            if (c->seen[i].key == NULL)
                continue;
            size_t j = fnv1a(c->seen[i].key) & (cap - 1);
            while (tab[j].key != NULL)
                j = (j + 1) & (cap - 1);
            tab[j] = c->seen[i];
        }
        free(c->seen);
        c->seen = tab;
        c->seencap = cap;
    }
    size_t j = fnv1a(key) & (c->seencap - 1);
    while (c->seen[j].key != NULL) {
        if (strcmp(c->seen[j].key, key) == 0)
            return &c->seen[j];
        j = (j + 1) & (c->seencap - 1);
    }
    c->seen[j] = (seen_t){moat_xstrdup(key), line, col};
    c->nseen++;
    return NULL;
}

/* ---- the option table ------------------------------------------------------------------ */

typedef struct opt_row opt_row_t;

typedef struct {
    /* Parse v into the row's field; reports its own errors. */
    void (*parse)(pctx_t *c, const opt_row_t *r, moat_site_t *s, tok_t v);
    void (*set_default)(const opt_row_t *r, moat_site_t *s);
    int (*is_default)(const opt_row_t *r, const moat_site_t *s);
    void (*print)(const opt_row_t *r, const moat_site_t *s, FILE *f);
} opt_kind_t;

typedef struct {
    const char *name;
    int value;
} enum_val_t;

struct opt_row {
    const char *name;
    const opt_kind_t *kind;
    size_t off;       /* the field in moat_site_t */
    size_t count_off; /* list kinds: its size_t count */
    int64_t def;
    uint64_t min, max;
    const enum_val_t *vals; /* enum kind, NULL-terminated */
    const char *expect;     /* "expected ..." in messages */
};

#define FIELD(s, r, type)  ((type *)((char *)(s) + (r)->off))
#define CFIELD(s, r, type) ((type const *)((const char *)(s) + (r)->off))

static void bad_value(pctx_t *c, const opt_row_t *r, tok_t v, const char *expect,
                      const char *suggestion)
{
    shown_t sh;
    if (suggestion != NULL)
        perr(c, c->line, v.col, "bad value for %s: expected %s, got '%s'; did you mean '%s'?",
             r->name, expect, show_tok(&sh, v), suggestion);
    else
        perr(c, c->line, v.col, "bad value for %s: expected %s, got '%s'", r->name, expect,
             show_tok(&sh, v));
}

/* enum: an int field set from a list of names. */
static void enum_parse(pctx_t *c, const opt_row_t *r, moat_site_t *s, tok_t v)
{
    const char *names[8];
    size_t n = 0;
    for (const enum_val_t *e = r->vals; e->name != NULL; e++) {
        if (tok_ieq(v, e->name)) {
            *FIELD(s, r, int) = e->value;
            return;
        }
        if (n < MOAT_ARRAY_LEN(names))
            names[n++] = e->name;
    }
    bad_value(c, r, v, r->expect, suggest(v, names, n));
}

static void enum_default(const opt_row_t *r, moat_site_t *s)
{
    *FIELD(s, r, int) = (int)r->def;
}

static int enum_is_default(const opt_row_t *r, const moat_site_t *s)
{
    return *CFIELD(s, r, int) == (int)r->def;
}

static void enum_print(const opt_row_t *r, const moat_site_t *s, FILE *f)
{
    for (const enum_val_t *e = r->vals; e->name != NULL; e++) {
        if (e->value == *CFIELD(s, r, int)) {
            fputs(e->name, f);
            return;
        }
    }
    fprintf(f, "%d", *CFIELD(s, r, int));
}

static const opt_kind_t kind_enum = {enum_parse, enum_default, enum_is_default, enum_print};

/* Unsigned number followed by a unit from a table; case-insensitive. */
typedef struct {
    const char *unit;
    uint64_t mult;
} unit_t;

static int parse_scaled(tok_t v, const unit_t *units, size_t nunits, uint64_t *out)
{
    size_t i = 0;
    uint64_t x = 0;
    while (i < v.len && moat__is_digit((unsigned char)v.p[i])) {
        unsigned d = (unsigned)(v.p[i] - '0');
        if (x > (UINT64_MAX - d) / 10)
            return -1;
        x = x * 10 + d;
        i++;
    }
    if (i == 0)
        return -1;
    tok_t unit = {v.p + i, v.len - i, 0};
    for (size_t k = 0; k < nunits; k++) {
        if (tok_ieq(unit, units[k].unit)) {
            if (x > UINT64_MAX / units[k].mult)
                return -1;
            *out = x * units[k].mult;
            return 0;
        }
    }
    return -1;
}

/* Durations: a bare number is seconds. */
static const unit_t duration_units[] = {
    {"", 1000}, {"ms", 1}, {"s", 1000}, {"m", 60000}, {"h", 3600000}, {"d", 86400000},
};

/* Sizes: K, M, G alone are binary, as in nginx; KB, MB, GB are decimal. */
#define KIB 1024ull
#define MIB (1024 * KIB)
#define GIB (1024 * MIB)
static const unit_t size_units[] = {
    {"", 1},         {"b", 1},     {"k", KIB}, {"kb", 1000},       {"kib", KIB}, {"m", MIB},
    {"mb", 1000000}, {"mib", MIB}, {"g", GIB}, {"gb", 1000000000}, {"gib", GIB},
};

static void format_duration(uint64_t ms, char *buf, size_t size)
{
    static const unit_t order[] = {{"d", 86400000}, {"h", 3600000}, {"m", 60000}, {"s", 1000}};
    for (size_t i = 0; i < MOAT_ARRAY_LEN(order); i++) {
        if (ms != 0 && ms % order[i].mult == 0) {
            snprintf(buf, size, "%llu%s", (unsigned long long)(ms / order[i].mult), order[i].unit);
            return;
        }
    }
    snprintf(buf, size, ms ? "%llums" : "%llus", (unsigned long long)ms);
}

static void duration_parse(pctx_t *c, const opt_row_t *r, moat_site_t *s, tok_t v)
{
    uint64_t ms;
    if (parse_scaled(v, duration_units, MOAT_ARRAY_LEN(duration_units), &ms) < 0) {
        bad_value(c, r, v, r->expect, NULL);
        return;
    }
    if (ms < r->min || ms > r->max) {
        char lo[32], hi[32], expect[96];
        format_duration(r->min, lo, sizeof lo);
        format_duration(r->max, hi, sizeof hi);
        snprintf(expect, sizeof expect, "a duration from %s to %s", lo, hi);
        bad_value(c, r, v, expect, NULL);
        return;
    }
    *FIELD(s, r, uint64_t) = ms;
}

static void u64_default(const opt_row_t *r, moat_site_t *s)
{
    *FIELD(s, r, uint64_t) = (uint64_t)r->def;
}

static int u64_is_default(const opt_row_t *r, const moat_site_t *s)
{
    return *CFIELD(s, r, uint64_t) == (uint64_t)r->def;
}

static void duration_print(const opt_row_t *r, const moat_site_t *s, FILE *f)
{
    char buf[32];
    format_duration(*CFIELD(s, r, uint64_t), buf, sizeof buf);
    fputs(buf, f);
}

static const opt_kind_t kind_duration = {duration_parse, u64_default, u64_is_default,
                                         duration_print};

static void size_parse(pctx_t *c, const opt_row_t *r, moat_site_t *s, tok_t v)
{
    uint64_t n;
    if (tok_ieq(v, "none")) {
        *FIELD(s, r, uint64_t) = 0;
        return;
    }
    if (parse_scaled(v, size_units, MOAT_ARRAY_LEN(size_units), &n) < 0 || n > r->max) {
        bad_value(c, r, v, r->expect, NULL);
        return;
    }
    *FIELD(s, r, uint64_t) = n;
}

static void size_print(const opt_row_t *r, const moat_site_t *s, FILE *f)
{
    static const unit_t order[] = {{"GiB", GIB},    {"GB", 1000000000}, {"MiB", MIB},
                                   {"MB", 1000000}, {"KiB", KIB},       {"KB", 1000}};
    uint64_t n = *CFIELD(s, r, uint64_t);
    if (n == 0) {
        fputs("none", f);
        return;
    }
    for (size_t i = 0; i < MOAT_ARRAY_LEN(order); i++) {
        if (n % order[i].mult == 0) {
            fprintf(f, "%llu%s", (unsigned long long)(n / order[i].mult), order[i].unit);
            return;
        }
    }
    fprintf(f, "%lluB", (unsigned long long)n);
}

static const opt_kind_t kind_size = {size_parse, u64_default, u64_is_default, size_print};

/* A value may be written "in quotes" to hold spaces (the tokenizer keeps quoted spans
 * together); only string values accept that, so the quotes are removed here. */
static int unquote(tok_t *v)
{
    if (v->len == 0 || v->p[0] != '"')
        return memchr(v->p, '"', v->len) == NULL ? 0 : -1;
    if (v->len < 2 || v->p[v->len - 1] != '"' || memchr(v->p + 1, '"', v->len - 2) != NULL)
        return -1;
    v->p++;
    v->len -= 2;
    v->col++;
    return 0;
}

static void string_parse(pctx_t *c, const opt_row_t *r, moat_site_t *s, tok_t v)
{
    tok_t u = v;
    if (unquote(&u) < 0 || u.len == 0) {
        bad_value(c, r, v, r->expect, NULL);
        return;
    }
    *FIELD(s, r, char *) = moat_xstrndup(u.p, u.len);
}

static void ptr_default(const opt_row_t *r, moat_site_t *s)
{
    *FIELD(s, r, void *) = NULL;
}

static int ptr_is_default(const opt_row_t *r, const moat_site_t *s)
{
    return *CFIELD(s, r, void *) == NULL;
}

static void string_print(const opt_row_t *r, const moat_site_t *s, FILE *f)
{
    const char *v = *CFIELD(s, r, char *);
    fprintf(f, strchr(v, ' ') ? "\"%s\"" : "%s", v);
}

/* Secrets are never echoed: `moat validate` output ends up in bug reports. */
static void secret_print(const opt_row_t *r, const moat_site_t *s, FILE *f)
{
    (void)r, (void)s;
    fputs("(set)", f);
}

static const opt_kind_t kind_string = {string_parse, ptr_default, ptr_is_default, string_print};
static const opt_kind_t kind_secret = {string_parse, ptr_default, ptr_is_default, secret_print};

static void email_parse(pctx_t *c, const opt_row_t *r, moat_site_t *s, tok_t v)
{
    const char *at = memchr(v.p, '@', v.len);
    int ok = at != NULL && at > v.p && memchr(at + 1, '@', v.len - (size_t)(at + 1 - v.p)) == NULL;
    if (ok) {
        const char *why;
        size_t dlen = v.len - (size_t)(at + 1 - v.p);
        ok = memchr(at + 1, '.', dlen) != NULL &&
             moat_address_check_name(at + 1, dlen, 0, &why) == 0;
    }
    for (size_t i = 0; ok && i < v.len; i++)
        ok = (unsigned char)v.p[i] > 0x20 && v.p[i] != 0x7f && v.p[i] != '"' && v.p[i] != ',';
    if (!ok) {
        bad_value(c, r, v, r->expect, NULL);
        return;
    }
    *FIELD(s, r, char *) = moat_xstrndup(v.p, v.len);
}

static const opt_kind_t kind_email = {email_parse, ptr_default, ptr_is_default, string_print};

static void list_default(const opt_row_t *r, moat_site_t *s)
{
    *FIELD(s, r, void *) = NULL;
    *(size_t *)((char *)s + r->count_off) = 0;
}

static int list_is_default(const opt_row_t *r, const moat_site_t *s)
{
    return *(const size_t *)((const char *)s + r->count_off) == 0;
}

static void urls_parse(pctx_t *c, const opt_row_t *r, moat_site_t *s, tok_t v)
{
    char ***list = FIELD(s, r, char **);
    size_t *n = (size_t *)((char *)s + r->count_off), pos = 0;
    tok_t it;
    while (next_item(v, &pos, &it)) {
        size_t skip = moat__has_iprefix(it.p, it.len, "https://")  ? 8
                      : moat__has_iprefix(it.p, it.len, "http://") ? 7
                                                                   : 0;
        const char *why;
        moat_hostport_t hp;
        size_t hlen = skip ? it.len - skip : 0;
        const char *slash = skip ? memchr(it.p + skip, '/', hlen) : NULL;
        if (slash != NULL)
            hlen = (size_t)(slash - (it.p + skip));
        if (skip == 0 || memchr(it.p, '"', it.len) != NULL ||
            moat_address_parse_hostport(it.p + skip, hlen, 0, &hp, &why) < 0) {
            bad_value(c, r, it, r->expect, NULL);
            continue;
        }
        free(hp.host);
        *list = moat_xrealloc(*list, (*n + 1) * sizeof **list);
        (*list)[(*n)++] = moat_xstrndup(it.p, it.len);
    }
}

static void urls_print(const opt_row_t *r, const moat_site_t *s, FILE *f)
{
    char **list = *CFIELD(s, r, char **);
    size_t n = *(const size_t *)((const char *)s + r->count_off);
    for (size_t i = 0; i < n; i++)
        fprintf(f, "%s%s", i ? "," : "", list[i]);
}

static const opt_kind_t kind_urls = {urls_parse, list_default, list_is_default, urls_print};

static void cidrs_parse(pctx_t *c, const opt_row_t *r, moat_site_t *s, tok_t v)
{
    moat_cidr_t **list = FIELD(s, r, moat_cidr_t *);
    size_t *n = (size_t *)((char *)s + r->count_off), pos = 0;
    tok_t it;
    while (next_item(v, &pos, &it)) {
        moat_cidr_t cidr;
        if (moat_address_parse_cidr(it.p, it.len, &cidr) < 0) {
            bad_value(c, r, it, r->expect, NULL);
            continue;
        }
        *list = moat_xrealloc(*list, (*n + 1) * sizeof **list);
        (*list)[(*n)++] = cidr;
    }
}

static void cidrs_print(const opt_row_t *r, const moat_site_t *s, FILE *f)
{
    const moat_cidr_t *list = *CFIELD(s, r, moat_cidr_t *);
    size_t n = *(const size_t *)((const char *)s + r->count_off);
    for (size_t i = 0; i < n; i++) {
        char buf[INET6_ADDRSTRLEN];
        inet_ntop(list[i].family, list[i].addr, buf, sizeof buf);
        fprintf(f, "%s%s/%d", i ? "," : "", buf, list[i].prefix);
    }
}

static const opt_kind_t kind_cidrs = {cidrs_parse, list_default, list_is_default, cidrs_print};

/* tls=internal | acme | CERT.pem,KEY.pem: fills tls, tls_cert and tls_key together. */
static void tls_parse(pctx_t *c, const opt_row_t *r, moat_site_t *s, tok_t v)
{
    static const char *const names[] = {"internal", "acme"};
    const char *comma = memchr(v.p, ',', v.len);
    if (comma == NULL) {
        if (tok_ieq(v, "internal"))
            s->tls = MOAT_TLS_INTERNAL;
        else if (tok_ieq(v, "acme"))
            s->tls = MOAT_TLS_ACME;
        else
            bad_value(c, r, v, r->expect, suggest(v, names, MOAT_ARRAY_LEN(names)));
        return;
    }
    size_t clen = (size_t)(comma - v.p), klen = v.len - clen - 1;
    if (clen == 0 || klen == 0 || memchr(comma + 1, ',', klen) != NULL ||
        memchr(v.p, '"', v.len) != NULL) {
        bad_value(c, r, v, r->expect, NULL);
        return;
    }
    s->tls = MOAT_TLS_FILES;
    s->tls_cert = moat_xstrndup(v.p, clen);
    s->tls_key = moat_xstrndup(comma + 1, klen);
}

static void tls_default(const opt_row_t *r, moat_site_t *s)
{
    (void)r;
    s->tls = MOAT_TLS_AUTO;
}

static int tls_is_default(const opt_row_t *r, const moat_site_t *s)
{
    (void)r;
    return s->tls == MOAT_TLS_AUTO;
}

static void tls_print(const opt_row_t *r, const moat_site_t *s, FILE *f)
{
    (void)r;
    if (s->tls == MOAT_TLS_FILES)
        fprintf(f, "%s,%s", s->tls_cert, s->tls_key);
    else
        fputs(s->tls == MOAT_TLS_INTERNAL ? "internal" : "acme", f);
}

static const opt_kind_t kind_tls = {tls_parse, tls_default, tls_is_default, tls_print};

static const enum_val_t on_off[] = {{"on", 1}, {"off", 0}, {NULL, 0}};
static const enum_val_t lb_vals[] = {{"round_robin", MOAT_LB_ROUND_ROBIN},
                                     {"least_conn", MOAT_LB_LEAST_CONN},
                                     {"cookie", MOAT_LB_COOKIE},
                                     {NULL, 0}};

#define SEC    1000ull
#define MINUTE (60 * SEC)
#define HOUR   (60 * MINUTE)
#define DAY    (24 * HOUR)
#define DURATION(name, field, def, min, max)                                                       \
    {                                                                                              \
        name, &kind_duration, offsetof(moat_site_t, field), 0, (int64_t)(def), min, max, NULL,     \
            "a duration like 30s, 5m or 1h"                                                        \
    }
#define LIST(name, kind, field, count, expect)                                                     \
    {                                                                                              \
        name, kind, offsetof(moat_site_t, field), offsetof(moat_site_t, count), 0, 0, 0, NULL,     \
            expect                                                                                 \
    }
#define SIMPLE(name, kind, field, expect)                                                          \
    {                                                                                              \
        name, kind, offsetof(moat_site_t, field), 0, 0, 0, 0, NULL, expect                         \
    }

static const opt_row_t options[] = {
    SIMPLE("tls", &kind_tls, tls, "internal, acme or CERT.pem,KEY.pem"),
    {"max_body", &kind_size, offsetof(moat_site_t, max_body), 0, 0, 0, UINT64_MAX / 2, NULL,
     "a size like 10MB, 512KiB or none"},
    {"hsts", &kind_enum, offsetof(moat_site_t, hsts), 0, -1, 0, 0, on_off, "on or off"},
    DURATION("connect_timeout", connect_timeout_ms, 10 * SEC, 1, HOUR),
    DURATION("read_timeout", read_timeout_ms, 30 * MINUTE, 1, 7 * DAY),
    DURATION("header_timeout", header_timeout_ms, 30 * SEC, 1, HOUR),
    DURATION("keepalive_timeout", keepalive_timeout_ms, 5 * MINUTE, 1, 7 * DAY),
    DURATION("ws_idle_timeout", ws_idle_timeout_ms, HOUR, 1, 7 * DAY),
    /* 0 is allowed here: it means idle upstream connections are not kept at all. */
    DURATION("pool_idle", pool_idle_ms, 4 * SEC, 0, DAY),
    LIST("trusted_proxies", &kind_cidrs, trusted, ntrusted,
         "address ranges like 10.0.0.0/8 or fd00::/8"),
    {"lb", &kind_enum, offsetof(moat_site_t, lb), 0, MOAT_LB_ROUND_ROBIN, 0, 0, lb_vals,
     "round_robin, least_conn or cookie"},
    {"h2_websocket", &kind_enum, offsetof(moat_site_t, h2_websocket), 0, 1, 0, 0, on_off,
     "on or off"},
    SIMPLE("email", &kind_email, email, "an address like admin@example.com"),
    LIST("ca", &kind_urls, cas, ncas,
         "ACME directory URLs like https://acme-v02.api.letsencrypt.org/directory"),
    SIMPLE("preferred_chain", &kind_string, preferred_chain,
           "a chain name like \"ISRG Root X1\" (in quotes when it has spaces)"),
    SIMPLE("eab_kid", &kind_string, eab_kid, "a key identifier from your CA"),
    SIMPLE("eab_hmac", &kind_secret, eab_hmac, "the HMAC key from your CA"),
};

#define NOPTIONS MOAT_ARRAY_LEN(options)

static size_t find_option(const char *name)
{
    for (size_t i = 0; i < NOPTIONS; i++)
        if (strcmp(options[i].name, name) == 0)
            return i;
    return NOPTIONS;
}

/* ---- sites and lines ------------------------------------------------------------------- */

static void site_clear(moat_site_t *s)
{
    for (size_t i = 0; i < s->naddrs; i++)
        free(s->addrs[i].host);
    free(s->addrs);
    for (size_t i = 0; i < s->nupstreams; i++) {
        free(s->upstreams[i].host);
        free(s->upstreams[i].path);
    }
    free(s->upstreams);
    free(s->tls_cert);
    free(s->tls_key);
    free(s->trusted);
    free(s->email);
    for (size_t i = 0; i < s->ncas; i++)
        free(s->cas[i]);
    free(s->cas);
    free(s->preferred_chain);
    free(s->eab_kid);
    moat_secret_free(s->eab_hmac);
    memset(s, 0, sizeof *s);
}

/* Splits on spaces and tabs; a '#' that starts a token starts a comment; a "quoted" span
 * inside a token keeps its spaces. Returns -1 (after reporting) on an unterminated quote. */
static int tokenize(pctx_t *c, const char *p, size_t n)
{
    size_t i = 0;
    c->ntoks = 0;
    while (i < n) {
        while (i < n && (p[i] == ' ' || p[i] == '\t'))
            i++;
        if (i >= n || p[i] == '#')
            break;
        size_t start = i, quote = 0;
        int inq = 0;
        for (; i < n && (inq || (p[i] != ' ' && p[i] != '\t')); i++) {
            if (p[i] == '"') {
                inq = !inq;
                quote = i;
            }
        }
        if (inq) {
            perr(c, c->line, (int)quote + 1, "unterminated quote: add a closing '\"'");
            return -1;
        }
        if (c->ntoks == c->tokcap) {
            c->tokcap = c->tokcap ? c->tokcap * 2 : 16;
            c->toks = moat_xrealloc(c->toks, c->tokcap * sizeof *c->toks);
        }
        c->toks[c->ntoks++] = (tok_t){p + start, i - start, (int)start + 1};
    }
    return 0;
}

/* "tls=internal" in the upstream position means the upstream was forgotten. */
static int looks_like_option(tok_t t)
{
    const char *eq = memchr(t.p, '=', t.len);
    return eq != NULL && memchr(t.p, ':', (size_t)(eq - t.p)) == NULL;
}

static void parse_addresses(pctx_t *c, moat_site_t *s, tok_t t)
{
    size_t pos = 0;
    tok_t it;
    while (next_item(t, &pos, &it)) {
        moat_site_addr_t a;
        const char *why;
        shown_t sh;
        if (it.len == 0 || moat_address_parse_site(it.p, it.len, &a, &why) < 0) {
            if (it.len == 0)
                why = "remove the extra comma";
            perr(c, c->line, it.col,
                 "expected an address like 'chat.example.com' or 'localhost:8443', got '%s'%s%s",
                 show_tok(&sh, it), why ? ": " : "", why ? why : "");
            continue;
        }
        a.line = c->line;
        a.col = it.col;
        char shown[300], key[320];
        format_addr(&a, 0, shown, sizeof shown);
        snprintf(key, sizeof key, "%d %s", a.plain_http, shown);
        seen_t *first = seen_check(c, key, a.line, a.col);
        if (first != NULL) {
            perr(c, c->line, it.col, "duplicate address '%s' (first defined at %s:%d:%d)", shown,
                 c->file, first->line, first->col);
            free(a.host);
            continue;
        }
        s->addrs = moat_xrealloc(s->addrs, (s->naddrs + 1) * sizeof *s->addrs);
        s->addrs[s->naddrs++] = a;
    }
}

static void parse_upstreams(pctx_t *c, moat_site_t *s, tok_t t)
{
    size_t pos = 0;
    tok_t it;
    while (next_item(t, &pos, &it)) {
        moat_upstream_addr_t u;
        const char *why;
        shown_t sh;
        if (it.len == 0 || moat_address_parse_upstream(it.p, it.len, &u, &why) < 0) {
            if (it.len == 0)
                why = "remove the extra comma";
            perr(c, c->line, it.col,
                 "expected an upstream like '127.0.0.1:8080', 'http://app:8080' or "
                 "'unix:/run/app.sock', got '%s'%s%s",
                 show_tok(&sh, it), why ? ": " : "", why ? why : "");
            continue;
        }
        s->upstreams = moat_xrealloc(s->upstreams, (s->nupstreams + 1) * sizeof *s->upstreams);
        s->upstreams[s->nupstreams++] = u;
    }
}

static void parse_option(pctx_t *c, moat_site_t *s, tok_t t, int *seen_col)
{
    shown_t sh;
    const char *eq = memchr(t.p, '=', t.len);
    if (eq == NULL) {
        moat_upstream_addr_t u;
        const char *why;
        int is_upstream = moat_address_parse_upstream(t.p, t.len, &u, &why) == 0;
        if (is_upstream) {
            free(u.host);
            free(u.path);
        }
        perr(c, c->line, t.col, "expected an option like 'key=value', got '%s'%s", show_tok(&sh, t),
             is_upstream ? "; separate several upstreams with commas, without spaces" : "");
        return;
    }
    tok_t key = {t.p, (size_t)(eq - t.p), t.col};
    tok_t val = {eq + 1, t.len - key.len - 1, t.col + (int)key.len + 1};
    size_t i;
    for (i = 0; i < NOPTIONS; i++)
        if (tok_ieq(key, options[i].name))
            break;
    if (i == NOPTIONS) {
        const char *names[NOPTIONS];
        for (size_t k = 0; k < NOPTIONS; k++)
            names[k] = options[k].name;
        const char *hint = suggest(key, names, NOPTIONS);
        if (hint != NULL)
            perr(c, c->line, t.col, "unknown option '%s'; did you mean '%s'?", show_tok(&sh, key),
                 hint);
        else
            perr(c, c->line, t.col, "unknown option '%s'", show_tok(&sh, key));
        return;
    }
    if (seen_col[i] != 0) {
        perr(c, c->line, t.col, "duplicate option '%s' (first set at column %d)", options[i].name,
             seen_col[i]);
        return;
    }
    seen_col[i] = t.col;
    options[i].kind->parse(c, &options[i], s, val);
}

static void parse_line(pctx_t *c, const char *p, size_t n)
{
    const char *nul = memchr(p, '\0', n);
    if (nul != NULL) {
        perr(c, c->line, (int)(nul - p) + 1, "unexpected NUL byte: a site file is plain text");
        return;
    }
    if (n > MOAT_CONFIG_MAX_LINE) {
        perr(c, c->line, 1, "line is too long (%zu bytes; the limit is %d)", n,
             MOAT_CONFIG_MAX_LINE);
        return;
    }
    if (tokenize(c, p, n) < 0 || c->ntoks == 0)
        return;

    size_t before = c->nerrs, first_opt = 2;
    moat_site_t s;
    memset(&s, 0, sizeof s);
    for (size_t i = 0; i < NOPTIONS; i++)
        options[i].kind->set_default(&options[i], &s);
    s.line = c->line;

    tok_t *t = c->toks;
    parse_addresses(c, &s, t[0]);
    if (c->ntoks < 2 || looks_like_option(t[1])) {
        shown_t sh;
        int col = c->ntoks < 2 ? t[0].col + (int)t[0].len : t[1].col;
        perr(c, c->line, col, "expected an upstream after '%s', like '127.0.0.1:8080'",
             show_tok(&sh, t[0]));
        first_opt = 1;
    } else {
        parse_upstreams(c, &s, t[1]);
    }

    int seen_col[NOPTIONS] = {0};
    for (size_t i = first_opt; i < c->ntoks; i++)
        parse_option(c, &s, t[i], seen_col);

    /* External account binding is a key id and its HMAC key; one alone cannot work. */
    size_t kid = find_option("eab_kid"), hmac = find_option("eab_hmac");
    if (s.eab_kid != NULL && seen_col[hmac] == 0)
        perr(c, c->line, seen_col[kid], "eab_kid needs eab_hmac too: the CA gives you both");
    if (s.eab_hmac != NULL && seen_col[kid] == 0)
        perr(c, c->line, seen_col[hmac], "eab_hmac needs eab_kid too: the CA gives you both");

    if (c->nerrs != before) {
        site_clear(&s);
        return;
    }
    moat_config_t *cfg = c->cfg;
    if (cfg->nsites == c->sitecap) {
        c->sitecap = c->sitecap ? c->sitecap * 2 : 4;
        cfg->sites = moat_xrealloc(cfg->sites, c->sitecap * sizeof *cfg->sites);
    }
    cfg->sites[cfg->nsites++] = s;
}

static void parse_text(pctx_t *c, const char *text, size_t len)
{
    if (len > MOAT_CONFIG_MAX_FILE) {
        perr(c, 0, 0, "file is too large (%zu bytes; the limit is 1 MiB)", len);
        return;
    }
    /* Editors on Windows start UTF-8 files with a byte-order mark; it is not content. */
    if (len >= 3 && memcmp(text, "\xEF\xBB\xBF", 3) == 0)
        text += 3, len -= 3;
    size_t off = 0;
    while (off < len && !c->stopped) {
        const char *lp = text + off;
        const char *nl = memchr(lp, '\n', len - off);
        size_t n = nl ? (size_t)(nl - lp) : len - off;
        size_t ln = n > 0 && lp[n - 1] == '\r' ? n - 1 : n;
        c->line++;
        parse_line(c, lp, ln);
        off += n + 1;
    }
}

static void ctx_init(pctx_t *c, const char *file, moat_config_errors_t *errs,
                     moat_config_errors_t *local)
{
    memset(c, 0, sizeof *c);
    c->file = file;
    c->errs = errs ? errs : local;
    c->cfg = moat_xcalloc(1, sizeof *c->cfg);
    c->cfg->source = moat_xstrdup(file);
}

static int ctx_finish(pctx_t *c, moat_config_t **out, moat_config_errors_t *local,
                      const char *empty_msg)
{
    if (c->nerrs == 0 && c->cfg->nsites == 0)
        perr(c, 0, 0, "%s", empty_msg);
    for (size_t i = 0; i < c->seencap; i++)
        free(c->seen[i].key);
    free(c->seen);
    free(c->toks);
    moat_config_errors_free(local);
    if (c->nerrs != 0) {
        moat_config_free(c->cfg);
        *out = NULL;
        return MOAT_EPARSE;
    }
    *out = c->cfg;
    return 0;
}

/* ---- public API ------------------------------------------------------------------------ */

int moat_config_parse(const char *filename, const char *text, size_t len, moat_config_t **out,
                      moat_config_errors_t *errs)
{
    pctx_t c;
    moat_config_errors_t local = {0};
    ctx_init(&c, filename ? filename : "<input>", errs, &local);
    parse_text(&c, text, len);
    return ctx_finish(&c, out, &local,
                      "no sites defined; add a line like 'chat.example.com 127.0.0.1:8080'");
}

int moat_config_load_file(const char *path, moat_config_t **out, moat_config_errors_t *errs)
{
    moat_config_errors_t local = {0};
    moat_config_errors_t *e = errs ? errs : &local;
    char *buf = NULL;
    size_t len = 0;
    int err = 0, fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat st;
    *out = NULL;
    if (fd < 0 || fstat(fd, &st) < 0) {
        err = errno;
        goto out;
    }
    if (S_ISDIR(st.st_mode)) {
        err = EISDIR;
        goto out;
    }
    if (S_ISREG(st.st_mode) && st.st_size > MOAT_CONFIG_MAX_FILE) {
        errors_add(e, path, 0, 0,
                   moat_xstrdup("file is too large (more than 1 MiB): a site file is one line "
                                "per site"));
        close(fd);
        moat_config_errors_free(&local);
        return MOAT_EPARSE;
    }
    /* Read one byte past the limit so an oversized pipe or device is caught too. */
    buf = moat_xmalloc(MOAT_CONFIG_MAX_FILE + 1);
    while (len < MOAT_CONFIG_MAX_FILE + 1) {
        ssize_t n = read(fd, buf + len, MOAT_CONFIG_MAX_FILE + 1 - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            err = errno;
            goto out;
        }
        if (n == 0)
            break;
        len += (size_t)n;
    }
out:
    if (fd >= 0)
        close(fd);
    if (err != 0) {
        char msg[256];
        snprintf(msg, sizeof msg, "cannot read: %s", strerror(err));
        errors_add(e, path, 0, 0, moat_xstrdup(msg));
        free(buf);
        moat_config_errors_free(&local);
        return MOAT_EIO;
    }
    moat_config_errors_free(&local);
    int rc = moat_config_parse(path, buf, len, out, errs);
    free(buf);
    return rc;
}

int moat_config_from_args(int argc, char **argv, moat_config_t **out, moat_config_errors_t *errs)
{
    pctx_t c;
    moat_config_errors_t local = {0};
    size_t total = 0;
    for (int i = 0; i < argc; i++)
        total += strlen(argv[i]) + 1;
    char *line = moat_xmalloc(total + 1), *w = line;
    for (int i = 0; i < argc; i++) {
        size_t n = strlen(argv[i]);
        if (i > 0)
            *w++ = ' ';
        memcpy(w, argv[i], n);
        w += n;
    }
    *w = '\0';
    ctx_init(&c, "<command line>", errs, &local);
    c.line = 1;
    parse_line(&c, line, (size_t)(w - line));
    free(line);
    return ctx_finish(&c, out, &local,
                      "expected a site like 'chat.example.com 127.0.0.1:8080' after the command");
}

void moat_config_free(moat_config_t *c)
{
    if (c == NULL)
        return;
    for (size_t i = 0; i < c->nsites; i++)
        site_clear(&c->sites[i]);
    free(c->sites);
    free(c->source);
    free(c);
}

void moat_config_errors_print(const moat_config_errors_t *e, FILE *f)
{
    for (size_t i = 0; i < e->n; i++) {
        const moat_config_error_t *it = &e->items[i];
        if (it->line == 0)
            fprintf(f, "%s: %s\n", it->file, it->msg);
        else
            fprintf(f, "%s:%d:%d: %s\n", it->file, it->line, it->col, it->msg);
    }
}

void moat_config_errors_free(moat_config_errors_t *e)
{
    if (e == NULL)
        return;
    for (size_t i = 0; i < e->n; i++) {
        free(e->items[i].file);
        free(e->items[i].msg);
    }
    free(e->items);
    e->items = NULL;
    e->n = 0;
}

static void print_certificate(const moat_site_t *s, FILE *f)
{
    fputs("  certificate  ", f);
    switch (s->tls) {
    case MOAT_TLS_INTERNAL: fputs("internal CA\n", f); return;
    case MOAT_TLS_ACME: fputs("ACME\n", f); return;
    case MOAT_TLS_FILES: fprintf(f, "files %s and %s\n", s->tls_cert, s->tls_key); return;
    case MOAT_TLS_AUTO: break;
    }
    /* Automatic: the same rule the certificate manager applies, shown per name. */
    int any[2] = {0, 0};
    for (int internal = 0; internal < 2; internal++) {
        for (size_t i = 0; i < s->naddrs; i++) {
            const moat_site_addr_t *a = &s->addrs[i];
            if (a->plain_http || moat_host_is_internal(a->host) != internal)
                continue;
            if (!any[internal])
                fprintf(f, "%s%s for ",
                        any[0] ? "; " : "automatic: ", internal ? "internal CA" : "ACME");
            else
                fputs(", ", f);
            fputs(a->host, f);
            any[internal] = 1;
        }
    }
    fputs(any[0] || any[1] ? "\n" : "none (plain HTTP only)\n", f);
}

void moat_config_print(const moat_config_t *c, FILE *f)
{
    fprintf(f, "%s: %zu site%s\n", c->source, c->nsites, c->nsites == 1 ? "" : "s");
    for (size_t i = 0; i < c->nsites; i++) {
        const moat_site_t *s = &c->sites[i];
        fprintf(f, "\nsite %zu (%s:%d)\n", i + 1, c->source, s->line);
        for (size_t k = 0; k < s->naddrs; k++) {
            char buf[300];
            format_addr(&s->addrs[k], 1, buf, sizeof buf);
            fprintf(f, "  address      %s%s\n", buf,
                    s->addrs[k].plain_http ? " (plain HTTP, no redirect)" : "");
        }
        for (size_t k = 0; k < s->nupstreams; k++) {
            const moat_upstream_addr_t *u = &s->upstreams[k];
            if (u->kind == MOAT_UPSTREAM_UNIX)
                fprintf(f, "  upstream     unix:%s\n", u->path);
            else
                fprintf(f, "  upstream     %s%s%s%s:%d%s\n",
                        u->kind == MOAT_UPSTREAM_TLS ? "https://" : "http://",
                        strchr(u->host, ':') ? "[" : "", u->host, strchr(u->host, ':') ? "]" : "",
                        u->port, u->kind == MOAT_UPSTREAM_TLS ? " (certificate verified)" : "");
        }
        print_certificate(s, f);
        for (size_t k = 0; k < NOPTIONS; k++) {
            const opt_row_t *r = &options[k];
            if (r->kind == &kind_tls || r->kind->is_default(r, s))
                continue;
            fprintf(f, "  option       %s=", r->name);
            r->kind->print(r, s, f);
            fputc('\n', f);
        }
    }
}
