/* Unit tests for the session-ticket keys shared through a store (server/tickets.c): two
 * instances on one store serve the same keys, the first into a new hour rotates them (keeping
 * the two newest so tickets still open), the other follows, and an unreadable row is
 * replaced. Runs on a SQLite store; which stores share at all (shared and sealed) too. */
#include "moat/storage.h"
#include "moat/tls.h"
#include "snapshot.h"
#include "test.h"
#include "tickets.h"

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>

static int rm_cb(const char *p, const struct stat *st, int type, struct FTW *ftw)
{
    (void)st;
    (void)type;
    (void)ftw;
    return remove(p);
}

/* The snapshot's keys as bytes: n bytes into out. */
static size_t keys_of(moat_snapmgr_t *m, uint8_t *out)
{
    return moat_tls_keys_export(moat_snapmgr_current(m)->keys, out, 3 * MOAT_TLS_KEY_BYTES);
}

int main(void)
{
    char root[] = "/tmp/moat-tickets-test-XXXXXX";
    if (mkdtemp(root) == NULL)
        return 1;
    moat_storage_t *st = NULL;
    char err[512];
    CHECK_INT(moat_storage_open_sqlite(root, &st, err, sizeof err), 0);
    if (st == NULL)
        return test_summary("tickets");
    moat_snapmgr_opts_t o = {0};
    moat_snapmgr_t *a = moat_snapmgr_new(&o), *b = moat_snapmgr_new(&o);
    uint8_t ka[3 * MOAT_TLS_KEY_BYTES], kb[3 * MOAT_TLS_KEY_BYTES], k0[3 * MOAT_TLS_KEY_BYTES];
    size_t la, lb, l0;

    /* Two fresh instances have keys of their own until they look at the store. */
    la = keys_of(a, ka);
    lb = keys_of(b, kb);
    CHECK(la == lb && memcmp(ka, kb, la) != 0);

    int64_t t = 1800000000; /* the middle of an hour */
    CHECK_INT(moat_tickets_sync(st, a, t), 0);
    CHECK_INT(moat_tickets_sync(st, b, t + 10), 0);
    la = keys_of(a, ka);
    lb = keys_of(b, kb);
    CHECK(la == lb && memcmp(ka, kb, la) == 0);
    CHECK_INT(la, 2 * MOAT_TLS_KEY_BYTES); /* a fresh key before a's own first */
    l0 = keys_of(a, k0);

    /* The same hour: nothing moves. */
    CHECK_INT(moat_tickets_sync(st, a, t + 1000), 0);
    la = keys_of(a, ka);
    CHECK(la == l0 && memcmp(ka, k0, la) == 0);

    /* The next hour: b gets there first and rotates; a follows. The old encrypting key is
     * second now, so tickets under it still open. */
    CHECK_INT(moat_tickets_sync(st, b, t + 3600), 0);
    lb = keys_of(b, kb);
    CHECK_INT(lb, 3 * MOAT_TLS_KEY_BYTES);
    CHECK(memcmp(kb, k0, MOAT_TLS_KEY_BYTES) != 0);
    CHECK(memcmp(kb + MOAT_TLS_KEY_BYTES, k0, 2 * MOAT_TLS_KEY_BYTES) == 0);
    CHECK_INT(moat_tickets_sync(st, a, t + 3605), 0);
    la = keys_of(a, ka);
    CHECK(la == lb && memcmp(ka, kb, la) == 0);
    /* Three hours on, only the newest three remain. */
    CHECK_INT(moat_tickets_sync(st, a, t + 7200), 0);
    CHECK_INT(keys_of(a, ka), 3 * MOAT_TLS_KEY_BYTES);
    CHECK(memcmp(ka + MOAT_TLS_KEY_BYTES, kb, 2 * MOAT_TLS_KEY_BYTES) == 0);

    /* A row that is not ours is replaced, not trusted. */
    CHECK_INT(st->ops->kv_put(st, "tls-ticket-keys", "garbage"), 0);
    CHECK_INT(moat_tickets_sync(st, b, t + 7300), 0);
    char *v = NULL;
    CHECK_INT(st->ops->kv_get(st, "tls-ticket-keys", &v), 0);
    CHECK(v != NULL && strncmp(v, "500002 ", 7) == 0); /* hour (t + 7300) / 3600 */
    free(v);

    /* Shared only on a store other machines use whose secrets are sealed. */
    CHECK(!moat_tickets_shared(st));
    st->shared = 1;
    CHECK(!moat_tickets_shared(st));
    st->sealed = 1;
    CHECK(moat_tickets_shared(st));

    moat_snapmgr_free(a);
    moat_snapmgr_free(b);
    st->ops->close(st);
    nftw(root, rm_cb, 8, FTW_DEPTH | FTW_PHYS);
    return test_summary("tickets");
}
