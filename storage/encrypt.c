/* Secrets encrypted at rest (include/moat/storage.h, moat_storage_encrypt): a storage that
 * wraps another and seals, with AES-256-GCM, the private key of every certificate record and
 * every kv value before they reach the store, and opens them on the way back. The rest (ids,
 * names, dates, certificates, kv keys) stays readable, so lookups, ordering and `moat certs`
 * work unchanged.
 *
 * A sealed value is "moat-enc:v1:" followed by base64 of nonce (12 bytes) || ciphertext ||
 * tag (16 bytes); the additional data is the row it belongs to ("cert:<id>" or "kv:<key>"),
 * so a sealed value copied into another row does not open. A value without the prefix is read
 * as it is (a store written before the key was set); it is sealed at its next write. */
#include "moat/log.h"
#include "moat/storage.h"

#include <errno.h>
#include <fcntl.h>
#include <openssl/aead.h>
#include <openssl/base64.h>
#include <openssl/mem.h>
#include <openssl/rand.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#define PREFIX     "moat-enc:v1:"
#define PREFIX_LEN (sizeof PREFIX - 1)
#define NONCE_LEN  12
#define KEY_LEN    32

typedef struct {
    moat_storage_t base;
    moat_storage_t *inner;
    EVP_AEAD_CTX aead;
    char *key_file;
} enc_storage_t;

static enc_storage_t *from_base(moat_storage_t *base)
{
    return MOAT_CONTAINER_OF(base, enc_storage_t, base);
}

/* The inner store's sentence becomes ours. */
static int pass(enc_storage_t *e, int rc)
{
    if (rc != 0)
        memcpy(e->base.last_error, e->inner->last_error, sizeof e->base.last_error);
    return rc;
}

static char *seal(enc_storage_t *e, const char *row, const char *id, const char *plain)
{
    if (plain == NULL)
        return NULL;
    size_t n = strlen(plain), ad_len = strlen(row) + strlen(id);
    char *ad = moat_xmalloc(ad_len + 1);
    snprintf(ad, ad_len + 1, "%s%s", row, id);
    uint8_t *raw = moat_xmalloc(NONCE_LEN + n + EVP_AEAD_max_overhead(EVP_aead_aes_256_gcm()));
    RAND_bytes(raw, NONCE_LEN);
    size_t out_len = 0;
    int ok = EVP_AEAD_CTX_seal(&e->aead, raw + NONCE_LEN, &out_len,
                               n + EVP_AEAD_max_overhead(EVP_aead_aes_256_gcm()), raw, NONCE_LEN,
                               (const uint8_t *)plain, n, (const uint8_t *)ad, ad_len);
    free(ad);
    char *out = NULL;
    if (ok) {
        size_t b64 = 0;
        EVP_EncodedLength(&b64, NONCE_LEN + out_len);
        out = moat_xmalloc(PREFIX_LEN + b64);
        memcpy(out, PREFIX, PREFIX_LEN);
        EVP_EncodeBlock((uint8_t *)out + PREFIX_LEN, raw, NONCE_LEN + out_len);
    }
    free(raw);
    return out;
}

/* Open a sealed value in place: *v replaced by the plaintext (or left when not sealed).
 * 0, or MOAT_ECRYPTO with a sentence. */
