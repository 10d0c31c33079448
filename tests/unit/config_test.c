/* Site-file parser: every address and upstream form, every option, and every error message
 * with its exact text and position. */
#include "moat/config.h"
#include "moat/common.h"
#include "test.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <unistd.h>

/* The printed errors of a failed parse of `text`, as one string ("" when it parsed). */
static char *errors_of(const char *text)
{
    moat_config_t *cfg = (moat_config_t *)1;
    moat_config_errors_t errs = {0};
    int rc = moat_config_parse("Moatfile", text, strlen(text), &cfg, &errs);
    char *s = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&s, &n);
    moat_config_errors_print(&errs, f);
    fclose(f);
    CHECK(rc == 0 ? cfg != NULL && errs.n == 0 : rc == MOAT_EPARSE && cfg == NULL && errs.n > 0);
    moat_config_free(cfg);
    moat_config_errors_free(&errs);
    return s;
}

#define CHECK_ERR(text, want)                                                                      \
    do {                                                                                           \
        char *got_ = errors_of(text);                                                              \
        CHECK_STR(got_, want "\n");                                                                \
        free(got_);                                                                                \
    } while (0)

static moat_config_t *parse_ok(const char *text)
{
    moat_config_t *cfg = NULL;
    moat_config_errors_t errs = {0};
    int rc = moat_config_parse("Moatfile", text, strlen(text), &cfg, &errs);
    CHECK_INT(rc, 0);
    if (rc != 0)
        moat_config_errors_print(&errs, stderr);
    moat_config_errors_free(&errs);
    return cfg;
}

static void test_minimal_site_and_defaults(void)
{
    moat_config_t *c = parse_ok("chat.example.com 127.0.0.1:8080\n");
    if (c == NULL)
        return;
    CHECK_STR(c->source, "Moatfile");
    CHECK_INT(c->nsites, 1);
    const moat_site_t *s = &c->sites[0];
    CHECK_INT(s->line, 1);
    CHECK_INT(s->naddrs, 1);
    CHECK_STR(s->addrs[0].host, "chat.example.com");
    CHECK_INT(s->addrs[0].kind, MOAT_HOST_NAME);
    CHECK_INT(s->addrs[0].port, 0);
    CHECK_INT(s->addrs[0].plain_http, 0);
    CHECK_INT(s->addrs[0].line, 1);
    CHECK_INT(s->addrs[0].col, 1);
    CHECK_INT(s->nupstreams, 1);
    CHECK_INT(s->upstreams[0].kind, MOAT_UPSTREAM_TCP);
    CHECK_STR(s->upstreams[0].host, "127.0.0.1");
    CHECK_INT(s->upstreams[0].port, 8080);
    CHECK(s->upstreams[0].path == NULL);
    CHECK_INT(s->tls, MOAT_TLS_AUTO);
    CHECK(s->tls_cert == NULL && s->tls_key == NULL);
    CHECK_INT(s->max_body, 0);
    CHECK_INT(s->hsts, -1);
    CHECK_INT(s->connect_timeout_ms, 10000);
    CHECK_INT(s->read_timeout_ms, 30 * 60000);
    CHECK_INT(s->header_timeout_ms, 30000);
    CHECK_INT(s->keepalive_timeout_ms, 5 * 60000);
    CHECK_INT(s->ws_idle_timeout_ms, 3600000);
    CHECK_INT(s->pool_idle_ms, 4000);
    CHECK_INT(s->resolve_interval_ms, 30000);
    CHECK_INT(s->upstream_wait_ms, 10000);
    CHECK_INT(s->ntrusted, 0);
    CHECK_INT(s->lb, MOAT_LB_ROUND_ROBIN);
    CHECK_INT(s->h2_websocket, 1);
    CHECK(s->email == NULL && s->ncas == 0 && s->preferred_chain == NULL);
    CHECK(s->eab_kid == NULL && s->eab_hmac == NULL);
    moat_config_free(c);
}

static void test_address_forms(void)
{
    moat_config_t *c = parse_ok("Chat.Example.COM. 127.0.0.1:1\n"
                                "localhost:8443 127.0.0.1:1\n"
                                "192.168.1.10 127.0.0.1:1\n"
                                "[::1]:8444 127.0.0.1:1\n"
                                "[0:0::2] 127.0.0.1:1\n"
                                "http://intranet.local 127.0.0.1:1\n"
                                "HTTPS://a.example.com:8443/ 127.0.0.1:1\n"
                                "x.example.com,http://x.example.com,y-1.example.com:9443 h:1\n"
                                "app.localhost 127.0.0.1:1\n");
    if (c == NULL)
        return;
    CHECK_INT(c->nsites, 9);
    const moat_site_addr_t *a;
    a = &c->sites[0].addrs[0];
    CHECK_STR(a->host, "chat.example.com");
    CHECK_INT(a->kind, MOAT_HOST_NAME);
    a = &c->sites[1].addrs[0];
    CHECK_STR(a->host, "localhost");
    CHECK_INT(a->kind, MOAT_HOST_LOCALHOST);
    CHECK_INT(a->port, 8443);
    a = &c->sites[2].addrs[0];
    CHECK_STR(a->host, "192.168.1.10");
    CHECK_INT(a->kind, MOAT_HOST_IPV4);
    a = &c->sites[3].addrs[0];
    CHECK_STR(a->host, "::1");
    CHECK_INT(a->kind, MOAT_HOST_IPV6);
    CHECK_INT(a->port, 8444);
    CHECK_STR(c->sites[4].addrs[0].host, "::2");
    a = &c->sites[5].addrs[0];
    CHECK_STR(a->host, "intranet.local");
    CHECK_INT(a->plain_http, 1);
    CHECK_INT(a->port, 0);
    a = &c->sites[6].addrs[0];
    CHECK_STR(a->host, "a.example.com");
    CHECK_INT(a->plain_http, 0);
    CHECK_INT(a->port, 8443);
    const moat_site_t *s = &c->sites[7];
    CHECK_INT(s->naddrs, 3);
    CHECK_INT(s->line, 8);
    CHECK_INT(s->addrs[1].plain_http, 1);
    CHECK_INT(s->addrs[1].col, 15);
    CHECK_STR(s->addrs[2].host, "y-1.example.com");
    CHECK_INT(s->addrs[2].port, 9443);
    CHECK_INT(s->addrs[2].col, 36);
    CHECK_INT(s->addrs[2].line, 8);
    CHECK_INT(c->sites[8].addrs[0].kind, MOAT_HOST_NAME);
    moat_config_free(c);
}

