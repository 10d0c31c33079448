/* Cloudflare API v4 for DNS-01 (server/dns01_cloudflare.h). One call_t per add or remove walks
 * through its requests; each response is read with jansson, never by hand. */
#include "dns01_cloudflare.h"
#include "moat/common.h"
#include "moat/log.h"

#include <openssl/mem.h>

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>

#define MAX_IDS 16

enum { C_ZONE, C_CREATE, C_LIST, C_DELETE };

typedef struct {
    moat_httpc_t *h;
    int step;
    char *api, *auth, *fqdn, *value, *zone_id, *zone;
    const char *cand; /* the zone name being tried, inside fqdn */
    char *ids[MAX_IDS];
    size_t nids, id_i;
    moat_cf_cb cb;
    void *arg;
} call_t;

static void call_end(call_t *c, int rc, const char *error)
{
    c->cb(c->arg, rc, error, rc == 0 ? c->zone_id : NULL, rc == 0 ? c->zone : NULL);
    free(c->api);
    if (c->auth) {
        OPENSSL_cleanse(c->auth, strlen(c->auth));
        free(c->auth);
    }
    free(c->fqdn);
    free(c->value);
    free(c->zone_id);
    free(c->zone);
    for (size_t i = 0; i < c->nids; i++)
        free(c->ids[i]);
    free(c);
}

static void on_response(void *data, const moat_httpc_response_t *r);

static void send_req(call_t *c, const char *method, const char *path, const char *body)
{
    char url[1024];
    snprintf(url, sizeof url, "%s%s", c->api, path);
    int rc = moat_httpc_request_ex(c->h, method, url, c->auth, body ? "application/json" : NULL,
                                   body, body ? strlen(body) : 0, on_response, c);
    if (rc < 0) {
        char msg[1200];
        snprintf(msg, sizeof msg, "cannot send a request to %s: %s", url, moat_strerror(rc));
        call_end(c, rc, msg);
    }
}

/* "Cloudflare API: 10000 Authentication error (HTTP 403)", with a hint for refusals. */
static void api_error(call_t *c, const moat_httpc_response_t *r, json_t *j)
{
    char msg[1024];
    int n = snprintf(msg, sizeof msg, "Cloudflare API at %s:", c->api);
    json_t *errs = json_object_get(j, "errors"), *e;
    size_t i;
    json_array_foreach(errs, i, e)
    {
        if (n < 0 || (size_t)n >= sizeof msg)
            break;
        n += snprintf(msg + n, sizeof msg - (size_t)n, "%s %lld %s", i ? ";" : "",
                      (long long)json_integer_value(json_object_get(e, "code")),
                      json_string_value(json_object_get(e, "message"))
                          ? json_string_value(json_object_get(e, "message"))
                          : "");
    }
    if (n >= 0 && (size_t)n < sizeof msg)
        snprintf(msg + n, sizeof msg - (size_t)n, " (HTTP %d)%s", r->status,
                 r->status == 401 || r->status == 403
                     ? "; the API token needs Zone:Read and DNS:Edit permissions for the zone"
                     : "");
    call_end(c, MOAT_EIO, msg);
}

static void next_zone(call_t *c)
{
    char path[600];
    snprintf(path, sizeof path, "/zones?name=%s", c->cand);
    send_req(c, "GET", path, NULL);
}

static void next_delete(call_t *c)
{
    if (c->id_i >= c->nids) {
        call_end(c, 0, NULL);
        return;
    }
    char path[600];
    snprintf(path, sizeof path, "/zones/%s/dns_records/%s", c->zone_id, c->ids[c->id_i++]);
    c->step = C_DELETE;
    send_req(c, "DELETE", path, NULL);
}

/* Ids go into request paths: letters, digits, '-' and '_' only. */
static int id_ok(const char *id)
{
    if (*id == '\0' || strlen(id) > 64)
        return 0;
    for (const char *p = id; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') ||
              *p == '-' || *p == '_'))
            return 0;
    return 1;
}

/* Cloudflare may show TXT content in quotes; compare without them. */
static int same_content(const char *got, const char *want)
{
    size_t n = strlen(got), w = strlen(want);
    if (n == w + 2 && got[0] == '"' && got[n - 1] == '"')
        return strncmp(got + 1, want, w) == 0;
    return strcmp(got, want) == 0;
}

