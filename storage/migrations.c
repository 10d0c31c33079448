/* The SQLite schema as an ordered list of steps. Step N moves a database from user_version
 * N - 1 to N; storage/sqlite.c applies each one in its own transaction together with the
 * version bump, so a crash leaves the file at a whole version. Steps are append-only: once a
 * version has shipped its SQL never changes, a new need is a new step at the end (and
 * MOAT_STORAGE_SCHEMA_VERSION in include/moat/storage.h moves with it). */
#include "moat/storage.h"

typedef struct {
    int version;
    const char *sql;
} migration_t;

static const migration_t migrations[] = {
    {1, "CREATE TABLE certs ("
        "  id TEXT PRIMARY KEY NOT NULL,"
        "  names TEXT,"
        "  issuer TEXT,"
        "  source TEXT,"
        "  not_before INTEGER,"
        "  not_after INTEGER,"
        "  cert_pem TEXT,"
        "  key_pem TEXT,"
        "  updated_at INTEGER"
        ");"
        /* The renewal scheduler asks for "what expires first"; keep that an index walk. */
        "CREATE INDEX certs_not_after ON certs(not_after);"
        "CREATE TABLE events ("
        "  id INTEGER PRIMARY KEY,"
        "  time INTEGER,"
        "  kind TEXT,"
        "  names TEXT,"
        "  detail TEXT"
        ");"
        "CREATE TABLE kv ("
        "  key TEXT PRIMARY KEY NOT NULL,"
        "  value TEXT,"
        "  updated_at INTEGER"
        ");"},
    /* Issuing leases with fencing tokens (storage.h, lease_take). A released lease keeps its
     * row (expires_at 0), so max(token) never goes back. */
    {2, "CREATE TABLE leases ("
        "  name TEXT PRIMARY KEY NOT NULL,"
        "  owner TEXT NOT NULL,"
        "  token INTEGER NOT NULL,"
        "  expires_at INTEGER NOT NULL"
        ");"},
};

_Static_assert(MOAT_ARRAY_LEN(migrations) == MOAT_STORAGE_SCHEMA_VERSION,
               "one migration step per schema version");

const char *moat__storage_migration_sql(int version)
{
    if (version < 1 || version > MOAT_STORAGE_SCHEMA_VERSION)
        return NULL;
    /* Steps are dense and ordered, so the index is the version minus one; the stored number
     * guards against a step inserted in the middle by mistake. */
    const migration_t *m = &migrations[version - 1];
    return m->version == version ? m->sql : NULL;
}