static void test_upstream_forms(void)
{
    moat_config_t *c = parse_ok("a.example.com 127.0.0.1:8080,http://app:8081,https://App.Internal,"
                                "http://web,unix:/run/app.sock,[::1]:9000,open_webui:8080,"
                                "https://[fd00::5]:8443/,localhost:3000\n");
    if (c == NULL)
        return;
    const moat_site_t *s = &c->sites[0];
    CHECK_INT(s->nupstreams, 9);
    const moat_upstream_addr_t *u = s->upstreams;
    CHECK_INT(u[0].kind, MOAT_UPSTREAM_TCP);
    CHECK_INT(u[1].kind, MOAT_UPSTREAM_TCP);
    CHECK_STR(u[1].host, "app");
    CHECK_INT(u[1].port, 8081);
    CHECK_INT(u[2].kind, MOAT_UPSTREAM_TLS);
    CHECK_STR(u[2].host, "app.internal");
    CHECK_INT(u[2].port, 443);
    CHECK_INT(u[3].port, 80);
    CHECK_INT(u[4].kind, MOAT_UPSTREAM_UNIX);
    CHECK_STR(u[4].path, "/run/app.sock");
    CHECK(u[4].host == NULL);
    CHECK_STR(u[5].host, "::1");
    CHECK_INT(u[5].port, 9000);
    CHECK_STR(u[6].host, "open_webui");
    CHECK_INT(u[7].kind, MOAT_UPSTREAM_TLS);
    CHECK_STR(u[7].host, "fd00::5");
    CHECK_INT(u[7].port, 8443);
    CHECK_STR(u[8].host, "localhost");
    moat_config_free(c);
}

static void test_options(void)
{
    moat_config_t *c = parse_ok(
        "a.example.com 127.0.0.1:1 tls=internal max_body=10MB hsts=on connect_timeout=500ms "
        "read_timeout=90 header_timeout=2m keepalive_timeout=1h ws_idle_timeout=1d pool_idle=0 "
        "trusted_proxies=10.1.2.3/8,fd00::/8,192.168.1.5 lb=least_conn h2_websocket=off "
        "email=admin@example.com ca=https://acme.example/dir,http://localhost:14000/dir "
        "preferred_chain=\"ISRG Root X1\" eab_kid=kid-1 eab_hmac=c2VjcmV0\n"
        "b.example.com 127.0.0.1:1 tls=cert.pem,/etc/key.pem max_body=512KiB LB=Cookie HSTS=OFF\n"
        "c.example.com 127.0.0.1:1 tls=acme max_body=none resolve_interval=0 upstream_wait=0\n"
        "d.example.com 127.0.0.1:1 max_body=1G resolve_interval=250ms upstream_wait=2m\n"
        "e.example.com 127.0.0.1:1 max_body=100\n"
        "f.example.com 127.0.0.1:1 max_body=2gb\n"
        "g.example.com 127.0.0.1:1 max_body=3k\n");
    if (c == NULL)
        return;
    const moat_site_t *s = &c->sites[0];
    CHECK_INT(s->tls, MOAT_TLS_INTERNAL);
    CHECK_INT(s->max_body, 10000000);
    CHECK_INT(s->hsts, 1);
    CHECK_INT(s->connect_timeout_ms, 500);
    CHECK_INT(s->read_timeout_ms, 90000);
    CHECK_INT(s->header_timeout_ms, 120000);
    CHECK_INT(s->keepalive_timeout_ms, 3600000);
    CHECK_INT(s->ws_idle_timeout_ms, 86400000);
    CHECK_INT(s->pool_idle_ms, 0);
    CHECK_INT(s->ntrusted, 3);
    if (s->ntrusted == 3) {
        CHECK_INT(s->trusted[0].family, AF_INET);
        CHECK_INT(s->trusted[0].prefix, 8);
        CHECK(memcmp(s->trusted[0].addr, "\x0a\0\0\0", 4) == 0); /* host bits cleared */
        CHECK_INT(s->trusted[1].family, AF_INET6);
        CHECK_INT(s->trusted[1].prefix, 8);
        CHECK_INT(s->trusted[1].addr[0], 0xfd);
        CHECK_INT(s->trusted[2].prefix, 32);
    }
    CHECK_INT(s->lb, MOAT_LB_LEAST_CONN);
    CHECK_INT(s->h2_websocket, 0);
    CHECK_STR(s->email, "admin@example.com");
    CHECK_INT(s->ncas, 2);
    if (s->ncas == 2) {
        CHECK_STR(s->cas[0], "https://acme.example/dir");
        CHECK_STR(s->cas[1], "http://localhost:14000/dir");
    }
    CHECK_STR(s->preferred_chain, "ISRG Root X1");
    CHECK_STR(s->eab_kid, "kid-1");
    CHECK_STR(s->eab_hmac, "c2VjcmV0");
    s = &c->sites[1];
    CHECK_INT(s->tls, MOAT_TLS_FILES);
    CHECK_STR(s->tls_cert, "cert.pem");
    CHECK_STR(s->tls_key, "/etc/key.pem");
    CHECK_INT(s->max_body, 512 * 1024);
    CHECK_INT(s->lb, MOAT_LB_COOKIE);
    CHECK_INT(s->hsts, 0);
    CHECK_INT(c->sites[2].tls, MOAT_TLS_ACME);
    CHECK_INT(c->sites[2].max_body, 0);
    CHECK_INT(c->sites[3].max_body, 1u << 30);
    CHECK_INT(c->sites[2].resolve_interval_ms, 0);
    CHECK_INT(c->sites[2].upstream_wait_ms, 0);
    CHECK_INT(c->sites[3].resolve_interval_ms, 250);
    CHECK_INT(c->sites[3].upstream_wait_ms, 120000);
    CHECK_INT(c->sites[4].max_body, 100);
    CHECK_INT(c->sites[5].max_body, 2000000000ll);
    CHECK_INT(c->sites[6].max_body, 3072);
    moat_config_free(c);
}