static int unseal(enc_storage_t *e, const char *row, const char *id, char **v)
{
    if (*v == NULL || strncmp(*v, PREFIX, PREFIX_LEN) != 0)
        return 0;
    const char *b = *v + PREFIX_LEN;
    size_t blen = strlen(b), max = 0;
    if (!EVP_DecodedLength(&max, blen))
        max = 0;
    uint8_t *raw = moat_xmalloc(max + 1);
    size_t raw_len = 0;
    int ok = max > NONCE_LEN && EVP_DecodeBase64(raw, &raw_len, max, (const uint8_t *)b, blen) &&
             raw_len > NONCE_LEN;
    size_t ad_len = strlen(row) + strlen(id);
    char *ad = moat_xmalloc(ad_len + 1);
    snprintf(ad, ad_len + 1, "%s%s", row, id);
    char *plain = moat_xmalloc(raw_len + 1);
    size_t plen = 0;
    if (ok)
        ok = EVP_AEAD_CTX_open(&e->aead, (uint8_t *)plain, &plen, raw_len, raw, NONCE_LEN,
                               raw + NONCE_LEN, raw_len - NONCE_LEN, (const uint8_t *)ad, ad_len);
    free(ad);
    free(raw);
    if (!ok) {
        moat_secret_free(plain);
        moat_errf(e->base.last_error, sizeof e->base.last_error,
                  "the stored secret of %s%s does not open with the key in %s; is it the "
                  "--storage-key this store was written with?",
                  row, id, e->key_file);
        return MOAT_ECRYPTO;
    }
    plain[plen] = '\0';
    moat_secret_free(*v);
    *v = plain;
    return 0;
}

static int op_put(moat_storage_t *base, const moat_cert_record_t *rec, const char *lease,
                  int64_t token, int fenced)
{
    enc_storage_t *e = from_base(base);
    if (rec == NULL || rec->id == NULL)
        return pass(e, fenced ? e->inner->ops->put_cert_fenced(e->inner, rec, lease, token)
                              : e->inner->ops->put_cert(e->inner, rec));
    moat_cert_record_t copy = *rec;
    copy.key_pem = seal(e, "cert:", rec->id, rec->key_pem);
    if (rec->key_pem != NULL && copy.key_pem == NULL) {
        moat_errf(base->last_error, sizeof base->last_error, "cannot encrypt a private key");
        return MOAT_ECRYPTO;
    }
    int rc = fenced ? e->inner->ops->put_cert_fenced(e->inner, &copy, lease, token)
                    : e->inner->ops->put_cert(e->inner, &copy);
    free(copy.key_pem);
    return pass(e, rc);
}

static int op_put_cert(moat_storage_t *base, const moat_cert_record_t *rec)
{
    return op_put(base, rec, NULL, 0, 0);
}

static int op_put_cert_fenced(moat_storage_t *base, const moat_cert_record_t *rec,
                              const char *lease, int64_t token)
{
    return op_put(base, rec, lease, token, 1);
}

static int op_get_cert(moat_storage_t *base, const char *id, moat_cert_record_t *out)
{
    enc_storage_t *e = from_base(base);
    int rc = pass(e, e->inner->ops->get_cert(e->inner, id, out));
    if (rc == 0 && (rc = unseal(e, "cert:", out->id, &out->key_pem)) != 0)
        moat_cert_record_clear(out);
    return rc;
}

static int op_list_certs(moat_storage_t *base, moat_cert_record_t **out, size_t *n)
{
    enc_storage_t *e = from_base(base);
    int rc = pass(e, e->inner->ops->list_certs(e->inner, out, n));
    if (rc != 0)
        return rc;
    for (size_t i = 0; rc == 0 && i < *n; i++)
        rc = unseal(e, "cert:", (*out)[i].id, &(*out)[i].key_pem);
    if (rc != 0) {
        moat_cert_records_free(*out, *n);
        *out = NULL;
        *n = 0;
    }
    return rc;
}

static int op_add_event(moat_storage_t *base, const char *kind, const char *names,
                        const char *detail)
{
    enc_storage_t *e = from_base(base);
    return pass(e, e->inner->ops->add_event(e->inner, kind, names, detail));
}

static int op_list_events(moat_storage_t *base, size_t limit, moat_event_t **out, size_t *n)
{
    enc_storage_t *e = from_base(base);
    return pass(e, e->inner->ops->list_events(e->inner, limit, out, n));
}

