/* The site-file parser (include/moat/config.h): lines -> tokens -> addresses, upstreams and
 * options. Options are rows of one table; a row names its parser kind and the site field it
 * fills, so adding an option is adding a row. Every error is collected rather than stopping
 * at the first: whoever fixes a site file wants the whole list at once. */
#include "address.h"
#include "config_kinds.h"
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

/* One address already defined, keyed by scheme, host and effective port. */
typedef struct {
    char *key;
    int line, col;
} seen_t;

struct pctx {
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
};

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

int moat__cfg_line(const pctx_t *c)
{
    return c->line;
}

void moat__cfg_err(pctx_t *c, int line, int col, const char *fmt, ...)
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

const char *moat__cfg_show(shown_t *o, tok_t t)
{
    return show(o, t.p, t.len);
}

/* ---- small text helpers ---------------------------------------------------------------- */

int moat__cfg_tok_ieq(tok_t t, const char *lit)
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
const char *moat__cfg_suggest(tok_t t, const char *const *names, size_t n)
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
int moat__cfg_next_item(tok_t t, size_t *pos, tok_t *item)
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

static const enum_val_t on_off[] = {{"on", 1}, {"off", 0}, {NULL, 0}};
static const enum_val_t dns_vals[] = {
    {"rfc2136", MOAT_DNS_RFC2136}, {"cloudflare", MOAT_DNS_CLOUDFLARE}, {NULL, 0}};
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
        name, &moat__cfg_kind_duration, offsetof(moat_site_t, field), 0, (int64_t)(def), min, max, \
            NULL, "a duration like 30s, 5m or 1h"                                                  \
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
    SIMPLE("tls", &moat__cfg_kind_tls, tls, "internal, acme or CERT.pem,KEY.pem"),
    {"max_body", &moat__cfg_kind_size, offsetof(moat_site_t, max_body), 0, 0, 0, UINT64_MAX / 2,
     NULL, "a size like 10MB, 512KiB or none"},
    {"hsts", &moat__cfg_kind_enum, offsetof(moat_site_t, hsts), 0, -1, 0, 0, on_off, "on or off"},
    DURATION("connect_timeout", connect_timeout_ms, 10 * SEC, 1, HOUR),
    DURATION("read_timeout", read_timeout_ms, 30 * MINUTE, 1, 7 * DAY),
    DURATION("header_timeout", header_timeout_ms, 30 * SEC, 1, HOUR),
    DURATION("keepalive_timeout", keepalive_timeout_ms, 5 * MINUTE, 1, 7 * DAY),
    DURATION("ws_idle_timeout", ws_idle_timeout_ms, HOUR, 1, 7 * DAY),
    /* 0 is allowed here: it means idle upstream connections are not kept at all. */
    DURATION("pool_idle", pool_idle_ms, 4 * SEC, 0, DAY),
    /* 0: names are looked up again only when a connect to them fails. */
    DURATION("resolve_interval", resolve_interval_ms, 30 * SEC, 0, DAY),
    /* 0: a request for an app that refuses connections gets its 502 at once. */
    DURATION("upstream_wait", upstream_wait_ms, 10 * SEC, 0, HOUR),
    LIST("trusted_proxies", &moat__cfg_kind_cidrs, trusted, ntrusted,
         "address ranges like 10.0.0.0/8 or fd00::/8"),
    {"lb", &moat__cfg_kind_enum, offsetof(moat_site_t, lb), 0, MOAT_LB_ROUND_ROBIN, 0, 0, lb_vals,
     "round_robin, least_conn or cookie"},
    {"h2_websocket", &moat__cfg_kind_enum, offsetof(moat_site_t, h2_websocket), 0, 1, 0, 0, on_off,
     "on or off"},
    SIMPLE("email", &moat__cfg_kind_email, email, "an address like admin@example.com"),
    LIST("ca", &moat__cfg_kind_urls, cas, ncas,
         "ACME directory URLs like https://acme-v02.api.letsencrypt.org/directory"),
    SIMPLE("preferred_chain", &moat__cfg_kind_string, preferred_chain,
           "a chain name like \"ISRG Root X1\" (in quotes when it has spaces)"),
    SIMPLE("eab_kid", &moat__cfg_kind_string, eab_kid, "a key identifier from your CA"),
    SIMPLE("eab_hmac", &moat__cfg_kind_secret, eab_hmac, "the HMAC key from your CA"),
    {"dns", &moat__cfg_kind_enum, offsetof(moat_site_t, dns), 0, MOAT_DNS_NONE, 0, 0, dns_vals,
     "rfc2136 or cloudflare"},
    SIMPLE("dns_server", &moat__cfg_kind_string, dns_server,
           "the primary DNS server that takes updates, like ns1.example.com:53"),
    SIMPLE("dns_tsig", &moat__cfg_kind_string, dns_tsig,
           "a TSIG key file made by tsig-keygen, like /etc/moat/tsig.key"),
    SIMPLE("dns_token_file", &moat__cfg_kind_string, dns_token_file,
           "a file holding a Cloudflare API token, like /etc/moat/cf.token"),
    SIMPLE("dns_resolver", &moat__cfg_kind_string, dns_resolver,
           "an IP address and port, like 127.0.0.1:5353"),
    SIMPLE("dns_api", &moat__cfg_kind_string, dns_api,
           "an API base URL, like https://api.cloudflare.com/client/v4"),
    DURATION("dns_wait", dns_wait_ms, 2 * MINUTE, 1 * SEC, HOUR),
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
    free(s->dns_server);
    free(s->dns_tsig);
    free(s->dns_token_file);
    free(s->dns_resolver);
    free(s->dns_api);
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
            moat__cfg_err(c, c->line, (int)quote + 1, "unterminated quote: add a closing '\"'");
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
    while (moat__cfg_next_item(t, &pos, &it)) {
        moat_site_addr_t a;
        const char *why;
        shown_t sh;
        if (it.len == 0 || moat_address_parse_site(it.p, it.len, &a, &why) < 0) {
            if (it.len == 0)
                why = "remove the extra comma";
            moat__cfg_err(
                c, c->line, it.col,
                "expected an address like 'chat.example.com' or 'localhost:8443', got '%s'%s%s",
                moat__cfg_show(&sh, it), why ? ": " : "", why ? why : "");
            continue;
        }
        a.line = c->line;
        a.col = it.col;
        char shown[300], key[320];
        format_addr(&a, 0, shown, sizeof shown);
        snprintf(key, sizeof key, "%d %s", a.plain_http, shown);
        seen_t *first = seen_check(c, key, a.line, a.col);
        if (first != NULL) {
            moat__cfg_err(c, c->line, it.col, "duplicate address '%s' (first defined at %s:%d:%d)",
                          shown, c->file, first->line, first->col);
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
    while (moat__cfg_next_item(t, &pos, &it)) {
        moat_upstream_addr_t u;
        const char *why;
        shown_t sh;
        if (it.len == 0 || moat_address_parse_upstream(it.p, it.len, &u, &why) < 0) {
            if (it.len == 0)
                why = "remove the extra comma";
            moat__cfg_err(c, c->line, it.col,
                          "expected an upstream like '127.0.0.1:8080', 'http://app:8080' or "
                          "'unix:/run/app.sock', got '%s'%s%s",
                          moat__cfg_show(&sh, it), why ? ": " : "", why ? why : "");
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
        moat__cfg_err(c, c->line, t.col, "expected an option like 'key=value', got '%s'%s",
                      moat__cfg_show(&sh, t),
                      is_upstream ? "; separate several upstreams with commas, without spaces"
                                  : "");
        return;
    }
    tok_t key = {t.p, (size_t)(eq - t.p), t.col};
    tok_t val = {eq + 1, t.len - key.len - 1, t.col + (int)key.len + 1};
    size_t i;
    for (i = 0; i < NOPTIONS; i++)
        if (moat__cfg_tok_ieq(key, options[i].name))
            break;
    if (i == NOPTIONS) {
        const char *names[NOPTIONS];
        for (size_t k = 0; k < NOPTIONS; k++)
            names[k] = options[k].name;
        const char *hint = moat__cfg_suggest(key, names, NOPTIONS);
        if (hint != NULL)
            moat__cfg_err(c, c->line, t.col, "unknown option '%s'; did you mean '%s'?",
                          moat__cfg_show(&sh, key), hint);
        else
            moat__cfg_err(c, c->line, t.col, "unknown option '%s'", moat__cfg_show(&sh, key));
        return;
    }
    if (seen_col[i] != 0) {
        moat__cfg_err(c, c->line, t.col, "duplicate option '%s' (first set at column %d)",
                      options[i].name, seen_col[i]);
        return;
    }
    seen_col[i] = t.col;
    options[i].kind->parse(c, &options[i], s, val);
}

/* An option another one needs: "dns=rfc2136 needs dns_server= ...". */
static void need(pctx_t *c, const int *seen_col, const char *have, const char *want,
                 const char *example)
{
    if (seen_col[find_option(want)] == 0)
        moat__cfg_err(c, c->line, seen_col[find_option(have)], "%s needs %s=%s too", have, want,
                      example);
}

/* DNS-01: the provider's options belong together, and a wildcard address needs DNS-01 (a CA
 * validates wildcards only through DNS) unless its certificate comes from files. */
static void check_dns(pctx_t *c, moat_site_t *s, const int *seen_col)
{
    static const char *const provider_opts[] = {"dns_server",   "dns_tsig", "dns_token_file",
                                                "dns_resolver", "dns_api",  "dns_wait"};
    if (s->dns == MOAT_DNS_RFC2136) {
        need(c, seen_col, "dns", "dns_server", "HOST:PORT (the primary that takes updates)");
        need(c, seen_col, "dns", "dns_tsig", "FILE (a key made with 'tsig-keygen NAME > FILE')");
    } else if (s->dns == MOAT_DNS_CLOUDFLARE) {
        need(c, seen_col, "dns", "dns_token_file",
             "FILE (an API token with Zone:Read and DNS:Edit)");
    } else {
        for (size_t i = 0; i < MOAT_ARRAY_LEN(provider_opts); i++) {
            int col = seen_col[find_option(provider_opts[i])];
            if (col != 0)
                moat__cfg_err(c, c->line, col, "%s only applies with dns=rfc2136 or dns=cloudflare",
                              provider_opts[i]);
        }
    }
    if (s->dns_server != NULL) {
        moat_hostport_t hp;
        const char *why;
        if (moat_address_parse_hostport(s->dns_server, strlen(s->dns_server), 0, &hp, &why) < 0)
            moat__cfg_err(c, c->line, seen_col[find_option("dns_server")] + 11,
                          "expected a DNS server like 'ns1.example.com:53'%s%s", why ? ": " : "",
                          why ? why : "");
        free(hp.host);
    }
    if (s->dns_resolver != NULL) {
        moat_hostport_t hp;
        const char *why;
        if (moat_address_parse_hostport(s->dns_resolver, strlen(s->dns_resolver), 0, &hp, &why) <
                0 ||
            hp.kind == MOAT_HOST_NAME || hp.kind == MOAT_HOST_LOCALHOST)
            moat__cfg_err(c, c->line, seen_col[find_option("dns_resolver")] + 13,
                          "expected an IP address and port like '127.0.0.1:5353'");
        free(hp.host);
    }
    if (s->dns_api != NULL) {
        /* The API token travels with every request: TLS, except to this machine (tests). */
        const char *a = s->dns_api;
        int ok = strncmp(a, "https://", 8) == 0 || strncmp(a, "http://127.", 11) == 0 ||
                 strncmp(a, "http://localhost:", 17) == 0 ||
                 strncmp(a, "http://localhost/", 17) == 0 || strncmp(a, "http://[::1]", 12) == 0;
        if (!ok)
            moat__cfg_err(c, c->line, seen_col[find_option("dns_api")] + 8,
                          "expected an https:// API URL (plain http:// only to a loopback "
                          "address), like https://api.cloudflare.com/client/v4");
    }
    if (s->dns != MOAT_DNS_NONE && s->tls != MOAT_TLS_AUTO && s->tls != MOAT_TLS_ACME)
        moat__cfg_err(c, c->line, seen_col[find_option("dns")],
                      "dns= is for ACME certificates; remove it or tls=");
    for (size_t i = 0; i < s->naddrs; i++) {
        const moat_site_addr_t *a = &s->addrs[i];
        if (a->host[0] != '*' || s->dns != MOAT_DNS_NONE || s->tls == MOAT_TLS_FILES)
            continue;
        moat__cfg_err(c, c->line, a->col,
                      "wildcard address '%s' needs the DNS-01 challenge: add "
                      "'dns=rfc2136 dns_server=HOST:PORT dns_tsig=KEYFILE' or "
                      "'dns=cloudflare dns_token_file=FILE' to the line (or list each name "
                      "instead)",
                      a->host);
    }
}

static void parse_line(pctx_t *c, const char *p, size_t n)
{
    const char *nul = memchr(p, '\0', n);
    if (nul != NULL) {
        moat__cfg_err(c, c->line, (int)(nul - p) + 1,
                      "unexpected NUL byte: a site file is plain text");
        return;
    }
    if (n > MOAT_CONFIG_MAX_LINE) {
        moat__cfg_err(c, c->line, 1, "line is too long (%zu bytes; the limit is %d)", n,
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
        moat__cfg_err(c, c->line, col, "expected an upstream after '%s', like '127.0.0.1:8080'",
                      moat__cfg_show(&sh, t[0]));
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
        moat__cfg_err(c, c->line, seen_col[kid],
                      "eab_kid needs eab_hmac too: the CA gives you both");
    if (s.eab_hmac != NULL && seen_col[kid] == 0)
        moat__cfg_err(c, c->line, seen_col[hmac],
                      "eab_hmac needs eab_kid too: the CA gives you both");

    check_dns(c, &s, seen_col);

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
        moat__cfg_err(c, 0, 0, "file is too large (%zu bytes; the limit is 1 MiB)", len);
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
        moat__cfg_err(c, 0, 0, "%s", empty_msg);
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
    case MOAT_TLS_ACME: fputs(s->dns ? "ACME (dns-01)\n" : "ACME\n", f); return;
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
                fprintf(f, "%s%s for ", any[0] ? "; " : "automatic: ",
                        internal ? "internal CA"
                        : s->dns ? "ACME (dns-01)"
                                 : "ACME");
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
            if (r->kind == &moat__cfg_kind_tls || r->kind->is_default(r, s))
                continue;
            fprintf(f, "  option       %s=", r->name);
            r->kind->print(r, s, f);
            fputc('\n', f);
        }
    }
}