static void test_comments_and_whitespace(void)
{
    moat_config_t *c = parse_ok("\xEF\xBB\xBF# Moatfile\n"
                                "\n"
                                "   \t  \n"
                                "  # indented comment\n"
                                "a.example.com\t127.0.0.1:1   # trailing comment\r\n"
                                "b.example.com 127.0.0.1:1 #hsts=on\r\n"
                                "c.example.com 127.0.0.1:1"); /* no final newline */
    if (c == NULL)
        return;
    CHECK_INT(c->nsites, 3);
    CHECK_INT(c->sites[0].line, 5);
    CHECK_INT(c->sites[0].nupstreams, 1);
    CHECK_INT(c->sites[1].hsts, -1);
    CHECK_INT(c->sites[2].line, 7);
    CHECK_STR(c->sites[2].upstreams[0].host, "127.0.0.1");
    moat_config_free(c);
}

static void test_brief_examples(void)
{
    CHECK_ERR("a.example.com 127.0.0.1:1\n\nb.example.com 127.0.0.1:8080 max_bdy=10M\n",
              "Moatfile:3:30: unknown option 'max_bdy'; did you mean 'max_body'?");
    CHECK_ERR("*.example.com 127.0.0.1:8080\n",
              "Moatfile:1:1: wildcard address '*.example.com' needs the DNS-01 challenge: add "
              "'dns=rfc2136 dns_server=HOST:PORT dns_tsig=KEYFILE' or 'dns=cloudflare "
              "dns_token_file=FILE' to the line (or list each name instead)");
    CHECK_ERR("a.example.com 127.0.0.1:1\nchat.example.com foo\n",
              "Moatfile:2:18: expected an upstream like '127.0.0.1:8080', 'http://app:8080' or "
              "'unix:/run/app.sock', got 'foo'");
    CHECK_ERR("chat.example.com 127.0.0.1:1\na.example.com 127.0.0.1:1\n"
              "b.example.com 127.0.0.1:1\nchat.example.com:443 127.0.0.1:2\n",
              "Moatfile:4:1: duplicate address 'chat.example.com:443' (first defined at "
              "Moatfile:1:1)");
    CHECK_ERR("a.example.com 127.0.0.1:1 hsts=yes\n",
              "Moatfile:1:32: bad value for hsts: expected on or off, got 'yes'");
}

static void test_address_errors(void)
{
#define ADDR_ERR(col, got)                                                                         \
    "Moatfile:1:" #col ": expected an address like 'chat.example.com' or "                         \
    "'localhost:8443', got '" got "'"
    CHECK_ERR("a.example.com:0 h:1", ADDR_ERR(1, "a.example.com:0") ": the port must be a "
                                                                    "number from 1 to 65535");
    CHECK_ERR("a.example.com:65536 h:1",
              ADDR_ERR(1, "a.example.com:65536") ": the port must be a number from 1 to 65535");
    CHECK_ERR("a.example.com: h:1",
              ADDR_ERR(1, "a.example.com:") ": the port must be a number from 1 to 65535");
    CHECK_ERR("::1 h:1", ADDR_ERR(1, "::1") ": put IPv6 addresses in brackets, like '[::1]'");
    CHECK_ERR("[::g] h:1", ADDR_ERR(1, "[::g]") ": not a valid IPv6 address");
    CHECK_ERR("[::1 h:1", ADDR_ERR(1, "[::1"));
    CHECK_ERR("[::1]x h:1", ADDR_ERR(1, "[::1]x"));
    CHECK_ERR("[::1]:99999 h:1",
              ADDR_ERR(1, "[::1]:99999") ": the port must be a number from 1 to 65535");
    CHECK_ERR("300.1.1.1 h:1", ADDR_ERR(1, "300.1.1.1") ": not a valid IPv4 address");
    CHECK_ERR("1.2.3 h:1", ADDR_ERR(1, "1.2.3") ": not a valid IPv4 address");
    CHECK_ERR("a.example.com/app h:1",
              ADDR_ERR(1, "a.example.com/app") ": a site address has no path: the site is the "
                                               "whole host");
    CHECK_ERR("ftp://a.example.com h:1",
              ADDR_ERR(1, "ftp://a.example.com") ": the scheme must be http:// or https://");
    CHECK_ERR("-a.example.com h:1",
              ADDR_ERR(1, "-a.example.com") ": a part of a host name cannot start or end with "
                                            "'-'");
    CHECK_ERR("a-.example.com h:1",
              ADDR_ERR(1, "a-.example.com") ": a part of a host name cannot start or end with "
                                            "'-'");
    CHECK_ERR("a.example-.com h:1",
              ADDR_ERR(1, "a.example-.com") ": a part of a host name cannot start or end with "
                                            "'-'");
    CHECK_ERR("a_b.example.com h:1",
              ADDR_ERR(1, "a_b.example.com") ": a host name has only letters, digits, hyphens "
                                             "and dots");
    CHECK_ERR("b\xc3\xbc"
              "cher.de h:1",
              ADDR_ERR(1, "b\xc3\xbc"
                          "cher.de") ": write internationalized names in their xn-- form");
    CHECK_ERR("a..example.com h:1", ADDR_ERR(1, "a..example.com"));
    CHECK_ERR(".example.com h:1", ADDR_ERR(1, ".example.com"));
    CHECK_ERR("a.example.com,,b.example.com h:1", ADDR_ERR(15, "") ": remove the extra comma");
    CHECK_ERR(":8443 h:1", ADDR_ERR(1, ":8443") ": the host name is missing");
    CHECK_ERR("https:// h:1", ADDR_ERR(1, "https://") ": the host name is missing");
    CHECK_ERR("a.example.com,https://*.example.com h:1",
              "Moatfile:1:15: wildcard address '*.example.com' needs the DNS-01 challenge: add "
              "'dns=rfc2136 dns_server=HOST:PORT dns_tsig=KEYFILE' or 'dns=cloudflare "
              "dns_token_file=FILE' to the line (or list each name instead)");
    CHECK_ERR("*.com h:1 dns=rfc2136 dns_server=ns1.example.com dns_tsig=/k",
              ADDR_ERR(1, "*.com") ": a wildcard is '*.' followed by a name with at least two "
                                   "parts, like '*.example.com'");
    CHECK_ERR("*.*.example.com h:1 dns=rfc2136 dns_server=ns1.example.com dns_tsig=/k",
              ADDR_ERR(1, "*.*.example.com") ": a wildcard is '*.' followed by a name with at "
                                             "least two parts, like '*.example.com'");
    char line[400];
    memset(line, 'a', 64);
    strcpy(line + 64, ".com h:1");
    char *got = errors_of(line);
    CHECK(strstr(got, "each dot-separated part of a host name is at most 63 characters") != NULL);
    free(got);
    size_t n = 0;
    for (int i = 0; i < 26; i++)
        n += (size_t)sprintf(line + n, "abcdefghi.");
    strcpy(line + n, "com h:1");
    got = errors_of(line);
    CHECK(strstr(got, "Moatfile:1:1: expected an address") == got);
    CHECK(strstr(got, ": a host name is at most 253 characters\n") != NULL);
    free(got);
    /* Echoed input is escaped and cut. */
    CHECK_ERR("a\x01.com h:1", ADDR_ERR(1, "a\\x01.com") ": a host name has only letters, "
                                                         "digits, hyphens and dots");
    memset(line, 'x', 100);
    strcpy(line + 100, "! h:1");
    got = errors_of(line);
    char want[120] = "got '";
    memset(want + 5, 'x', 80);
    strcpy(want + 85, "...': each");
    CHECK(strstr(got, want) != NULL);
    free(got);
#undef ADDR_ERR
}