static int op_kv_put(moat_storage_t *base, const char *key, const char *value)
{
    enc_storage_t *e = from_base(base);
    if (key == NULL || value == NULL)
        return pass(e, e->inner->ops->kv_put(e->inner, key, value));
    char *sealed = seal(e, "kv:", key, value);
    if (sealed == NULL) {
        moat_errf(base->last_error, sizeof base->last_error, "cannot encrypt a value");
        return MOAT_ECRYPTO;
    }
    int rc = e->inner->ops->kv_put(e->inner, key, sealed);
    free(sealed);
    return pass(e, rc);
}

static int op_kv_get(moat_storage_t *base, const char *key, char **value_out)
{
    enc_storage_t *e = from_base(base);
    int rc = pass(e, e->inner->ops->kv_get(e->inner, key, value_out));
    if (rc == 0 && (rc = unseal(e, "kv:", key, value_out)) != 0) {
        moat_secret_free(*value_out);
        *value_out = NULL;
    }
    return rc;
}

static int op_kv_list(moat_storage_t *base, const char *prefix, moat_kv_t **out, size_t *n)
{
    enc_storage_t *e = from_base(base);
    int rc = pass(e, e->inner->ops->kv_list(e->inner, prefix, out, n));
    if (rc != 0)
        return rc;
    for (size_t i = 0; rc == 0 && i < *n; i++)
        rc = unseal(e, "kv:", (*out)[i].key, &(*out)[i].value);
    if (rc != 0) {
        moat_kv_free(*out, *n);
        *out = NULL;
        *n = 0;
    }
    return rc;
}

#define DELEGATE0(name)                                                                            \
    static int op_##name(moat_storage_t *base)                                                     \
    {                                                                                              \
        enc_storage_t *e = from_base(base);                                                        \
        return pass(e, e->inner->ops->name(e->inner));                                             \
    }
DELEGATE0(begin)
DELEGATE0(commit)
DELEGATE0(rollback)
DELEGATE0(check)
DELEGATE0(watch_fd)

static int op_lease_take(moat_storage_t *base, const char *name, const char *owner, int ttl_s,
                         const char *steal, int64_t *token, char **holder)
{
    enc_storage_t *e = from_base(base);
    int rc = e->inner->ops->lease_take(e->inner, name, owner, ttl_s, steal, token, holder);
    return rc < 0 ? pass(e, rc) : rc;
}

static int op_lease_renew(moat_storage_t *base, const char *name, int64_t token, int ttl_s)
{
    enc_storage_t *e = from_base(base);
    return pass(e, e->inner->ops->lease_renew(e->inner, name, token, ttl_s));
}

static int op_lease_release(moat_storage_t *base, const char *name, int64_t token)
{
    enc_storage_t *e = from_base(base);
    return pass(e, e->inner->ops->lease_release(e->inner, name, token));
}

static int op_watch_drain(moat_storage_t *base, moat_storage_news_cb cb, void *arg)
{
    enc_storage_t *e = from_base(base);
    return pass(e, e->inner->ops->watch_drain(e->inner, cb, arg));
}

static void op_close(moat_storage_t *base)
{
    if (base == NULL)
        return;
    enc_storage_t *e = from_base(base);
    e->inner->ops->close(e->inner);
    EVP_AEAD_CTX_cleanup(&e->aead);
    free(e->key_file);
    OPENSSL_cleanse(e, sizeof *e);
    free(e);
}

static const moat_storage_ops_t enc_ops = {
    .put_cert = op_put_cert,
    .get_cert = op_get_cert,
    .list_certs = op_list_certs,
    .add_event = op_add_event,
    .list_events = op_list_events,
    .kv_put = op_kv_put,
    .kv_get = op_kv_get,
    .kv_list = op_kv_list,
    .begin = op_begin,
    .commit = op_commit,
    .rollback = op_rollback,
    .close = op_close,
    .check = op_check,
    .lease_take = op_lease_take,
    .lease_renew = op_lease_renew,
    .lease_release = op_lease_release,
    .put_cert_fenced = op_put_cert_fenced,
    .watch_fd = op_watch_fd,
    .watch_drain = op_watch_drain,
};