static void on_response(void *data, const moat_httpc_response_t *r)
{
    call_t *c = data;
    if (r->err != 0) {
        char msg[600];
        snprintf(msg, sizeof msg, "cannot reach the Cloudflare API at %s: %s", c->api,
                 moat_strerror(r->err));
        call_end(c, r->err, msg);
        return;
    }
    json_t *j = r->body_len ? json_loadb(r->body, r->body_len, 0, NULL) : NULL;
    if (!json_is_object(j)) {
        char msg[600];
        snprintf(msg, sizeof msg, "the Cloudflare API at %s answered HTTP %d without JSON", c->api,
                 r->status);
        json_decref(j);
        call_end(c, MOAT_EPARSE, msg);
        return;
    }
    if (!json_is_true(json_object_get(j, "success")) || r->status >= 300) {
        /* A record already deleted is what a remove wants. */
        if (c->step == C_DELETE && r->status == 404) {
            json_decref(j);
            next_delete(c);
            return;
        }
        api_error(c, r, j);
        json_decref(j);
        return;
    }
    json_t *res = json_object_get(j, "result");
    switch (c->step) {
    case C_ZONE: {
        json_t *z = json_array_get(res, 0);
        const char *id = json_string_value(json_object_get(z, "id"));
        const char *name = json_string_value(json_object_get(z, "name"));
        if (id != NULL && name != NULL) {
            if (!id_ok(id)) {
                call_end(c, MOAT_EPARSE, "the Cloudflare API returned a malformed zone id");
                break;
            }
            c->zone_id = moat_xstrdup(id);
            c->zone = moat_xstrdup(name);
            call_end(c, 0, NULL);
            break;
        }
        /* Not this one: its parent, down to a two-label name. */
        const char *dot = strchr(c->cand, '.');
        if (dot == NULL || strchr(dot + 1, '.') == NULL) {
            char msg[600];
            snprintf(msg, sizeof msg,
                     "no Cloudflare zone the API token can see contains %s; the token needs "
                     "Zone:Read for it",
                     c->fqdn);
            call_end(c, MOAT_ENOT_FOUND, msg);
            break;
        }
        c->cand = dot + 1;
        next_zone(c);
        break;
    }
    case C_CREATE:
        if (json_string_value(json_object_get(res, "id")) == NULL) {
            call_end(c, MOAT_EPARSE, "the Cloudflare API created no record id");
            break;
        }
        call_end(c, 0, NULL);
        break;
    case C_LIST: {
        size_t i;
        json_t *rec;
        json_array_foreach(res, i, rec)
        {
            const char *id = json_string_value(json_object_get(rec, "id"));
            const char *content = json_string_value(json_object_get(rec, "content"));
            if (id && id_ok(id) && content && same_content(content, c->value) && c->nids < MAX_IDS)
                c->ids[c->nids++] = moat_xstrdup(id);
        }
        next_delete(c);
        break;
    }
    case C_DELETE: next_delete(c); break;
    }
    json_decref(j);
}

static call_t *call_new(moat_httpc_t *h, const char *api, const char *token, const char *fqdn,
                        const char *value, moat_cf_cb cb, void *arg)
{
    call_t *c = moat_xcalloc(1, sizeof *c);
    c->h = h;
    c->api = moat_xstrdup(api && *api ? api : MOAT_CF_API_DEFAULT);
    size_t al = strlen(c->api);
    if (al > 0 && c->api[al - 1] == '/')
        c->api[al - 1] = '\0';
    size_t n = strlen(token) + 32;
    c->auth = moat_xmalloc(n);
    snprintf(c->auth, n, "Authorization: Bearer %s\r\n", token);
    c->fqdn = moat_xstrdup(fqdn);
    c->value = moat_xstrdup(value);
    c->cb = cb;
    c->arg = arg;
    return c;
}

void moat_cf_zone(moat_httpc_t *h, const char *api, const char *token, const char *fqdn,
                  moat_cf_cb cb, void *arg)
{
    call_t *c = call_new(h, api, token, fqdn, "", cb, arg);
    c->step = C_ZONE;
    /* Start at the parent of _acme-challenge.<name>: the record itself is never a zone. */
    const char *dot = strchr(c->fqdn, '.');
    c->cand = dot ? dot + 1 : c->fqdn;
    next_zone(c);
}

void moat_cf_create(moat_httpc_t *h, const char *api, const char *token, const char *zone_id,
                    const char *fqdn, const char *value, moat_cf_cb cb, void *arg)
{
    call_t *c = call_new(h, api, token, fqdn, value, cb, arg);
    c->zone_id = moat_xstrdup(zone_id);
    c->step = C_CREATE;
    json_t *body =
        json_pack("{s:s,s:s,s:s,s:i}", "type", "TXT", "name", fqdn, "content", value, "ttl", 60);
    char *bs = json_dumps(body, JSON_COMPACT);
    json_decref(body);
    char path[300];
    snprintf(path, sizeof path, "/zones/%s/dns_records", zone_id);
    send_req(c, "POST", path, bs);
    free(bs);
}

void moat_cf_remove(moat_httpc_t *h, const char *api, const char *token, const char *zone_id,
                    const char *fqdn, const char *value, moat_cf_cb cb, void *arg)
{
    call_t *c = call_new(h, api, token, fqdn, value, cb, arg);
    c->zone_id = moat_xstrdup(zone_id);
    c->step = C_LIST;
    char path[600];
    snprintf(path, sizeof path, "/zones/%s/dns_records?type=TXT&name=%s", zone_id, fqdn);
    send_req(c, "GET", path, NULL);
}