static void test_duplicate_addresses(void)
{
    CHECK_ERR("a.example.com,b.example.com,A.example.com. h:1",
              "Moatfile:1:29: duplicate address 'a.example.com:443' (first defined at "
              "Moatfile:1:1)");
    CHECK_ERR("http://a.example.com h:1\n  a.example.com,http://a.example.com:80 h:1\n",
              "Moatfile:2:17: duplicate address 'http://a.example.com:80' (first defined at "
              "Moatfile:1:1)");
    CHECK_ERR("[::1]:8443 h:1\n[0::1]:8443 h:1\n",
              "Moatfile:2:1: duplicate address '[::1]:8443' (first defined at Moatfile:1:1)");
    /* Same host on another port or scheme is a different address. */
    moat_config_t *c = parse_ok("a.example.com,a.example.com:8443,http://a.example.com h:1\n"
                                "http://a.example.com:443 h:1\n");
    CHECK(c != NULL && c->nsites == 2);
    moat_config_free(c);
}

static void test_upstream_errors(void)
{
#define UP_ERR(col, got)                                                                           \
    "Moatfile:1:" #col ": expected an upstream like '127.0.0.1:8080', "                            \
    "'http://app:8080' or 'unix:/run/app.sock', got '" got "'"
    CHECK_ERR("a.example.com unix:run/app.sock",
              UP_ERR(15, "unix:run/app.sock") ": the socket path must be absolute, like "
                                              "'unix:/run/app.sock'");
    char line[300] = "a.example.com unix:/";
    memset(line + strlen(line), 'x', 107);
    char *got = errors_of(line);
    CHECK(strstr(got, ": the socket path is longer than 107 bytes\n") != NULL);
    free(got);
    line[strlen(line) - 1] = '\0'; /* 107 bytes fits */
    moat_config_t *c = parse_ok(line);
    moat_config_free(c);
    CHECK_ERR("a.example.com http://app:8080/api",
              UP_ERR(15, "http://app:8080/api") ": an upstream has no path: requests keep their "
                                                "own path");
    CHECK_ERR("a.example.com ws://app:8080",
              UP_ERR(15, "ws://app:8080") ": the scheme must be http:// or https://");
    CHECK_ERR("a.example.com 127.0.0.1:1,app",
              "Moatfile:1:27: expected an upstream like '127.0.0.1:8080', 'http://app:8080' or "
              "'unix:/run/app.sock', got 'app'");
    CHECK_ERR("a.example.com h:1,", UP_ERR(19, "") ": remove the extra comma");
    CHECK_ERR("a.example.com app:0", UP_ERR(15, "app:0") ": the port must be a number from 1 to "
                                                         "65535");
    CHECK_ERR("a.example.com ::1:80",
              UP_ERR(15, "::1:80") ": put IPv6 addresses in brackets, like '[::1]'");
    CHECK_ERR("a.example.com *:80",
              UP_ERR(15, "*:80") ": a host name has only letters, digits, hyphens and dots");
#undef UP_ERR
    CHECK_ERR("chat.example.com", "Moatfile:1:17: expected an upstream after 'chat.example.com', "
                                  "like '127.0.0.1:8080'");
    CHECK_ERR("chat.example.com   # forgot it",
              "Moatfile:1:17: expected an upstream after 'chat.example.com', like "
              "'127.0.0.1:8080'");
    CHECK_ERR("chat.example.com tls=internal",
              "Moatfile:1:18: expected an upstream after 'chat.example.com', like "
              "'127.0.0.1:8080'");
}

