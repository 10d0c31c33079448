/* Snapshots and the snapshot manager (server/snapshot.h). */
#include "snapshot.h"
#include "moat/log.h"

#include <stdio.h>
#include <stdlib.h>

struct moat_snapmgr {
    moat_snapmgr_opts_t o;
    moat_snapshot_t cur;
    int64_t next_check;
    moat_runtime_build_t *build; /* the load in flight */
    moat_snapmgr_done_cb done;
    void *done_data;
};

void moat_snapshot_ref(moat_snapshot_t *dst, const moat_snapshot_t *src)
{
    dst->rt = moat_runtime_ref(src->rt);
    dst->certs = moat_certs_ref(src->certs);
    dst->keys = moat_tls_keys_ref(src->keys);
}

void moat_snapshot_release(moat_snapshot_t *s)
{
    moat_runtime_unref(s->rt);
    moat_certs_release(s->certs);
    moat_tls_keys_release(s->keys);
    *s = (moat_snapshot_t){0};
}

moat_snapmgr_t *moat_snapmgr_new(const moat_snapmgr_opts_t *o)
{
    moat_snapmgr_t *m = moat_xcalloc(1, sizeof *m);
    m->o = *o;
    m->cur.keys = moat_tls_keys_new(NULL);
    m->next_check = INT64_MAX;
    return m;
}

void moat_snapmgr_free(moat_snapmgr_t *m)
{
    if (m == NULL)
        return;
    moat_snapshot_release(&m->cur);
    free(m);
}

/* Replace the members given (taking over their references) and publish the result. */
static void replace(moat_snapmgr_t *m, moat_runtime_t *rt, moat_certs_t *certs,
                    moat_tls_keys_t *keys)
{
    if (rt != NULL) {
        moat_runtime_unref(m->cur.rt);
        m->cur.rt = rt;
    }
    if (certs != NULL) {
        moat_certs_release(m->cur.certs);
        m->cur.certs = certs;
    }
    if (keys != NULL) {
        moat_tls_keys_release(m->cur.keys);
        m->cur.keys = keys;
    }
    /* Nothing goes out before the first runtime: a worker's snapshot always has one. */
    if (m->o.publish != NULL && m->cur.rt != NULL)
        m->o.publish(&m->cur, m->o.publish_data);
}

static int build_certs(moat_snapmgr_t *m, const moat_config_t *cfg, moat_certs_t **out,
                       int64_t *next, char *err, size_t errlen)
{
    char why[1024] = "";
    int r = moat_certmgr_build(m->o.storage, m->o.ca, cfg, out, next, why, sizeof why);
    if (r != 0)
        moat_errf(err, errlen, "certificates: %s", why[0] ? why : moat_strerror(r));
    return r;
}

static void on_built(moat_runtime_t *rt, const char *why, void *data)
{
    moat_snapmgr_t *m = data;
    moat_snapmgr_done_cb done = m->done;
    void *done_data = m->done_data;
    m->build = NULL;
    m->done = NULL;
    m->done_data = NULL;
    if (rt == NULL) {
        done(MOAT_EINVAL, why, done_data);
        return;
    }
    /* The runtime exists; the certificates are the last thing that can fail. Only after them
     * does anything become visible to the workers. */
    moat_certs_t *certs = NULL;
    int64_t next = INT64_MAX;
    char err[1100];
    int r = build_certs(m, rt->config, &certs, &next, err, sizeof err);
    if (r != 0) {
        moat_runtime_unref(rt);
        done(r, err, done_data);
        return;
    }
    m->next_check = next;
    replace(m, rt, certs, NULL);
    done(0, NULL, done_data);
}

int moat_snapmgr_load(moat_snapmgr_t *m, moat_config_t *cfg, moat_snapmgr_done_cb done, void *data)
{
    if (m->build != NULL)
        return MOAT_EAGAIN;
    m->done = done;
    m->done_data = data;
    m->build = moat_runtime_build(m->o.loop, cfg, m->o.http_port, m->o.https_port, on_built, m);
    return 0;
}

int moat_snapmgr_busy(const moat_snapmgr_t *m)
{
    return m->build != NULL;
}

void moat_snapmgr_cancel(moat_snapmgr_t *m)
{
    if (m->build != NULL)
        moat_runtime_build_cancel(m->build);
}

int moat_snapmgr_recert(moat_snapmgr_t *m, char *err, size_t errlen)
{
    if (m->cur.rt == NULL) {
        moat_errf(err, errlen, "certificates: no configuration loaded yet");
        return MOAT_EINVAL;
    }
    moat_certs_t *certs = NULL;
    int64_t next = INT64_MAX;
    int r = build_certs(m, m->cur.rt->config, &certs, &next, err, errlen);
    if (r != 0)
        return r;
    m->next_check = next;
    replace(m, NULL, certs, NULL);
    return 0;
}

int moat_snapmgr_readdress(moat_snapmgr_t *m, moat_runtime_t *rt)
{
    if (m->build != NULL || m->cur.rt == NULL) {
        moat_runtime_unref(rt);
        return MOAT_EAGAIN;
    }
    replace(m, rt, NULL, NULL);
    return 0;
}

void moat_snapmgr_rotate_keys(moat_snapmgr_t *m)
{
    replace(m, NULL, NULL, moat_tls_keys_new(m->cur.keys));
}

void moat_snapmgr_set_keys(moat_snapmgr_t *m, moat_tls_keys_t *keys)
{
    if (keys != NULL)
        replace(m, NULL, NULL, keys);
}

const moat_snapshot_t *moat_snapmgr_current(const moat_snapmgr_t *m)
{
    return &m->cur;
}

int64_t moat_snapmgr_next_check(const moat_snapmgr_t *m)
{
    return m->next_check;
}
