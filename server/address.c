/* Addresses in the site file: site addresses, upstreams, CIDR ranges, and which host names
 * are internal (server/address.h). Pure functions over byte ranges. */
#include "address.h"
#include "moat/common.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <sys/un.h>

char *moat__lower_dup(const char *p, size_t n)
{
    char *s = moat_xstrndup(p, n);
    for (size_t i = 0; i < n; i++)
        s[i] = (char)moat__lower((unsigned char)s[i]);
    return s;
}

static int parse_port(const char *p, size_t n, int *port)
{
    if (n == 0 || n > 5)
        return -1;
    int v = 0;
    for (size_t i = 0; i < n; i++) {
        if (!moat__is_digit((unsigned char)p[i]))
            return -1;
        v = v * 10 + (p[i] - '0');
    }
    if (v < 1 || v > 65535)
        return -1;
    *port = v;
    return 0;
}

/* Checks a DNS name (letters, digits, hyphens and dots; underscores too when allowed,
 * because container names in Docker networks may have them). */
int moat_address_check_name(const char *h, size_t n, int allow_underscore, const char **why)
{
    if (n > 253) {
        *why = "a host name is at most 253 characters";
        return -1;
    }
    size_t lab = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)h[i];
        if (ch == '.') {
            if (lab == 0)
                return -1;
            if (h[i - 1] == '-') {
                *why = "a part of a host name cannot start or end with '-'";
                return -1;
            }
            lab = 0;
            continue;
        }
        if (ch >= 0x80) {
            *why = "write internationalized names in their xn-- form";
            return -1;
        }
        if (!(moat__is_digit(ch) || (moat__lower(ch) >= 'a' && moat__lower(ch) <= 'z') ||
              ch == '-' || (allow_underscore && ch == '_'))) {
            *why = "a host name has only letters, digits, hyphens and dots";
            return -1;
        }
        if (ch == '-' && lab == 0) {
            *why = "a part of a host name cannot start or end with '-'";
            return -1;
        }
        if (++lab > 63) {
            *why = "each dot-separated part of a host name is at most 63 characters";
            return -1;
        }
    }
    if (lab == 0)
        return -1;
    if (h[n - 1] == '-') {
        *why = "a part of a host name cannot start or end with '-'";
        return -1;
    }
    return 0;
}

/* HOST[:PORT] with HOST a name, IPv4 or [IPv6]. Returns 0, or -1 with *why a hint for the
 * user (NULL when the generic "expected ..." says enough). */
