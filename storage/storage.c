/* Backend-independent parts of the storage interface (include/moat/storage.h): freeing the
 * records the backends hand out. */
#include "moat/storage.h"

#include <stdlib.h>

void moat_cert_record_clear(moat_cert_record_t *r)
{
    if (r == NULL)
        return;
    free(r->id);
    free(r->names);
    free(r->issuer);
    free(r->source);
    free(r->cert_pem);
    /* Do not leave a private key lying in freed heap memory. */
    moat_secret_free(r->key_pem);
    memset(r, 0, sizeof *r);
}

void moat_event_clear(moat_event_t *e)
{
    if (e == NULL)
        return;
    free(e->kind);
    free(e->names);
    free(e->detail);
    memset(e, 0, sizeof *e);
}

void moat_cert_records_free(moat_cert_record_t *recs, size_t n)
{
    for (size_t i = 0; recs != NULL && i < n; i++)
        moat_cert_record_clear(&recs[i]);
    free(recs);
}

void moat_events_free(moat_event_t *events, size_t n)
{
    for (size_t i = 0; events != NULL && i < n; i++)
        moat_event_clear(&events[i]);
    free(events);
}

void moat_kv_free(moat_kv_t *rows, size_t n)
{
    for (size_t i = 0; rows != NULL && i < n; i++) {
        free(rows[i].key);
        free(rows[i].value);
    }
    free(rows);
}
