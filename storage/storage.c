/* Backend-independent parts of the storage interface (include/moat/storage.h): freeing the
 * records the backends hand out. */
#include "moat/storage.h"

#include <stdio.h>
#include <stdlib.h>

int moat_storage_is_postgres(const char *spec)
{
    return spec != NULL &&
           (strncmp(spec, "postgres://", 11) == 0 || strncmp(spec, "postgresql://", 13) == 0);
}

static int open_plain(const char *spec, const char *data_dir, moat_storage_t **out, char *err,
                      size_t errlen)
{
    if (spec == NULL || spec[0] == '\0')
        return moat_storage_open_sqlite(data_dir, out, err, errlen);
    if (moat_storage_is_postgres(spec))
        return moat_storage_open_postgres(spec, out, err, errlen);
    if (strncmp(spec, "sqlite:", 7) == 0 && spec[7] != '\0') {
        /* sqlite:DIR names the folder; sqlite:DIR/moat.db the file in it. */
        char *dir = moat_xstrdup(spec + 7);
        size_t n = strlen(dir);
        if (n > 8 && strcmp(dir + n - 8, "/moat.db") == 0)
            dir[n - 8] = '\0';
        int rc = moat_storage_open_sqlite(dir, out, err, errlen);
        free(dir);
        return rc;
    }
    if (out != NULL)
        *out = NULL;
    moat_errf(err, errlen,
              "--storage \"%.100s\" is not a store moat knows; use sqlite:FOLDER or "
              "postgres://USER@HOST:PORT/DATABASE?sslmode=verify-full&sslrootcert=FILE",
              spec);
    return MOAT_EINVAL;
}

int moat_storage_open(const char *spec, const char *data_dir, const char *key_file,
                      moat_storage_t **out, char *err, size_t errlen)
{
    int rc = open_plain(spec, data_dir, out, err, errlen);
    if (rc != 0 || key_file == NULL || key_file[0] == '\0')
        return rc;
    moat_storage_t *sealed = NULL;
    rc = moat_storage_encrypt(*out, key_file, &sealed, err, errlen);
    if (rc != 0)
        (*out)->ops->close(*out);
    *out = sealed;
    return rc;
}

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