int moat_address_parse_hostport(const char *p, size_t n, int is_site, moat_hostport_t *out,
                                const char **why)
{
    const char *host = p, *port = NULL;
    size_t hlen = n, plen = 0;
    int v6 = 0;
    *why = NULL;
    out->host = NULL;
    out->port = 0;
    if (n > 0 && p[0] == '[') {
        const char *end = memchr(p, ']', n);
        if (end == NULL)
            return -1;
        host = p + 1;
        hlen = (size_t)(end - host);
        v6 = 1;
        size_t rest = n - (size_t)(end + 1 - p);
        if (rest > 0) {
            if (end[1] != ':')
                return -1;
            port = end + 2;
            plen = rest - 1;
        }
    } else {
        const char *colon = memchr(p, ':', n);
        if (colon != NULL) {
            if (memchr(colon + 1, ':', n - (size_t)(colon + 1 - p)) != NULL) {
                *why = "put IPv6 addresses in brackets, like '[::1]'";
                return -1;
            }
            hlen = (size_t)(colon - p);
            port = colon + 1;
            plen = n - hlen - 1;
        }
    }
    if (hlen == 0) {
        *why = "the host name is missing";
        return -1;
    }
    if (v6) {
        char buf[INET6_ADDRSTRLEN + 1], canon[INET6_ADDRSTRLEN];
        struct in6_addr a;
        if (hlen >= sizeof buf) {
            *why = "not a valid IPv6 address";
            return -1;
        }
        memcpy(buf, host, hlen);
        buf[hlen] = '\0';
        if (inet_pton(AF_INET6, buf, &a) != 1) {
            *why = "not a valid IPv6 address";
            return -1;
        }
        /* Canonical text, so [0:0::1] and [::1] are recognised as the same address. */
        inet_ntop(AF_INET6, &a, canon, sizeof canon);
        out->kind = MOAT_HOST_IPV6;
        if (port != NULL && parse_port(port, plen, &out->port) < 0) {
            *why = "the port must be a number from 1 to 65535";
            return -1;
        }
        out->host = moat_xstrdup(canon);
        return 0;
    }
    if (hlen > 1 && host[hlen - 1] == '.')
        hlen--; /* "example.com." names the same host */
    if (is_site && host[0] == '*') {
        /* "*.example.com": one leftmost label, any name (RFC 6125 §6.4.3). Whether the site
         * can get a certificate for it (dns=) is the line's check, in config.c. */
        if (hlen < 4 || host[1] != '.' || memchr(host + 2, '.', hlen - 2) == NULL ||
            moat_address_check_name(host + 2, hlen - 2, 0, why) < 0) {
            *why = MOAT_WILDCARD_WHY;
            return -1;
        }
        if (port != NULL && parse_port(port, plen, &out->port) < 0) {
            *why = "the port must be a number from 1 to 65535";
            return -1;
        }
        out->kind = MOAT_HOST_NAME;
        out->host = moat__lower_dup(host, hlen);
        return 0;
    }
    size_t digits = 0;
    for (size_t i = 0; i < hlen; i++)
        digits += moat__is_digit((unsigned char)host[i]) || host[i] == '.';
    if (digits == hlen) {
        char buf[INET_ADDRSTRLEN + 1];
        struct in_addr a;
        if (hlen >= sizeof buf) {
            *why = "not a valid IPv4 address";
            return -1;
        }
        memcpy(buf, host, hlen);
        buf[hlen] = '\0';
        if (inet_pton(AF_INET, buf, &a) != 1) {
            *why = "not a valid IPv4 address";
            return -1;
        }
        out->kind = MOAT_HOST_IPV4;
    } else {
        if (moat_address_check_name(host, hlen, !is_site, why) < 0)
            return -1;
        out->kind = moat_slice_ieq(moat_slice(host, hlen), "localhost") ? MOAT_HOST_LOCALHOST
                                                                        : MOAT_HOST_NAME;
    }
    if (port != NULL && parse_port(port, plen, &out->port) < 0) {
        *why = "the port must be a number from 1 to 65535";
        return -1;
    }
    out->host = moat__lower_dup(host, hlen);
    return 0;
}

/* Accepts one trailing "/" (people paste URLs) and rejects any other path. */
static int strip_slash(const char *p, size_t *n)
{
    const char *slash = memchr(p, '/', *n);
    if (slash == NULL)
        return 0;
    if (slash != p + *n - 1)
        return -1;
    (*n)--;
    return 0;
}

int moat_address_parse_site(const char *p, size_t n, moat_site_addr_t *a, const char **why)
{
    memset(a, 0, sizeof *a);
    *why = NULL;
    if (moat__has_iprefix(p, n, "http://")) {
        a->plain_http = 1;
        p += 7, n -= 7;
    } else if (moat__has_iprefix(p, n, "https://")) {
        p += 8, n -= 8;
    } else if (memmem(p, n, "://", 3) != NULL) {
        *why = "the scheme must be http:// or https://";
        return -1;
    }
    if (strip_slash(p, &n) < 0) {
        *why = "a site address has no path: the site is the whole host";
        return -1;
    }
    moat_hostport_t hp;
    if (moat_address_parse_hostport(p, n, 1, &hp, why) < 0)
        return -1;
    a->host = hp.host;
    a->kind = hp.kind;
    a->port = hp.port;
    return 0;
}

int moat_address_parse_upstream(const char *p, size_t n, moat_upstream_addr_t *u, const char **why)
{
    int def_port = 0;
    memset(u, 0, sizeof *u);
    *why = NULL;
    if (moat__has_iprefix(p, n, "unix:")) {
        if (n == 5 || p[5] != '/') {
            *why = "the socket path must be absolute, like 'unix:/run/app.sock'";
            return -1;
        }
        if (n - 5 >= sizeof(((struct sockaddr_un *)0)->sun_path)) {
            *why = "the socket path is longer than 107 bytes";
            return -1;
        }
        u->kind = MOAT_UPSTREAM_UNIX;
        u->path = moat_xstrndup(p + 5, n - 5);
        return 0;
    }
    u->kind = MOAT_UPSTREAM_TCP;
    if (moat__has_iprefix(p, n, "http://")) {
        def_port = 80;
        p += 7, n -= 7;
    } else if (moat__has_iprefix(p, n, "https://")) {
        u->kind = MOAT_UPSTREAM_TLS;
        def_port = 443;
        p += 8, n -= 8;
    } else if (memmem(p, n, "://", 3) != NULL) {
        *why = "the scheme must be http:// or https://";
        return -1;
    }
    if (strip_slash(p, &n) < 0) {
        *why = "an upstream has no path: requests keep their own path";
        return -1;
    }
    moat_hostport_t hp;
    if (moat_address_parse_hostport(p, n, 0, &hp, why) < 0)
        return -1;
    if (hp.port == 0 && def_port == 0) {
        free(hp.host);
        return -1; /* "host" alone: the generic message shows the host:port form */
    }
    u->host = hp.host;
    u->port = hp.port ? hp.port : def_port;
    return 0;
}