static void test_option_errors(void)
{
    const char *p = "a.example.com h:1 "; /* options start at column 19 */
    char buf[512];
#define OPT_ERR(opts, want)                                                                        \
    do {                                                                                           \
        snprintf(buf, sizeof buf, "%s%s", p, opts);                                                \
        char *got_ = errors_of(buf);                                                               \
        CHECK_STR(got_, want "\n");                                                                \
        free(got_);                                                                                \
    } while (0)
    OPT_ERR("frobnicate=1", "Moatfile:1:19: unknown option 'frobnicate'");
    OPT_ERR("HSTs=on hst=on", "Moatfile:1:27: unknown option 'hst'; did you mean 'hsts'?");
    OPT_ERR("=on", "Moatfile:1:19: unknown option ''");
    OPT_ERR("hsts=on hsts=off", "Moatfile:1:27: duplicate option 'hsts' (first set at column 19)");
    OPT_ERR("hsts", "Moatfile:1:19: expected an option like 'key=value', got 'hsts'");
    OPT_ERR("h:2", "Moatfile:1:19: expected an option like 'key=value', got 'h:2'; separate "
                   "several upstreams with commas, without spaces");
    OPT_ERR("hsts=", "Moatfile:1:24: bad value for hsts: expected on or off, got ''");
    OPT_ERR("hsts=of", "Moatfile:1:24: bad value for hsts: expected on or off, got 'of'; did you "
                       "mean 'on'?");
    OPT_ERR("hsts=no", "Moatfile:1:24: bad value for hsts: expected on or off, got 'no'");
    OPT_ERR("h2_websocket=1",
            "Moatfile:1:32: bad value for h2_websocket: expected on or off, got '1'");
    OPT_ERR("lb=least_con", "Moatfile:1:22: bad value for lb: expected round_robin, least_conn or "
                            "cookie, got 'least_con'; did you mean 'least_conn'?");
    OPT_ERR("lb=random",
            "Moatfile:1:22: bad value for lb: expected round_robin, least_conn or cookie, got "
            "'random'");
    OPT_ERR("tls=interal", "Moatfile:1:23: bad value for tls: expected internal, acme or "
                           "CERT.pem,KEY.pem, got 'interal'; did you mean 'internal'?");
    OPT_ERR("tls=cert.pem", "Moatfile:1:23: bad value for tls: expected internal, acme or "
                            "CERT.pem,KEY.pem, got 'cert.pem'");
    OPT_ERR("tls=cert.pem,", "Moatfile:1:23: bad value for tls: expected internal, acme or "
                             "CERT.pem,KEY.pem, got 'cert.pem,'");
    OPT_ERR("tls=a,b,c", "Moatfile:1:23: bad value for tls: expected internal, acme or "
                         "CERT.pem,KEY.pem, got 'a,b,c'");
    OPT_ERR("max_body=10XB", "Moatfile:1:28: bad value for max_body: expected a size like 10MB, "
                             "512KiB or none, got '10XB'");
    OPT_ERR("max_body=1.5G", "Moatfile:1:28: bad value for max_body: expected a size like 10MB, "
                             "512KiB or none, got '1.5G'");
    OPT_ERR("max_body=99999999999999999999",
            "Moatfile:1:28: bad value for max_body: expected a size like 10MB, 512KiB or none, "
            "got '99999999999999999999'");
    OPT_ERR("max_body=99999999999G",
            "Moatfile:1:28: bad value for max_body: expected a size like 10MB, 512KiB or none, "
            "got '99999999999G'");
    OPT_ERR("read_timeout=5x", "Moatfile:1:32: bad value for read_timeout: expected a duration "
                               "like 30s, 5m or 1h, got '5x'");
    OPT_ERR("read_timeout=-5s", "Moatfile:1:32: bad value for read_timeout: expected a duration "
                                "like 30s, 5m or 1h, got '-5s'");
    OPT_ERR("connect_timeout=2h", "Moatfile:1:35: bad value for connect_timeout: expected a "
                                  "duration from 1ms to 1h, got '2h'");
    OPT_ERR("header_timeout=0", "Moatfile:1:34: bad value for header_timeout: expected a duration "
                                "from 1ms to 1h, got '0'");
    OPT_ERR("keepalive_timeout=8d", "Moatfile:1:37: bad value for keepalive_timeout: expected a "
                                    "duration from 1ms to 7d, got '8d'");
    OPT_ERR("ws_idle_timeout=30000000000000000d",
            "Moatfile:1:35: bad value for ws_idle_timeout: expected a duration like 30s, 5m or 1h, "
            "got '30000000000000000d'");
    OPT_ERR("resolve_interval=2d", "Moatfile:1:36: bad value for resolve_interval: expected a "
                                   "duration from 0s to 1d, got '2d'");
    OPT_ERR("upstream_wait=2h", "Moatfile:1:33: bad value for upstream_wait: expected a duration "
                                "from 0s to 1h, got '2h'");
    OPT_ERR("upstream_wait=soon", "Moatfile:1:33: bad value for upstream_wait: expected a duration "
                                  "like 30s, 5m or 1h, got 'soon'");
    OPT_ERR("pool_idle=2d", "Moatfile:1:29: bad value for pool_idle: expected a duration from 0s "
                            "to 1d, got '2d'");
    OPT_ERR("trusted_proxies=10.0.0.0/8,10.0.0.0/33",
            "Moatfile:1:46: bad value for trusted_proxies: expected address ranges like "
            "10.0.0.0/8 or fd00::/8, got '10.0.0.0/33'");
    OPT_ERR("trusted_proxies=fd00::/129", "Moatfile:1:35: bad value for trusted_proxies: expected "
                                          "address ranges like 10.0.0.0/8 or fd00::/8, got "
                                          "'fd00::/129'");
    OPT_ERR("trusted_proxies=proxy", "Moatfile:1:35: bad value for trusted_proxies: expected "
                                     "address ranges like 10.0.0.0/8 or fd00::/8, got 'proxy'");
    OPT_ERR("trusted_proxies=10.0.0.0/", "Moatfile:1:35: bad value for trusted_proxies: expected "
                                         "address ranges like 10.0.0.0/8 or fd00::/8, got "
                                         "'10.0.0.0/'");
    OPT_ERR("email=admin", "Moatfile:1:25: bad value for email: expected an address like "
                           "admin@example.com, got 'admin'");
    OPT_ERR("email=a@b@example.com", "Moatfile:1:25: bad value for email: expected an address "
                                     "like admin@example.com, got 'a@b@example.com'");
    OPT_ERR("email=@example.com", "Moatfile:1:25: bad value for email: expected an address like "
                                  "admin@example.com, got '@example.com'");
    OPT_ERR("email=admin@localhost", "Moatfile:1:25: bad value for email: expected an address "
                                     "like admin@example.com, got 'admin@localhost'");
    OPT_ERR("ca=https://acme.example/dir,acme.example",
            "Moatfile:1:47: bad value for ca: expected ACME directory URLs like "
            "https://acme-v02.api.letsencrypt.org/directory, got 'acme.example'");
    OPT_ERR("ca=https:///dir", "Moatfile:1:22: bad value for ca: expected ACME directory URLs "
                               "like https://acme-v02.api.letsencrypt.org/directory, got "
                               "'https:///dir'");
    OPT_ERR("ca=\"https://a.example\"", "Moatfile:1:22: bad value for ca: expected ACME directory "
                                        "URLs like https://acme-v02.api.letsencrypt.org/directory, "
                                        "got '\"https://a.example\"'");
    OPT_ERR("ca=https://a\"b\"", "Moatfile:1:22: bad value for ca: expected ACME directory URLs "
                                 "like https://acme-v02.api.letsencrypt.org/directory, got "
                                 "'https://a\"b\"'");
    OPT_ERR("preferred_chain=", "Moatfile:1:35: bad value for preferred_chain: expected a chain "
                                "name like \"ISRG Root X1\" (in quotes when it has spaces), got "
                                "''");
    OPT_ERR("preferred_chain=\"ISRG\"x", "Moatfile:1:35: bad value for preferred_chain: expected "
                                         "a chain name like \"ISRG Root X1\" (in quotes when it "
                                         "has spaces), got '\"ISRG\"x'");
    OPT_ERR("preferred_chain=\"ISRG Root", "Moatfile:1:35: unterminated quote: add a closing '\"'");
    OPT_ERR("eab_kid=", "Moatfile:1:27: bad value for eab_kid: expected a key identifier from "
                        "your CA, got ''");
    OPT_ERR("eab_hmac=", "Moatfile:1:28: bad value for eab_hmac: expected the HMAC key from your "
                         "CA, got ''");
    OPT_ERR("eab_kid=k", "Moatfile:1:19: eab_kid needs eab_hmac too: the CA gives you both");
    OPT_ERR("eab_hmac=k", "Moatfile:1:19: eab_hmac needs eab_kid too: the CA gives you both");
    OPT_ERR("hsts=on#x", "Moatfile:1:24: bad value for hsts: expected on or off, got 'on#x'");
#undef OPT_ERR
}

