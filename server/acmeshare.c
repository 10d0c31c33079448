/* ACME state shared between moat processes on one store (server/acmeshare.h). */
#include "acmeshare.h"
#include "moat/log.h"

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define LOCK_TTL      120  /* seconds; MOAT_ACME_LOCK_TTL overrides it (tests) */
#define TOKEN_MAX_AGE 3600 /* a token this old belongs to an order that died with its process */
#define INSTANCE_BEAT 15
#define INSTANCE_TTL  45

/* A token this process did not place but answers, as copied from storage. */
typedef struct {
    char *key, *value;
    int seen;
} shared_tok_t;

/* An issuing lock this process holds: the lease name and its fencing token. */
typedef struct {
    char *id;
    int64_t token;
} held_t;

struct moat_acmeshare {
    moat_storage_t *st;
    char owner[96];
    int lock_ttl;
    held_t *held;
    size_t nheld;
    char **own; /* storage keys of the tokens our own orders published */
    size_t nown;
    shared_tok_t *shared;
    size_t nshared;
    int peers;
    int64_t beat_next;
};

/* Answer (value non-NULL) or stop answering the token stored under key, in memory only. */
static void token_apply(const char *key, const char *value)
{
    if (strncmp(key, "acme-token:", 11) == 0)
        moat_acme_http01_set(key + 11, value);
    else if (strncmp(key, "acme-token-alpn:", 16) == 0)
        moat_acme_alpn01_set(key + 16, value);
}

static void shared_drop(moat_acmeshare_t *m, size_t i, int unapply)
{
    if (unapply)
        token_apply(m->shared[i].key, NULL);
    free(m->shared[i].key);
    free(m->shared[i].value);
    m->shared[i] = m->shared[--m->nshared];
}

static int own_find(moat_acmeshare_t *m, const char *key)
{
    for (size_t i = 0; i < m->nown; i++)
        if (strcmp(m->own[i], key) == 0)
            return (int)i;
    return -1;
}

void moat_acmeshare_publish(moat_acmeshare_t *m, moat_acme_chal_t type, const char *name,
                            const char *token, const char *key_auth)
{
    /* Kept in storage too, so other instances sharing it answer as well. */
    char key[512];
    if (type == MOAT_ACME_HTTP01)
        snprintf(key, sizeof key, "acme-token:%s", token);
    else
        snprintf(key, sizeof key, "acme-token-alpn:%s", name);
    if (m->st->ops->kv_put(m->st, key, key_auth) != 0)
        MOAT_WARN("acme: cannot store the challenge token: %s", moat_storage_last_error(m->st));
    /* Ours now: the refresh must neither import it nor withdraw it. */
    for (size_t i = 0; i < m->nshared; i++) {
        if (strcmp(m->shared[i].key, key) == 0) {
            shared_drop(m, i, 0);
            break;
        }
    }
    int at = own_find(m, key);
    if (key_auth != NULL && at < 0) {
        m->own = moat_xrealloc(m->own, (m->nown + 1) * sizeof *m->own);
        m->own[m->nown++] = moat_xstrdup(key);
    } else if (key_auth == NULL && at >= 0) {
        free(m->own[at]);
        m->own[at] = m->own[--m->nown];
    }
    token_apply(key, key_auth);
}

/* Once a second: say we are alive, count the other live instances, and mirror the tokens
 * they stored into this process's answer tables. A token older than TOKEN_MAX_AGE was left by
 * a process that died mid-order (a live order withdraws its tokens when it ends): delete it. */
