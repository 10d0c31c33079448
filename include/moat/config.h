/* The site file (Moatfile) parser: one site per line,
 *
 *     ADDRESS[,ADDRESS...] UPSTREAM[,UPSTREAM...] [key=value ...]   # comment
 *
 * The parser is pure: it takes bytes and returns a config or a list of errors (every error
 * in the file, each with file:line:column and what was expected). Only
 * moat_config_load_file() touches the disk.
 *
 * Ownership: a moat_config_t owns every string and array reachable from it; release it
 * with moat_config_free() only. A moat_config_errors_t owns its items; release it with
 * moat_config_errors_free(). Nothing here is shared with another thread while being built;
 * a finished config is never modified, so a snapshot may be read from any thread. */
#ifndef MOAT_CONFIG_H
#define MOAT_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/socket.h>

/* Input bounds: larger files or lines are rejected with an error that says so. */
#define MOAT_CONFIG_MAX_FILE (1024 * 1024)
#define MOAT_CONFIG_MAX_LINE 8192
/* After this many errors the parser stops reading and adds one "too many errors" item. */
#define MOAT_CONFIG_MAX_ERRORS 100

typedef enum {
    MOAT_HOST_NAME,
    MOAT_HOST_LOCALHOST,
    MOAT_HOST_IPV4,
    MOAT_HOST_IPV6
} moat_host_kind_t;

/* One address a site answers on. */
typedef struct {
    char *host; /* lower-case, IPv6 without brackets, no trailing dot */
    moat_host_kind_t kind;
    int port;       /* 0 = use the listener default (443, or 80 for plain_http) */
    int plain_http; /* written as http://: served over plain HTTP, no redirect */
    int line, col;  /* where it was written (1-based) */
} moat_site_addr_t;

typedef enum { MOAT_UPSTREAM_TCP, MOAT_UPSTREAM_TLS, MOAT_UPSTREAM_UNIX } moat_upstream_kind_t;

/* One backend. TCP and TLS have host (lower-case name or IP literal, IPv6 without brackets)
 * and port (always set: 80/443 when an http:// / https:// form omitted it); UNIX has path
 * (absolute) and host NULL, port 0. TLS means HTTPS to the upstream, certificate verified. */
typedef struct {
    moat_upstream_kind_t kind;
    char *host;
    int port;
    char *path; /* unix */
} moat_upstream_addr_t;

/* AUTO: the caller decides later (ACME for public names, internal CA for internal ones). */
typedef enum { MOAT_TLS_AUTO, MOAT_TLS_INTERNAL, MOAT_TLS_ACME, MOAT_TLS_FILES } moat_tls_mode_t;

/* dns=: who publishes ACME DNS-01 records for the site (none: HTTP-01 / TLS-ALPN-01). */
typedef enum { MOAT_DNS_NONE = 0, MOAT_DNS_RFC2136, MOAT_DNS_CLOUDFLARE } moat_dns_provider_t;

typedef enum { MOAT_LB_ROUND_ROBIN, MOAT_LB_LEAST_CONN, MOAT_LB_COOKIE } moat_lb_t;

/* An address range; host bits beyond prefix are zero. addr holds 4 bytes for AF_INET. */
typedef struct {
    uint8_t addr[16];
    int family; /* AF_INET/AF_INET6 */
    int prefix;
} moat_cidr_t;

/* One line of the site file. Every field holds its default when the option was not given
 * (see the option table in server/config.c): max_body 0 = no limit, hsts -1 = auto,
 * connect 10s, read 30m, header 30s, keepalive 5m, ws_idle 1h, pool_idle 4s, resolve_interval
 * 30s, upstream_wait 10s, lb round robin, h2_websocket 1. Unset strings are NULL, unset lists
 * empty. Sizes: K, M, G and KiB, MiB, GiB are binary, KB, MB, GB decimal; durations take ms, s, m,
 * h, d (a bare number is seconds). A value may be "quoted" to hold spaces (preferred_chain="ISRG
 * Root X1"). Paths (tls_cert, tls_key) are kept as written: a relative path is relative to the
 * caller's choice of directory. */