static void test_input_bounds(void)
{
    static const char nul_text[] = "a.example.com 127.0.0.1:1\nb.example.com\0 h:1\n";
    moat_config_t *c = NULL;
    moat_config_errors_t errs = {0};
    CHECK_INT(moat_config_parse("Moatfile", nul_text, sizeof nul_text - 1, &c, &errs), MOAT_EPARSE);
    CHECK(c == NULL);
    CHECK_INT(errs.n, 1);
    if (errs.n == 1) {
        CHECK_INT(errs.items[0].line, 2);
        CHECK_INT(errs.items[0].col, 14);
        CHECK_STR(errs.items[0].msg, "unexpected NUL byte: a site file is plain text");
        CHECK_STR(errs.items[0].file, "Moatfile");
    }
    moat_config_errors_free(&errs);

    size_t n = MOAT_CONFIG_MAX_LINE + 1;
    char *big = malloc(MOAT_CONFIG_MAX_FILE + 2);
    memset(big, ' ', n);
    memcpy(big, "a.example.com h:1", 17);
    strcpy(big + n, "\n");
    char *got = errors_of(big);
    CHECK_STR(got, "Moatfile:1:1: line is too long (8193 bytes; the limit is 8192)\n");
    free(got);
    big[n - 1] = '\0'; /* exactly 8192 bytes is fine */
    c = parse_ok(big);
    moat_config_free(c);

    memset(big, '\n', MOAT_CONFIG_MAX_FILE + 1);
    memcpy(big, "a.example.com h:1", 17);
    CHECK_INT(moat_config_parse("Moatfile", big, MOAT_CONFIG_MAX_FILE + 1, &c, &errs), MOAT_EPARSE);
    CHECK_INT(errs.n, 1);
    if (errs.n == 1)
        CHECK_STR(errs.items[0].msg, "file is too large (1048577 bytes; the limit is 1 MiB)");
    moat_config_errors_free(&errs);
    CHECK_INT(moat_config_parse("Moatfile", big, MOAT_CONFIG_MAX_FILE, &c, NULL), 0);
    moat_config_free(c);
    free(big);

    CHECK_ERR("", "Moatfile: no sites defined; add a line like 'chat.example.com "
                  "127.0.0.1:8080'");
    CHECK_ERR("# only comments\n\n", "Moatfile: no sites defined; add a line like "
                                     "'chat.example.com 127.0.0.1:8080'");
}

static void test_all_errors_collected(void)
{
    CHECK_ERR("*.a.com foo max_bdy=1 hsts=maybe\n"
              "ok.example.com 127.0.0.1:1\n"
              "ok.example.com 127.0.0.1:2 lb=least_conn lb=cookie\n",
              "Moatfile:1:9: expected an upstream like '127.0.0.1:8080', 'http://app:8080' or "
              "'unix:/run/app.sock', got 'foo'\n"
              "Moatfile:1:13: unknown option 'max_bdy'; did you mean 'max_body'?\n"
              "Moatfile:1:28: bad value for hsts: expected on or off, got 'maybe'\n"
              "Moatfile:1:1: wildcard address '*.a.com' needs the DNS-01 challenge: add "
              "'dns=rfc2136 dns_server=HOST:PORT dns_tsig=KEYFILE' or 'dns=cloudflare "
              "dns_token_file=FILE' to the line (or list each name instead)\n"
              "Moatfile:3:1: duplicate address 'ok.example.com:443' (first defined at "
              "Moatfile:2:1)\n"
              "Moatfile:3:42: duplicate option 'lb' (first set at column 28)");

    /* A garbage file stops after MOAT_CONFIG_MAX_ERRORS errors, with one closing note. */
    char *text = malloc(300 * 4 + 1);
    for (int i = 0; i < 300; i++)
        memcpy(text + i * 4, "!!!\n", 4);
    text[1200] = '\0';
    moat_config_t *c = NULL;
    moat_config_errors_t errs = {0};
    CHECK_INT(moat_config_parse("Moatfile", text, 1200, &c, &errs), MOAT_EPARSE);
    CHECK_INT(errs.n, MOAT_CONFIG_MAX_ERRORS + 1);
    if (errs.n > MOAT_CONFIG_MAX_ERRORS) {
        CHECK_INT(errs.items[MOAT_CONFIG_MAX_ERRORS].line, 0);
        CHECK_STR(errs.items[MOAT_CONFIG_MAX_ERRORS].msg,
                  "too many errors; fix these and run again to see the rest");
    }
    moat_config_errors_free(&errs);
    free(text);
}