void moat_acmeshare_refresh(moat_acmeshare_t *m)
{
    moat_storage_t *st = m->st;
    int64_t now = (int64_t)time(NULL);
    char key[256], val[32];
    moat_kv_t *rows = NULL;
    size_t n = 0;
    if (now >= m->beat_next) {
        snprintf(key, sizeof key, "acme-instance:%s", m->owner);
        snprintf(val, sizeof val, "%lld", (long long)(now + INSTANCE_TTL));
        if (st->ops->kv_put(st, key, val) == 0)
            m->beat_next = now + INSTANCE_BEAT;
    }
    if (st->ops->kv_list(st, "acme-instance:", &rows, &n) == 0) {
        int peers = 0;
        for (size_t i = 0; i < n; i++) {
            if (strcmp(rows[i].key + 14, m->owner) == 0)
                continue;
            if (rows[i].value && strtoll(rows[i].value, NULL, 10) > now)
                peers++;
            else
                st->ops->kv_put(st, rows[i].key, NULL);
        }
        if (peers != m->peers)
            MOAT_INFO("acme: %d other moat process(es) share this storage", peers);
        m->peers = peers;
        moat_kv_free(rows, n);
    }
    /* "acme-token" covers both acme-token:<token> and acme-token-alpn:<name>. */
    if (st->ops->kv_list(st, "acme-token", &rows, &n) != 0)
        return; /* keep what we have; storage says why on the next write */
    for (size_t i = 0; i < m->nshared; i++)
        m->shared[i].seen = 0;
    for (size_t i = 0; i < n; i++) {
        const char *k = rows[i].key, *v = rows[i].value;
        if (v == NULL || (strncmp(k, "acme-token:", 11) != 0 && strncmp(k, "acme-token-alpn:", 16)))
            continue;
        if (rows[i].updated_at + TOKEN_MAX_AGE < now) {
            st->ops->kv_put(st, k, NULL);
            continue;
        }
        if (own_find(m, k) >= 0)
            continue;
        size_t j;
        for (j = 0; j < m->nshared && strcmp(m->shared[j].key, k) != 0; j++)
            ;
        if (j == m->nshared) {
            m->shared = moat_xrealloc(m->shared, (m->nshared + 1) * sizeof *m->shared);
            m->shared[m->nshared++] = (shared_tok_t){moat_xstrdup(k), NULL, 0};
        }
        m->shared[j].seen = 1;
        if (m->shared[j].value == NULL || strcmp(m->shared[j].value, v) != 0) {
            free(m->shared[j].value);
            m->shared[j].value = moat_xstrdup(v);
            MOAT_DEBUG("acme: answering %s placed by another instance", k);
            token_apply(k, v);
        }
    }
    moat_kv_free(rows, n);
    for (size_t i = 0; i < m->nshared;) {
        if (!m->shared[i].seen)
            shared_drop(m, i, 1);
        else
            i++;
    }
}

/* --- issuing locks ------------------------------------------------------------------------- */

/* Whether the process that wrote `owner` ("host/pid/random") is certainly gone, so its lock
 * need not run out first: a moat killed mid-order and restarted at once would otherwise wait
 * LOCK_TTL before it issues. Only a process on this host can be judged: its pid no longer
 * exists, or it is our own pid (a container restarted: the same pid, a new process). */
static int owner_gone(const moat_acmeshare_t *m, const char *owner)
{
    const char *slash = strchr(owner, '/'), *mine = strchr(m->owner, '/');
    if (slash == NULL || mine == NULL || slash - owner != mine - m->owner ||
        strncmp(owner, m->owner, (size_t)(slash - owner)) != 0)
        return 0;
    long pid = strtol(slash + 1, NULL, 10);
    if (pid <= 0)
        return 0;
    if (pid == (long)getpid())
        return 1;
    return kill((pid_t)pid, 0) != 0 && errno == ESRCH;
}

const char *moat_acmeshare_owner(const moat_acmeshare_t *m)
{
    return m->owner;
}

int moat_acmeshare_owner_gone(const moat_acmeshare_t *m, const char *owner)
{
    if (strcmp(owner, m->owner) == 0)
        return 0;
    if (owner_gone(m, owner))
        return 1;
    char key[256], *v = NULL;
    snprintf(key, sizeof key, "acme-instance:%s", owner);
    if (m->st->ops->kv_get(m->st, key, &v) != 0)
        return 1; /* no beat row: not a live process of this store */
    int live = strtoll(v, NULL, 10) > (long long)time(NULL);
    free(v);
    return !live;
}

static held_t *held_find(moat_acmeshare_t *m, const char *id)
{
    for (size_t i = 0; i < m->nheld; i++)
        if (strcmp(m->held[i].id, id) == 0)
            return &m->held[i];
    return NULL;
}

