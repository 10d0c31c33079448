/* Copying one store into another (include/moat/storage.h, moat_storage_copy): backend-neutral,
 * through the vtable only, so any pair of backends works (sqlite:... to postgres://... is the
 * usual move to a shared store). */
#include "moat/storage.h"

#include <stdio.h>
#include <stdlib.h>

/* Keys that describe live processes and orders in flight, not state worth moving. */
static int ephemeral(const char *key)
{
    return strncmp(key, "acme-instance:", 14) == 0 || strncmp(key, "acme-token", 10) == 0;
}

static int same_str(const char *a, const char *b)
{
    return (a == NULL && b == NULL) || (a != NULL && b != NULL && strcmp(a, b) == 0);
}

static int same_cert(const moat_cert_record_t *a, const moat_cert_record_t *b)
{
    return same_str(a->names, b->names) && same_str(a->issuer, b->issuer) &&
           same_str(a->source, b->source) && a->not_before == b->not_before &&
           a->not_after == b->not_after && same_str(a->cert_pem, b->cert_pem) &&
           same_str(a->key_pem, b->key_pem);
}

static int fail(moat_storage_t *st, const char *what, char *err, size_t errlen)
{
    moat_errf(err, errlen, "%s: %s", what, moat_storage_last_error(st));
    return MOAT_ESTORAGE;
}

int moat_storage_copy(moat_storage_t *from, moat_storage_t *to, moat_storage_copy_stats_t *stats,
                      char *err, size_t errlen)
{
    moat_storage_copy_stats_t z = {0};
    if (stats == NULL)
        stats = &z;
    memset(stats, 0, sizeof *stats);
    moat_cert_record_t *recs = NULL;
    size_t n = 0;
    moat_kv_t *rows = NULL;
    size_t nrows = 0;
    if (from->ops->list_certs(from, &recs, &n) != 0)
        return fail(from, "reading the certificates to copy", err, errlen);
    if (from->ops->kv_list(from, "", &rows, &nrows) != 0) {
        moat_cert_records_free(recs, n);
        return fail(from, "reading the settings to copy", err, errlen);
    }
    int rc = to->ops->begin(to);
    if (rc != 0) {
        moat_cert_records_free(recs, n);
        moat_kv_free(rows, nrows);
        return fail(to, "starting the copy", err, errlen);
    }
    for (size_t i = 0; rc == 0 && i < n; i++) {
        moat_cert_record_t have;
        int g = to->ops->get_cert(to, recs[i].id, &have);
        if (g == 0) {
            int newer = have.not_after > recs[i].not_after, same = same_cert(&have, &recs[i]);
            moat_cert_record_clear(&have);
            if (newer) {
                stats->certs_newer_kept++;
                continue;
            }
            if (same) {
                stats->certs_same++;
                continue;
            }
        } else if (g != MOAT_ENOT_FOUND) {
            rc = fail(to, "reading the destination", err, errlen);
            break;
        }
        if (to->ops->put_cert(to, &recs[i]) != 0)
            rc = fail(to, "storing a certificate", err, errlen);
        else
            stats->certs_copied++;
    }
    for (size_t i = 0; rc == 0 && i < nrows; i++) {
        if (ephemeral(rows[i].key) || rows[i].value == NULL)
            continue;
        char *have = NULL;
        int g = to->ops->kv_get(to, rows[i].key, &have);
        int same = g == 0 && strcmp(have, rows[i].value) == 0;
        moat_secret_free(have);
        if (g != 0 && g != MOAT_ENOT_FOUND) {
            rc = fail(to, "reading the destination", err, errlen);
            break;
        }
        if (same) {
            stats->settings_same++;
            continue;
        }
        if (to->ops->kv_put(to, rows[i].key, rows[i].value) != 0)
            rc = fail(to, "storing a setting", err, errlen);
        else
            stats->settings_copied++;
    }
    if (rc == 0 && to->ops->commit(to) != 0)
        rc = fail(to, "committing the copy", err, errlen);
    if (rc != 0) {
        to->ops->rollback(to);
        memset(stats, 0, sizeof *stats);
    }
    moat_cert_records_free(recs, n);
    moat_kv_free(rows, nrows);
    return rc;
}
