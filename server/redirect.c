/* ACME HTTP-01 answers and the redirect to HTTPS (server/redirect.h). */
#include "redirect.h"

#include "moat/acme.h"

#include <stdio.h>

#define ACME_PREFIX "/.well-known/acme-challenge/"

/* ACME HTTP-01, answered before any redirect. The token table is tiny (acme/challenge.c).
 * A token moat does not know is a 404: the CA must not follow a redirect to a site that
 * cannot answer either. */
static void answer_acme(moat_front_t *f, moat_slice_t target)
{
    const char *tok = target.base + sizeof ACME_PREFIX - 1;
    size_t tlen = target.len - (sizeof ACME_PREFIX - 1);
    const char *q = memchr(tok, '?', tlen);
    char ka[512];
    int kl = moat_acme_http01_get(tok, q ? (size_t)(q - tok) : tlen, ka, sizeof ka);
    f->body_unread = 1; /* the connection ends after the answer, as before */
    if (kl < 0) {
        moat_front_answer(f, 404, moat_http_page_headers, MOAT_HTTP_PAGE_NHEADERS,
                          moat_slice_str(moat_http_error_page(404)));
        return;
    }
    static const moat_header_t type = {MOAT_SLICE_LIT("content-type"),
                                       MOAT_SLICE_LIT("application/octet-stream")};
    moat_front_answer(f, 200, &type, 1, moat_slice(ka, (size_t)kl));
}

/* 308 to the HTTPS address of the site: its canonical name, its port when not 443, and the
 * request's path and query. */
static void answer_redirect(moat_front_t *f, const moat_site_addr_t *a, moat_slice_t authority,
                            moat_slice_t target)
{
    int https_port = moat_runtime_addr_port(f->rt, a);
    int v6 = a->kind == MOAT_HOST_IPV6;
    target = moat_http1_origin_form(target);
    char port[16] = "";
    if (https_port != 443)
        snprintf(port, sizeof port, ":%d", https_port);
    /* A wildcard address redirects to the name asked for (moat_runtime_host_matches checked
     * it is one plain label under the wildcard's domain). */
    char host[300];
    if (a->host[0] == '*') {
        const char *colon = memchr(authority.base, ':', authority.len);
        size_t hl = colon ? (size_t)(colon - authority.base) : authority.len;
        if (hl > 0 && authority.base[hl - 1] == '.')
            hl--;
        snprintf(host, sizeof host, "%.*s", (int)MOAT_MIN(hl, sizeof host - 1), authority.base);
        for (char *p = host; *p; p++)
            if (*p >= 'A' && *p <= 'Z')
                *p = (char)(*p + 32);
    } else {
        snprintf(host, sizeof host, "%s", a->host);
    }
    char location[MOAT_HTTP1_MAX_TARGET + 512];
    int n = snprintf(location, sizeof location, "https://%s%s%s%s%.*s", v6 ? "[" : "", host,
                     v6 ? "]" : "", port, (int)target.len, target.base);
    if (n < 0 || (size_t)n >= sizeof location)
        n = snprintf(location, sizeof location, "https://%s%s%s%s/", v6 ? "[" : "", host,
                     v6 ? "]" : "", port);
    moat_header_t h = {MOAT_SLICE_LIT("location"), moat_slice(location, (size_t)n)};
    moat_front_answer(f, 308, &h, 1, (moat_slice_t){0});
}

int moat_redirect_answer(moat_front_t *f, const moat_front_req_t *req)
{
    moat_slice_t t = req->target;
    if (t.len >= sizeof ACME_PREFIX - 1 &&
        memcmp(t.base, ACME_PREFIX, sizeof ACME_PREFIX - 1) == 0) {
        answer_acme(f, t);
        return 1;
    }
    const moat_site_addr_t *a = moat_runtime_find_tls_addr(f->rt, req->authority);
    if (a == NULL)
        return 0;
    answer_redirect(f, a, req->authority, t);
    return 1;
}