static void test_from_args(void)
{
    char *ok[] = {"chat.example.com,localhost:8443", "127.0.0.1:8080", "tls=internal"};
    moat_config_t *c = NULL;
    moat_config_errors_t errs = {0};
    CHECK_INT(moat_config_from_args(3, ok, &c, &errs), 0);
    CHECK_INT(errs.n, 0);
    if (c != NULL) {
        CHECK_STR(c->source, "<command line>");
        CHECK_INT(c->nsites, 1);
        CHECK_INT(c->sites[0].naddrs, 2);
        CHECK_INT(c->sites[0].tls, MOAT_TLS_INTERNAL);
    }
    moat_config_free(c);

    char *bad[] = {"chat.example.com", "127.0.0.1:8080", "hsts=yes"};
    CHECK_INT(moat_config_from_args(3, bad, &c, &errs), MOAT_EPARSE);
    CHECK(c == NULL);
    char *s = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&s, &n);
    moat_config_errors_print(&errs, f);
    fclose(f);
    CHECK_STR(s, "<command line>:1:38: bad value for hsts: expected on or off, got 'yes'\n");
    free(s);
    moat_config_errors_free(&errs);

    char *one[] = {"chat.example.com"};
    CHECK_INT(moat_config_from_args(1, one, &c, &errs), MOAT_EPARSE);
    CHECK_INT(errs.n, 1);
    if (errs.n == 1)
        CHECK_STR(errs.items[0].msg,
                  "expected an upstream after 'chat.example.com', like '127.0.0.1:8080'");
    moat_config_errors_free(&errs);

    CHECK_INT(moat_config_from_args(0, NULL, &c, &errs), MOAT_EPARSE);
    CHECK_INT(errs.n, 1);
    if (errs.n == 1) {
        CHECK_INT(errs.items[0].line, 0);
        CHECK_STR(errs.items[0].msg,
                  "expected a site like 'chat.example.com 127.0.0.1:8080' after the command");
    }
    moat_config_errors_free(&errs);
}

static void test_load_file(void)
{
    moat_config_t *c = NULL;
    moat_config_errors_t errs = {0};
    CHECK_INT(moat_config_load_file("/nonexistent/Moatfile", &c, &errs), MOAT_EIO);
    CHECK(c == NULL);
    char *s = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&s, &n);
    moat_config_errors_print(&errs, f);
    fclose(f);
    CHECK_STR(s, "/nonexistent/Moatfile: cannot read: No such file or directory\n");
    free(s);
    moat_config_errors_free(&errs);

    CHECK_INT(moat_config_load_file("/tmp", &c, &errs), MOAT_EIO);
    CHECK(errs.n == 1 && strcmp(errs.items[0].msg, "cannot read: Is a directory") == 0);
    moat_config_errors_free(&errs);

    char path[] = "/tmp/moat-config-test-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0);
    const char *text = "chat.example.com 127.0.0.1:8080\nb.example.com\n";
    CHECK(write(fd, text, strlen(text)) == (ssize_t)strlen(text));
    close(fd);
    CHECK_INT(moat_config_load_file(path, &c, &errs), MOAT_EPARSE);
    CHECK(errs.n == 1 && errs.items[0].line == 2 && strcmp(errs.items[0].file, path) == 0);
    moat_config_errors_free(&errs);
    fd = open(path, O_WRONLY | O_TRUNC);
    CHECK(write(fd, text, 32) == 32);
    close(fd);
    CHECK_INT(moat_config_load_file(path, &c, NULL), 0);
    CHECK(c != NULL && c->nsites == 1 && strcmp(c->source, path) == 0);
    moat_config_free(c);
    unlink(path);
}

static void test_print(void)
{
    moat_config_t *c = parse_ok(
        "chat.example.com,localhost:8443,http://[::1]:8080 127.0.0.1:8080,https://app:9443,"
        "unix:/run/app.sock max_body=10MiB hsts=on read_timeout=90m eab_kid=k eab_hmac=secret "
        "trusted_proxies=10.0.0.0/8 preferred_chain=\"ISRG Root X1\"\n"
        "http://plain.example.com h:80\n"
        "files.example.com h:1 tls=c.pem,k.pem pool_idle=500ms upstream_wait=0\n");
    if (c == NULL)
        return;
    char *s = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&s, &n);
    moat_config_print(c, f);
    fclose(f);
    CHECK_STR(s, "Moatfile: 3 sites\n"
                 "\n"
                 "site 1 (Moatfile:1)\n"
                 "  address      https://chat.example.com:443\n"
                 "  address      https://localhost:8443\n"
                 "  address      http://[::1]:8080 (plain HTTP, no redirect)\n"
                 "  upstream     http://127.0.0.1:8080\n"
                 "  upstream     https://app:9443 (certificate verified)\n"
                 "  upstream     unix:/run/app.sock\n"
                 "  certificate  automatic: ACME for chat.example.com; internal CA for localhost\n"
                 "  option       max_body=10MiB\n"
                 "  option       hsts=on\n"
                 "  option       read_timeout=90m\n"
                 "  option       trusted_proxies=10.0.0.0/8\n"
                 "  option       preferred_chain=\"ISRG Root X1\"\n"
                 "  option       eab_kid=k\n"
                 "  option       eab_hmac=(set)\n"
                 "\n"
                 "site 2 (Moatfile:2)\n"
                 "  address      http://plain.example.com:80 (plain HTTP, no redirect)\n"
                 "  upstream     http://h:80\n"
                 "  certificate  none (plain HTTP only)\n"
                 "\n"
                 "site 3 (Moatfile:3)\n"
                 "  address      https://files.example.com:443\n"
                 "  upstream     http://h:1\n"
                 "  certificate  files c.pem and k.pem\n"
                 "  option       pool_idle=500ms\n"
                 "  option       upstream_wait=0s\n");
    free(s);
    moat_config_free(c);
}

static void test_host_is_internal(void)
{
    CHECK_INT(moat_host_is_internal("localhost"), 1);
    CHECK_INT(moat_host_is_internal("LOCALHOST."), 1);
    CHECK_INT(moat_host_is_internal("app.localhost"), 1);
    CHECK_INT(moat_host_is_internal("127.0.0.1"), 1);
    CHECK_INT(moat_host_is_internal("8.8.8.8"), 1);
    CHECK_INT(moat_host_is_internal("::1"), 1);
    CHECK_INT(moat_host_is_internal("[2001:db8::1]"), 1);
    CHECK_INT(moat_host_is_internal("printer.local"), 1);
    CHECK_INT(moat_host_is_internal("chat.corp.internal"), 1);
    CHECK_INT(moat_host_is_internal("nas.home.arpa"), 1);
    CHECK_INT(moat_host_is_internal("webui"), 1);
    CHECK_INT(moat_host_is_internal("chat.example.com"), 0);
    CHECK_INT(moat_host_is_internal("local.example.com"), 0);
    CHECK_INT(moat_host_is_internal("notlocal"), 1);
    CHECK_INT(moat_host_is_internal("example.notlocal"), 0);
    CHECK_INT(moat_host_is_internal("home.arpa.example.com"), 0);
    CHECK_INT(moat_host_is_internal(""), 0);
    CHECK_INT(moat_host_is_internal(NULL), 0);
}

