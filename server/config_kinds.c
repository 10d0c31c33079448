/* The option value kinds of the site-file parser (server/config_kinds.h): enums, durations,
 * sizes, strings and secrets, e-mail addresses, URL and CIDR lists, and tls=. */
#include "config_kinds.h"
#include "address.h"
#include "moat/common.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

static void bad_value(pctx_t *c, const opt_row_t *r, tok_t v, const char *expect,
                      const char *suggestion)
{
    shown_t sh;
    if (suggestion != NULL)
        moat__cfg_err(c, moat__cfg_line(c), v.col,
                      "bad value for %s: expected %s, got '%s'; did you mean '%s'?", r->name,
                      expect, moat__cfg_show(&sh, v), suggestion);
    else
        moat__cfg_err(c, moat__cfg_line(c), v.col, "bad value for %s: expected %s, got '%s'",
                      r->name, expect, moat__cfg_show(&sh, v));
}

/* enum: an int field set from a list of names. */
static void enum_parse(pctx_t *c, const opt_row_t *r, moat_site_t *s, tok_t v)
{
    const char *names[8];
    size_t n = 0;
    for (const enum_val_t *e = r->vals; e->name != NULL; e++) {
        if (moat__cfg_tok_ieq(v, e->name)) {
            *FIELD(s, r, int) = e->value;
            return;
        }
        if (n < MOAT_ARRAY_LEN(names))
            names[n++] = e->name;
    }
    bad_value(c, r, v, r->expect, moat__cfg_suggest(v, names, n));
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

const opt_kind_t moat__cfg_kind_enum = {enum_parse, enum_default, enum_is_default, enum_print};

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
        if (moat__cfg_tok_ieq(unit, units[k].unit)) {
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

const opt_kind_t moat__cfg_kind_duration = {duration_parse, u64_default, u64_is_default,
                                            duration_print};

static void size_parse(pctx_t *c, const opt_row_t *r, moat_site_t *s, tok_t v)
{
    uint64_t n;
    if (moat__cfg_tok_ieq(v, "none")) {
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

const opt_kind_t moat__cfg_kind_size = {size_parse, u64_default, u64_is_default, size_print};

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

const opt_kind_t moat__cfg_kind_string = {string_parse, ptr_default, ptr_is_default, string_print};
const opt_kind_t moat__cfg_kind_secret = {string_parse, ptr_default, ptr_is_default, secret_print};

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

const opt_kind_t moat__cfg_kind_email = {email_parse, ptr_default, ptr_is_default, string_print};

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
    while (moat__cfg_next_item(v, &pos, &it)) {
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

const opt_kind_t moat__cfg_kind_urls = {urls_parse, list_default, list_is_default, urls_print};

static void cidrs_parse(pctx_t *c, const opt_row_t *r, moat_site_t *s, tok_t v)
{
    moat_cidr_t **list = FIELD(s, r, moat_cidr_t *);
    size_t *n = (size_t *)((char *)s + r->count_off), pos = 0;
    tok_t it;
    while (moat__cfg_next_item(v, &pos, &it)) {
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

const opt_kind_t moat__cfg_kind_cidrs = {cidrs_parse, list_default, list_is_default, cidrs_print};

/* tls=internal | acme | CERT.pem,KEY.pem: fills tls, tls_cert and tls_key together. */
static void tls_parse(pctx_t *c, const opt_row_t *r, moat_site_t *s, tok_t v)
{
    static const char *const names[] = {"internal", "acme"};
    const char *comma = memchr(v.p, ',', v.len);
    if (comma == NULL) {
        if (moat__cfg_tok_ieq(v, "internal"))
            s->tls = MOAT_TLS_INTERNAL;
        else if (moat__cfg_tok_ieq(v, "acme"))
            s->tls = MOAT_TLS_ACME;
        else
            bad_value(c, r, v, r->expect, moat__cfg_suggest(v, names, MOAT_ARRAY_LEN(names)));
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

const opt_kind_t moat__cfg_kind_tls = {tls_parse, tls_default, tls_is_default, tls_print};