typedef struct moat_site {
    moat_site_addr_t *addrs;
    size_t naddrs;
    moat_upstream_addr_t *upstreams;
    size_t nupstreams;
    moat_tls_mode_t tls;
    char *tls_cert, *tls_key; /* MOAT_TLS_FILES only */
    uint64_t max_body;        /* bytes, 0 = no limit */
    int hsts;                 /* -1 auto, 0 off, 1 on */
    uint64_t connect_timeout_ms, read_timeout_ms, header_timeout_ms, keepalive_timeout_ms,
        ws_idle_timeout_ms, pool_idle_ms;
    /* Upstream host names are looked up again this often (0: only when a connect fails). */
    uint64_t resolve_interval_ms;
    /* How long a request waits for an upstream that refuses connections (0: not at all). */
    uint64_t upstream_wait_ms;
    moat_cidr_t *trusted;
    size_t ntrusted;
    int lb; /* moat_lb_t */
    int h2_websocket;
    char *email;
    char **cas; /* ACME directory URLs, in order of preference */
    size_t ncas;
    char *preferred_chain, *eab_kid, *eab_hmac;
    /* DNS-01 (dns=rfc2136|cloudflare). Secrets are never here, only the files that hold them:
     * dns_tsig (a tsig-keygen key file) and dns_token_file (a Cloudflare API token), each
     * checked to be mode 0600 or stricter when an order uses it. dns_server is HOST[:PORT] of
     * the primary that takes RFC 2136 updates. dns_resolver (IP:PORT) replaces the system
     * resolver for finding the zone's authoritative servers, and those servers are then asked
     * at its port too (split-horizon setups and tests); dns_api replaces Cloudflare's API base
     * URL (tests). dns_wait bounds the wait for the record to show on every authoritative
     * server. */
    int dns; /* moat_dns_provider_t */
    char *dns_server, *dns_tsig, *dns_token_file, *dns_resolver, *dns_api;
    uint64_t dns_wait_ms;
    int line;
} moat_site_t;

typedef struct moat_config {
    moat_site_t *sites;
    size_t nsites;
    char *source; /* file name as given to the parser, or "<command line>" */
} moat_config_t;

/* line 0 means the error is about the whole file (then col is 0 too). */
typedef struct {
    char *file;
    int line, col;
    char *msg;
} moat_config_error_t;

/* Start zero-initialised; the functions below append to it. */
typedef struct {
    moat_config_error_t *items;
    size_t n;
} moat_config_errors_t;

/* Parse `len` bytes of site-file text; `filename` is only used in messages and as source.
 * Returns 0 and a new config in *out, or MOAT_EPARSE with *out NULL and at least one error
 * appended to errs (errs may be NULL when the caller does not want the messages). A file
 * without any site is an error. */
int moat_config_parse(const char *filename, const char *text, size_t len, moat_config_t **out,
                      moat_config_errors_t *errs);

/* Read and parse the file at path. A missing or unreadable file is one error
 * "PATH: cannot read: <strerror>" (line 0) and returns MOAT_EIO; otherwise as above. */
int moat_config_load_file(const char *path, moat_config_t **out, moat_config_errors_t *errs);

/* One site from command-line words: argv holds SITE UPSTREAM [key=value...] only (no
 * program name or subcommand). The words are joined with single spaces and parsed as one
 * line of a file named "<command line>", so columns count in that joined line. */
int moat_config_from_args(int argc, char **argv, moat_config_t **out, moat_config_errors_t *errs);

void moat_config_free(moat_config_t *c);

/* One line per error: "FILE:LINE:COL: MESSAGE", or "FILE: MESSAGE" for line 0. */
void moat_config_errors_print(const moat_config_errors_t *e, FILE *f);
void moat_config_errors_free(moat_config_errors_t *e);

/* A human summary for `moat validate`: per site its addresses with scheme and port, its
 * upstreams, where its certificate comes from, and the options that differ from the
 * defaults. */
void moat_config_print(const moat_config_t *c, FILE *f);

/* 1 when no public CA can issue for host: localhost, *.localhost, any IP literal (IPv6 with
 * or without brackets), single-label names, *.local, *.internal, *.home.arpa. Case and one
 * trailing dot are ignored. */
int moat_host_is_internal(const char *host);

/* 1 when the address in sa (AF_INET or AF_INET6; an IPv4-mapped IPv6 address counts as the
 * IPv4 address) lies in c, else 0. */
int moat_cidr_match(const moat_cidr_t *c, const struct sockaddr *sa);

#endif