/* Read the key (base64 of 32 bytes, one line), or create the file 0600 with a new one. */
static int load_key(const char *path, uint8_t key[KEY_LEN], char *err, size_t errlen)
{
    char text[128];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) {
        /* Written whole to a private name, then linked into place: instances starting
         * together never read a half-written key, and exactly one key wins. */
        uint8_t fresh[KEY_LEN];
        RAND_bytes(fresh, sizeof fresh);
        EVP_EncodeBlock((uint8_t *)text, fresh, sizeof fresh);
        OPENSSL_cleanse(fresh, sizeof fresh);
        size_t n = strlen(text);
        text[n++] = '\n';
        char tmp[4200];
        snprintf(tmp, sizeof tmp, "%s.%d.tmp", path, (int)getpid());
        int wfd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
        int ok = wfd >= 0 && fchmod(wfd, 0600) == 0 && write(wfd, text, n) == (ssize_t)n &&
                 fsync(wfd) == 0;
        int e = errno;
        if (wfd >= 0)
            close(wfd);
        if (ok && link(tmp, path) == 0) {
            MOAT_INFO("storage: created the storage key %s; keep a copy: without it the "
                      "private keys in the store cannot be read",
                      path);
        } else if (ok && errno != EEXIST) {
            e = errno;
            ok = 0;
        }
        unlink(tmp);
        if (!ok) {
            moat_errf(err, errlen, "cannot create the storage key %s: %s", path, strerror(e));
            return MOAT_EIO;
        }
        fd = open(path, O_RDONLY | O_CLOEXEC);
    }
    if (fd < 0) {
        moat_errf(err, errlen, "cannot read the storage key %s: %s", path, strerror(errno));
        return MOAT_EIO;
    }
    struct stat st;
    if (fstat(fd, &st) == 0 && (st.st_mode & 077) != 0)
        MOAT_WARN("storage: %s can be read by other users; chmod 600 it", path);
    ssize_t got = read(fd, text, sizeof text - 1);
    close(fd);
    int rc = 0;
    size_t n = got > 0 ? (size_t)got : 0;
    while (n > 0 && (text[n - 1] == '\n' || text[n - 1] == '\r' || text[n - 1] == ' '))
        n--;
    size_t klen = 0;
    uint8_t raw[64]; /* the decoder wants room for what the length could decode to */
    int ok = EVP_DecodeBase64(raw, &klen, sizeof raw, (const uint8_t *)text, n) && klen == KEY_LEN;
    if (ok)
        memcpy(key, raw, KEY_LEN);
    OPENSSL_cleanse(raw, sizeof raw);
    if (!ok) {
        moat_errf(err, errlen,
                  "%s is not a moat storage key (one line: base64 of 32 bytes); moat creates "
                  "one when the file does not exist",
                  path);
        rc = MOAT_EINVAL;
    }
    OPENSSL_cleanse(text, sizeof text);
    return rc;
}

int moat_storage_encrypt(moat_storage_t *inner, const char *key_file, moat_storage_t **out,
                         char *err, size_t errlen)
{
    *out = NULL;
    uint8_t key[KEY_LEN];
    int rc = load_key(key_file, key, err, errlen);
    if (rc != 0)
        return rc;
    enc_storage_t *e = moat_xcalloc(1, sizeof *e);
    if (!EVP_AEAD_CTX_init(&e->aead, EVP_aead_aes_256_gcm(), key, KEY_LEN,
                           EVP_AEAD_DEFAULT_TAG_LENGTH, NULL)) {
        OPENSSL_cleanse(key, sizeof key);
        free(e);
        moat_errf(err, errlen, "cannot set up AES-256-GCM");
        return MOAT_ECRYPTO;
    }
    OPENSSL_cleanse(key, sizeof key);
    e->base.ops = &enc_ops;
    e->base.shared = inner->shared;
    e->base.sealed = 1;
    e->inner = inner;
    e->key_file = moat_xstrdup(key_file);
    *out = &e->base;
    return 0;
}