static void held_drop(moat_acmeshare_t *m, held_t *h)
{
    free(h->id);
    *h = m->held[--m->nheld];
}

/* The lock is a lease in storage (lease_take): taken in one statement on the store's clock,
 * renewed by its token while the order runs, and the certificate write at the end checks the
 * token still holds it (put_cert_fenced), so a process paused past the lease cannot overwrite
 * what the process that took over stored. */
int moat_acmeshare_lock_take(moat_acmeshare_t *m, const char *id)
{
    moat_storage_t *st = m->st;
    held_t *h = held_find(m, id);
    if (h != NULL) {
        int rc = st->ops->lease_renew(st, id, h->token, m->lock_ttl);
        if (rc == 0)
            return 1;
        if (rc != MOAT_ENOT_FOUND)
            return rc;
        MOAT_WARN("acme: %s: another moat process took the issuing lock over (this one was "
                  "paused or cut off from the store for more than %d s); what this one issues "
                  "now will not be stored",
                  strncmp(id, "acme:", 5) == 0 ? id + 5 : id, m->lock_ttl);
        held_drop(m, h);
        return 0;
    }
    int64_t token = 0;
    char *holder = NULL;
    int rc = st->ops->lease_take(st, id, m->owner, m->lock_ttl, NULL, &token, &holder);
    if (rc == 0 && holder != NULL && owner_gone(m, holder))
        rc = st->ops->lease_take(st, id, m->owner, m->lock_ttl, holder, &token, NULL);
    free(holder);
    if (rc == 1) {
        m->held = moat_xrealloc(m->held, (m->nheld + 1) * sizeof *m->held);
        m->held[m->nheld++] = (held_t){moat_xstrdup(id), token};
    }
    return rc;
}

int64_t moat_acmeshare_lock_token(moat_acmeshare_t *m, const char *id)
{
    held_t *h = held_find(m, id);
    return h != NULL ? h->token : 0;
}

uint64_t moat_acmeshare_heartbeat_ms(const moat_acmeshare_t *m)
{
    return (uint64_t)m->lock_ttl * 1000 / 4;
}

void moat_acmeshare_lock_release(moat_acmeshare_t *m, const char *id)
{
    held_t *h = held_find(m, id);
    if (h == NULL)
        return;
    m->st->ops->lease_release(m->st, id, h->token);
    held_drop(m, h);
}

int moat_acmeshare_peers(const moat_acmeshare_t *m)
{
    return m->peers;
}

moat_acmeshare_t *moat_acmeshare_new(moat_storage_t *st)
{
    moat_acmeshare_t *m = moat_xcalloc(1, sizeof *m);
    m->st = st;
    char host[64] = "";
    gethostname(host, sizeof host - 1);
    unsigned rnd = 0;
    FILE *f = fopen("/dev/urandom", "rb");
    if (f) {
        if (fread(&rnd, sizeof rnd, 1, f) != 1)
            rnd = 0;
        fclose(f);
    }
    snprintf(m->owner, sizeof m->owner, "%.40s/%d/%08x", host, (int)getpid(), rnd);
    m->lock_ttl = LOCK_TTL;
    const char *ttl = getenv("MOAT_ACME_LOCK_TTL");
    if (ttl != NULL && atoi(ttl) >= 2 && atoi(ttl) <= 3600)
        m->lock_ttl = atoi(ttl);
    moat_acmeshare_refresh(m);
    return m;
}

void moat_acmeshare_free(moat_acmeshare_t *m)
{
    if (m == NULL)
        return;
    char key[256];
    snprintf(key, sizeof key, "acme-instance:%s", m->owner);
    m->st->ops->kv_put(m->st, key, NULL);
    while (m->nshared > 0)
        shared_drop(m, m->nshared - 1, 0);
    free(m->shared);
    for (size_t i = 0; i < m->nown; i++)
        free(m->own[i]);
    free(m->own);
    while (m->nheld > 0)
        moat_acmeshare_lock_release(m, m->held[m->nheld - 1].id);
    free(m->held);
    moat_acme_challenges_clear();
    free(m);
}