int moat_address_parse_cidr(const char *p, size_t len, moat_cidr_t *out)
{
    char buf[INET6_ADDRSTRLEN + 1];
    const char *slash = memchr(p, '/', len);
    size_t alen = slash ? (size_t)(slash - p) : len;
    if (alen == 0 || alen >= sizeof buf)
        return -1;
    memcpy(buf, p, alen);
    buf[alen] = '\0';
    memset(out, 0, sizeof *out);
    int max;
    if (inet_pton(AF_INET, buf, out->addr) == 1) {
        out->family = AF_INET;
        max = 32;
    } else if (inet_pton(AF_INET6, buf, out->addr) == 1) {
        out->family = AF_INET6;
        max = 128;
    } else {
        return -1;
    }
    out->prefix = max;
    if (slash != NULL) {
        size_t plen = len - alen - 1;
        int v = 0;
        if (plen == 0 || plen > 3)
            return -1;
        for (size_t i = 0; i < plen; i++) {
            if (!moat__is_digit((unsigned char)slash[1 + i]))
                return -1;
            v = v * 10 + (slash[1 + i] - '0');
        }
        if (v > max)
            return -1;
        out->prefix = v;
    }
    /* Clear host bits so matching can compare whole bytes. */
    for (int bit = out->prefix; bit < max; bit++)
        out->addr[bit / 8] &= (uint8_t) ~(0x80u >> (bit % 8));
    return 0;
}

int moat_host_is_internal(const char *host)
{
    static const char *const suffixes[] = {".localhost", ".local", ".internal", ".home.arpa"};
    char buf[INET6_ADDRSTRLEN + 1];
    unsigned char addr[16];
    if (host == NULL)
        return 0;
    size_t n = strlen(host);
    if (n > 0 && host[n - 1] == '.')
        n--;
    if (n == 0)
        return 0;
    const char *h = host;
    size_t hn = n;
    if (n >= 2 && host[0] == '[' && host[n - 1] == ']')
        h = host + 1, hn = n - 2;
    if (hn < sizeof buf) {
        memcpy(buf, h, hn);
        buf[hn] = '\0';
        if (inet_pton(AF_INET, buf, addr) == 1 || inet_pton(AF_INET6, buf, addr) == 1)
            return 1;
    }
    /* A single-label name ("localhost", "webui") can never get a public certificate. */
    if (memchr(host, '.', n) == NULL)
        return 1;
    for (size_t i = 0; i < MOAT_ARRAY_LEN(suffixes); i++) {
        size_t k = strlen(suffixes[i]);
        if (n > k && moat_slice_ieq(moat_slice(host + n - k, k), suffixes[i]))
            return 1;
    }
    return 0;
}

int moat_cidr_match(const moat_cidr_t *c, const struct sockaddr *sa)
{
    uint8_t addr[16];
    int family;
    if (sa->sa_family == AF_INET) {
        struct sockaddr_in in;
        memcpy(&in, sa, sizeof in);
        memcpy(addr, &in.sin_addr, 4);
        family = AF_INET;
    } else if (sa->sa_family == AF_INET6) {
        struct sockaddr_in6 in6;
        memcpy(&in6, sa, sizeof in6);
        /* A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d. */
        if (IN6_IS_ADDR_V4MAPPED(&in6.sin6_addr)) {
            memcpy(addr, in6.sin6_addr.s6_addr + 12, 4);
            family = AF_INET;
        } else {
            memcpy(addr, in6.sin6_addr.s6_addr, 16);
            family = AF_INET6;
        }
    } else {
        return 0;
    }
    if (family != c->family)
        return 0;
    int full = c->prefix / 8, rest = c->prefix % 8;
    if (memcmp(addr, c->addr, (size_t)full) != 0)
        return 0;
    if (rest == 0)
        return 1;
    uint8_t mask = (uint8_t)(0xffu << (8 - rest));
    return (addr[full] & mask) == (c->addr[full] & mask);
}
