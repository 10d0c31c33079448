/* Addresses as the site file writes them: site addresses (`chat.example.com`, `http://[::1]:8080`),
 * upstreams (`127.0.0.1:8080`, `https://app:8443`, `unix:/run/app.sock`), CIDR ranges, and
 * which host names are internal. Pure functions over byte ranges, used by the site-file
 * parser (server/config.c). On failure they return -1 and may point *why at a static
 * sentence saying what was wrong. Strings they return are the caller's to free. */
#ifndef MOAT_ADDRESS_H
#define MOAT_ADDRESS_H

#include "moat/common.h"
#include "moat/config.h"
#include <stddef.h>
#include <string.h>

#define MOAT_WILDCARD_WHY                                                                          \
    "a wildcard is '*.' followed by a name with at least two parts, like '*.example.com'"

typedef struct {
    char *host; /* lower-case, IPv6 without brackets */
    moat_host_kind_t kind;
    int port; /* 0 when not written */
} moat_hostport_t;

/* host[:port] or [v6][:port]; is_site applies the stricter rules of site addresses. */
int moat_address_parse_hostport(const char *p, size_t n, int is_site, moat_hostport_t *out,
                                const char **why);
/* A DNS name: letters, digits, hyphens and dots (underscores too when allowed: Docker
 * container names may have them). */
int moat_address_check_name(const char *h, size_t n, int allow_underscore, const char **why);
/* A site address; a->line and a->col are left for the caller. */
int moat_address_parse_site(const char *p, size_t n, moat_site_addr_t *a, const char **why);
int moat_address_parse_upstream(const char *p, size_t n, moat_upstream_addr_t *u, const char **why);
/* ADDR or ADDR/PREFIX, IPv4 or IPv6; host bits are cleared. */
int moat_address_parse_cidr(const char *p, size_t len, moat_cidr_t *out);

/* Small ASCII helpers shared with the parser. */
static inline int moat__lower(int ch)
{
    return ch >= 'A' && ch <= 'Z' ? ch + 32 : ch;
}
static inline int moat__is_digit(int ch)
{
    return ch >= '0' && ch <= '9';
}
static inline int moat__has_iprefix(const char *p, size_t n, const char *pre)
{
    size_t k = strlen(pre);
    return n >= k && moat_slice_ieq(moat_slice(p, k), pre);
}
char *moat__lower_dup(const char *p, size_t n);

#endif
