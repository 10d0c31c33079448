/* Session-ticket keys shared through the store (server/tickets.h). */
#include "tickets.h"
#include "moat/log.h"
#include "moat/tls.h"

#include <openssl/base64.h>
#include <openssl/mem.h>
#include <stdio.h>
#include <stdlib.h>

#define KEY_ROW   "tls-ticket-keys"
#define SLOT_SECS 3600
#define RAW_MAX   (3 * MOAT_TLS_KEY_BYTES)

int moat_tickets_shared(const moat_storage_t *st)
{
    return st->shared && st->sealed;
}

/* "<slot> <base64>" → slot and keys; NULL keys when the row is not one of ours. */
static moat_tls_keys_t *parse_row(const char *v, int64_t *slot)
{
    char *end = NULL;
    long long s = strtoll(v, &end, 10);
    if (end == v || *end != ' ')
        return NULL;
    uint8_t raw[RAW_MAX + 8];
    size_t len = 0;
    const char *b = end + 1;
    moat_tls_keys_t *ks = NULL;
    if (EVP_DecodeBase64(raw, &len, sizeof raw, (const uint8_t *)b, strlen(b)))
        ks = moat_tls_keys_import(raw, len);
    OPENSSL_cleanse(raw, sizeof raw);
    *slot = s;
    return ks;
}

static char *format_row(const moat_tls_keys_t *ks, int64_t slot)
{
    uint8_t raw[RAW_MAX];
    size_t len = moat_tls_keys_export(ks, raw, sizeof raw);
    size_t b64 = 0;
    EVP_EncodedLength(&b64, len);
    char *row = moat_xmalloc(b64 + 32);
    int n = snprintf(row, 32, "%lld ", (long long)slot);
    EVP_EncodeBlock((uint8_t *)row + n, raw, len);
    OPENSSL_cleanse(raw, sizeof raw);
    return row;
}

static int same_keys(const moat_tls_keys_t *a, const moat_tls_keys_t *b)
{
    uint8_t ra[RAW_MAX], rb[RAW_MAX];
    size_t la = moat_tls_keys_export(a, ra, sizeof ra), lb = moat_tls_keys_export(b, rb, sizeof rb);
    int same = la == lb && CRYPTO_memcmp(ra, rb, la) == 0;
    OPENSSL_cleanse(ra, sizeof ra);
    OPENSSL_cleanse(rb, sizeof rb);
    return same;
}

int moat_tickets_sync(moat_storage_t *st, moat_snapmgr_t *snap, int64_t now)
{
    int64_t slot = now / SLOT_SECS, stored_slot = -1;
    int rc = st->ops->begin(st);
    if (rc != 0)
        return rc;
    char *v = NULL;
    moat_tls_keys_t *stored = NULL, *use = NULL;
    rc = st->ops->kv_get(st, KEY_ROW, &v);
    if (rc == 0)
        stored = parse_row(v, &stored_slot);
    moat_secret_free(v);
    if (rc != 0 && rc != MOAT_ENOT_FOUND)
        goto fail;
    if (stored != NULL && stored_slot >= slot) {
        use = stored; /* this hour's keys (or a peer whose clock runs ahead: follow it) */
        stored = NULL;
    } else {
        /* First of this hour: a fresh key before the newest two, stored for the others. */
        use = moat_tls_keys_new(stored != NULL ? stored : moat_snapmgr_current(snap)->keys);
        char *row = format_row(use, slot);
        rc = st->ops->kv_put(st, KEY_ROW, row);
        moat_secret_free(row);
        if (rc != 0)
            goto fail;
        MOAT_DEBUG("tls: rotated the session-ticket keys shared on the store");
    }
    rc = st->ops->commit(st);
    if (rc != 0)
        goto fail;
    moat_tls_keys_release(stored);
    if (same_keys(use, moat_snapmgr_current(snap)->keys))
        moat_tls_keys_release(use);
    else
        moat_snapmgr_set_keys(snap, use);
    return 0;
fail:
    st->ops->rollback(st);
    moat_tls_keys_release(stored);
    moat_tls_keys_release(use);
    return rc;
}