static int match(const moat_cidr_t *c, const char *ip)
{
    struct sockaddr_storage ss;
    memset(&ss, 0, sizeof ss);
    struct sockaddr_in *in = (struct sockaddr_in *)&ss;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
    if (inet_pton(AF_INET, ip, &in->sin_addr) == 1)
        in->sin_family = AF_INET;
    else if (inet_pton(AF_INET6, ip, &in6->sin6_addr) == 1)
        in6->sin6_family = AF_INET6;
    return moat_cidr_match(c, (struct sockaddr *)&ss);
}

static void test_cidr_match(void)
{
    moat_config_t *c = parse_ok("a.example.com h:1 trusted_proxies=10.0.0.0/8,192.168.1.0/25,"
                                "fd00::/8,2001:db8::1,0.0.0.0/0,172.16.0.0/12\n");
    if (c == NULL)
        return;
    const moat_cidr_t *t = c->sites[0].trusted;
    CHECK_INT(match(&t[0], "10.200.3.4"), 1);
    CHECK_INT(match(&t[0], "11.0.0.1"), 0);
    CHECK_INT(match(&t[0], "::ffff:10.1.1.1"), 1); /* dual-stack listener */
    CHECK_INT(match(&t[0], "fd00::1"), 0);
    CHECK_INT(match(&t[1], "192.168.1.127"), 1);
    CHECK_INT(match(&t[1], "192.168.1.128"), 0);
    CHECK_INT(match(&t[2], "fd12:3456::1"), 1);
    CHECK_INT(match(&t[2], "fe80::1"), 0);
    CHECK_INT(match(&t[2], "10.0.0.1"), 0);
    CHECK_INT(match(&t[3], "2001:db8::1"), 1);
    CHECK_INT(match(&t[3], "2001:db8::2"), 0);
    CHECK_INT(match(&t[4], "203.0.113.9"), 1);
    CHECK_INT(match(&t[5], "172.31.255.255"), 1);
    CHECK_INT(match(&t[5], "172.32.0.0"), 0);
    struct sockaddr unix_sa = {.sa_family = AF_UNIX};
    CHECK_INT(moat_cidr_match(&t[4], &unix_sa), 0);
    moat_config_free(c);
}

static void test_dns01(void)
{
    moat_config_t *c = parse_ok("*.ai.example.com,ai.example.com 127.0.0.1:8080 dns=rfc2136 "
                                "dns_server=ns1.example.com:53 dns_tsig=/etc/moat/tsig.key\n"
                                "chat.home.example.com 127.0.0.1:8080 dns=cloudflare "
                                "dns_token_file=/etc/moat/cf.token dns_wait=30s\n");
    if (c != NULL) {
        CHECK_STR(c->sites[0].addrs[0].host, "*.ai.example.com");
        CHECK_INT(c->sites[0].dns, MOAT_DNS_RFC2136);
        CHECK_STR(c->sites[0].dns_server, "ns1.example.com:53");
        CHECK_STR(c->sites[0].dns_tsig, "/etc/moat/tsig.key");
        CHECK_INT(c->sites[0].dns_wait_ms, 120000);
        CHECK_INT(c->sites[1].dns, MOAT_DNS_CLOUDFLARE);
        CHECK_INT(c->sites[1].dns_wait_ms, 30000);
        CHECK_INT(moat_host_is_internal("*.ai.example.com"), 0);
        moat_config_free(c);
    }
    CHECK_ERR("a.example.com h:1 dns=rfc2136",
              "Moatfile:1:19: dns needs dns_server=HOST:PORT (the primary that takes updates) too\n"
              "Moatfile:1:19: dns needs dns_tsig=FILE (a key made with 'tsig-keygen NAME > FILE') "
              "too");
    CHECK_ERR("a.example.com h:1 dns=cloudflare",
              "Moatfile:1:19: dns needs dns_token_file=FILE (an API token with Zone:Read and "
              "DNS:Edit) too");
    CHECK_ERR("a.example.com h:1 dns_tsig=/k",
              "Moatfile:1:19: dns_tsig only applies with dns=rfc2136 or dns=cloudflare");
    CHECK_ERR("a.example.com h:1 dns=rfc2136 dns_server=a:b:c dns_tsig=/k",
              "Moatfile:1:42: expected a DNS server like 'ns1.example.com:53': put IPv6 addresses "
              "in brackets, like '[::1]'");
    CHECK_ERR("a.example.com h:1 dns=rfc2136 dns_server=ns1 dns_tsig=/k dns_resolver=dns.local:53",
              "Moatfile:1:71: expected an IP address and port like '127.0.0.1:5353'");
    CHECK_ERR("a.example.com h:1 dns=route53", "Moatfile:1:23: bad value for dns: expected "
                                               "rfc2136 or cloudflare, got 'route53'");
    CHECK_ERR(
        "a.example.com h:1 dns=cloudflare dns_token_file=/t dns_api=http://api.example.com/v4",
        "Moatfile:1:60: expected an https:// API URL (plain http:// only to a loopback "
        "address), like https://api.cloudflare.com/client/v4");
    c = parse_ok("a.example.com h:1 dns=cloudflare dns_token_file=/t "
                 "dns_api=http://127.0.0.1:8080/client/v4\n");
    moat_config_free(c);
    /* A wildcard with its own certificate files needs no DNS-01. */
    c = parse_ok("*.example.com h:1 tls=/c.pem,/k.pem\n");
    moat_config_free(c);
}

int main(void)
{
    test_minimal_site_and_defaults();
    test_address_forms();
    test_upstream_forms();
    test_options();
    test_comments_and_whitespace();
    test_brief_examples();
    test_address_errors();
    test_duplicate_addresses();
    test_upstream_errors();
    test_option_errors();
    test_input_bounds();
    test_all_errors_collected();
    test_from_args();
    test_load_file();
    test_print();
    test_host_is_internal();
    test_cidr_match();
    test_dns01();
    return test_summary("config");
}
