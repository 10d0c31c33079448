/* Certificate CLI commands (server/certcmd.h): ca-root, trust, certs. */
#include "certcmd.h"
#include "moat/ca.h"
#include "moat/acme.h"
#include "moat/certs.h"
#include "moat/common.h"
#include "moat/storage.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define TRUST_DIR     "/usr/local/share/ca-certificates"
#define TRUST_FILE    "moat-root.crt"
#define TRUST_UPDATER "update-ca-certificates"

static const char *storage_spec; /* --storage / MOAT_STORAGE; NULL: DATA/moat.db */
static const char *storage_key;  /* --storage-key / MOAT_STORAGE_KEY; NULL: not sealed */

void moat_cmd_set_storage(const char *spec, const char *key_file)
{
    storage_spec = spec;
    storage_key = key_file;
}

int moat_cmd_storage_copy(const char *from, const char *to, const char *data_dir)
{
    if (from == NULL || to == NULL) {
        fprintf(stderr, "moat: storage copy needs --from STORE and --to STORE (sqlite:DIR or "
                        "postgres://...)\n");
        return 1;
    }
    moat_storage_t *src = NULL, *dst = NULL;
    char err[1024] = "";
    int code = 1;
    if (moat_storage_open(from, data_dir, storage_key, &src, err, sizeof err) != 0 ||
        moat_storage_open(to, data_dir, storage_key, &dst, err, sizeof err) != 0) {
        fprintf(stderr, "moat: %s\n", err);
        goto out;
    }
    moat_storage_copy_stats_t st;
    if (moat_storage_copy(src, dst, &st, err, sizeof err) != 0) {
        fprintf(stderr, "moat: %s; nothing was changed in the destination\n", err);
        goto out;
    }
    printf("moat: copied %zu certificate(s) and %zu setting(s); %zu certificate(s) and %zu "
           "setting(s) were already there, %zu newer certificate(s) there kept\n",
           st.certs_copied, st.settings_copied, st.certs_same, st.settings_same,
           st.certs_newer_kept);
    code = 0;
out:
    if (src)
        src->ops->close(src);
    if (dst)
        dst->ops->close(dst);
    return code;
}

static int open_ca(const char *data_dir, moat_storage_t **st, moat_ca_t **ca)
{
    char err[1024] = "";
    *ca = NULL;
    if (moat_storage_open(storage_spec, data_dir, storage_key, st, err, sizeof err) != 0) {
        fprintf(stderr, "moat: %s\n", err);
        return 1;
    }
    if (moat_ca_open(*st, ca, err, sizeof err) != 0) {
        fprintf(stderr, "moat: %s\n", err);
        (*st)->ops->close(*st);
        *st = NULL;
        return 1;
    }
    return 0;
}

int moat_cmd_ca_root(const char *data_dir)
{
    moat_storage_t *st;
    moat_ca_t *ca;
    if (open_ca(data_dir, &st, &ca) != 0)
        return 1;
    fputs(moat_ca_root_pem(ca), stdout);
    moat_ca_free(ca);
    st->ops->close(st);
    return fflush(stdout) == 0 ? 0 : 1;
}

/* Run the trust-store updater without a shell: its output goes to ours, so the user sees
 * what it did. Returns its exit status, or 127 when it cannot be run. */
static int run_updater(const char *updater)
{
    fflush(stdout);
    fflush(stderr);
    pid_t pid = fork();
    if (pid < 0)
        return 127;
    if (pid == 0) {
        char *argv[] = {(char *)updater, NULL};
        execvp(updater, argv);
        _exit(127);
    }
    int status;
    while (waitpid(pid, &status, 0) < 0)
        if (errno != EINTR)
            return 127;
    return WIFEXITED(status) ? WEXITSTATUS(status) : 126;
}

static int updater_result(const char *updater, int rc)
{
    if (rc == 0)
        return 0;
    if (rc == 127)
        fprintf(stderr,
                "moat: could not run %s; install the ca-certificates package (for example "
                "`apt install ca-certificates`) and run this command again\n",
                updater);
    else
        fprintf(stderr, "moat: %s failed (exit status %d)\n", updater, rc);
    return 1;
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static const char *perm_hint(int e)
{
    return (e == EACCES || e == EPERM) ? " (run this command as root, e.g. with sudo)" : "";
}

int moat__cmd_trust_at(const char *data_dir, int add, const char *dir, const char *updater)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, TRUST_FILE);
    if (!add) {
        if (unlink(path) != 0) {
            if (errno == ENOENT) {
                printf("The moat root CA is not installed in %s; nothing to remove.\n", dir);
                return 0;
            }
            fprintf(stderr, "moat: cannot remove %s: %s%s\n", path, strerror(errno),
                    perm_hint(errno));
            return 1;
        }
        if (updater_result(updater, run_updater(updater)) != 0)
            return 1;
        printf("Removed the moat root CA from the system trust store (%s).\n", path);
        return 0;
    }

    moat_storage_t *st;
    moat_ca_t *ca;
    if (open_ca(data_dir, &st, &ca) != 0)
        return 1;
    const char *pem = moat_ca_root_pem(ca);
    int rc = 1;
    /* Write a temporary file and rename it, so a crash never leaves a truncated certificate
     * in the trust folder for the updater to choke on. */
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s/.%s.tmp", dir, TRUST_FILE);
    if (mkdir(dir, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "moat: cannot create %s: %s%s\n", dir, strerror(errno), perm_hint(errno));
        goto out;
    }
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        fprintf(stderr, "moat: cannot write %s: %s%s\n", path, strerror(errno), perm_hint(errno));
        goto out;
    }
    int bad = write_all(fd, pem, strlen(pem)) != 0 || fchmod(fd, 0644) != 0 || fsync(fd) != 0;
    bad = (close(fd) != 0) || bad;
    if (bad || rename(tmp, path) != 0) {
        fprintf(stderr, "moat: cannot write %s: %s\n", path, strerror(errno));
        unlink(tmp);
        goto out;
    }
    if (updater_result(updater, run_updater(updater)) != 0)
        goto out;
    printf("Installed the moat root CA in the system trust store (%s).\n"
           "Programs that use the system store (curl, wget, Python, Chrome on Linux) now trust "
           "moat's internal certificates.\n"
           "Firefox keeps its own store: import the output of `moat ca-root` there, or enable "
           "security.enterprise_roots.enabled.\n",
           path);
    rc = 0;
out:
    moat_ca_free(ca);
    st->ops->close(st);
    return rc;
}

int moat_cmd_trust(const char *data_dir, int add)
{
    return moat__cmd_trust_at(data_dir, add, TRUST_DIR, TRUST_UPDATER);
}

static void format_time_utc(int64_t t, char *out, size_t cap)
{
    if (t <= 0) {
        snprintf(out, cap, "-");
        return;
    }
    time_t tt = (time_t)t;
    struct tm tm;
    gmtime_r(&tt, &tm);
    strftime(out, cap, "%Y-%m-%d %H:%MZ", &tm);
}

/* The last ACME failure for a certificate id, or NULL (free()). */
static char *last_error(moat_storage_t *st, const char *id)
{
    char key[600], *v = NULL;
    snprintf(key, sizeof key, "acme-error:%s", id);
    if (st->ops->kv_get(st, key, &v) != 0)
        return NULL;
    return v;
}

/* ACME names of the site file that have no certificate yet: say they are pending, when the
 * next attempt is and why the last one failed. */
static void print_pending(moat_storage_t *st, const char *config_path)
{
    moat_config_t *cfg = NULL;
    if (config_path == NULL || moat_config_load_file(config_path, &cfg, NULL) != 0)
        return;
    for (size_t i = 0; i < cfg->nsites; i++) {
        const char **names = NULL;
        size_t n = moat_certs_site_acme_names(&cfg->sites[i], &names);
        if (n == 0) {
            free(names);
            continue;
        }
        char *id = moat_certs_acme_id(names, n);
        moat_cert_record_t rec = {0};
        if (st->ops->get_cert(st, id, &rec) == 0) {
            moat_cert_record_clear(&rec);
        } else {
            char key[600], *backoff = NULL, when[32] = "as soon as moat runs";
            snprintf(key, sizeof key, "acme-backoff:%s", id);
            if (st->ops->kv_get(st, key, &backoff) == 0 && backoff != NULL) {
                long long failures = 0, next = 0;
                if (sscanf(backoff, "%lld %lld", &failures, &next) == 2)
                    format_time_utc(next, when, sizeof when);
            }
            free(backoff);
            char *err = last_error(st, id);
            printf("pending: %s (from %s:%d): no certificate yet; next attempt %s%s%s\n", id + 5,
                   cfg->source, cfg->sites[i].line, when, err ? "; last error: " : "",
                   err ? err : "");
            free(err);
        }
        free(id);
        free(names);
    }
    moat_config_free(cfg);
}

/* DNS-01: what each name's record is doing (or why it failed), and records made and not yet
 * deleted (server/dns01.h keeps both in the kv table). */
static void print_dns01(moat_storage_t *st)
{
    moat_kv_t *rows = NULL;
    size_t n = 0;
    if (st->ops->kv_list(st, "dns01-state:", &rows, &n) == 0) {
        for (size_t i = 0; i < n; i++)
            printf("dns-01: %s: %s\n", rows[i].key + 12, rows[i].value ? rows[i].value : "");
        moat_kv_free(rows, n);
    }
    if (st->ops->kv_list(st, "dns01-record:", &rows, &n) == 0) {
        for (size_t i = 0; i < n; i++) {
            const char *k = rows[i].key + 13, *bar = strchr(k, '|');
            printf("dns-01: record in the zone, to be deleted: %.*s TXT \"%s\"\n",
                   bar ? (int)(bar - k) : (int)strlen(k), k, bar ? bar + 1 : "");
        }
        moat_kv_free(rows, n);
    }
}

int moat_cmd_certs(const char *data_dir, const char *config_path)
{
    moat_storage_t *st;
    char err[1024] = "";
    if (moat_storage_open(storage_spec, data_dir, storage_key, &st, err, sizeof err) != 0) {
        fprintf(stderr, "moat: %s\n", err);
        return 1;
    }
    moat_cert_record_t *recs = NULL;
    size_t n = 0;
    if (st->ops->list_certs(st, &recs, &n) != 0) {
        fprintf(stderr, "moat: cannot list certificates: %s\n", moat_storage_last_error(st));
        st->ops->close(st);
        return 1;
    }
    if (n == 0) {
        printf("No certificates stored yet.\n");
    } else {
        printf("%-32s %-32s %-32s %-18s %-18s %-8s %s\n", "ID", "NAMES", "ISSUER", "NOT-AFTER",
               "NEXT-RENEWAL", "SOURCE", "LAST-ERROR");
        for (size_t i = 0; i < n; i++) {
            const moat_cert_record_t *r = &recs[i];
            char when[32], renew[32];
            format_time_utc(r->not_after, when, sizeof when);
            format_time_utc(moat_cert_next_renewal(r), renew, sizeof renew);
            char *last = r->id ? last_error(st, r->id) : NULL;
            printf("%-32s %-32s %-32s %-18s %-18s %-8s %s\n", r->id ? r->id : "",
                   (r->names && r->names[0]) ? r->names : "-",
                   (r->issuer && r->issuer[0]) ? r->issuer : "-", when, renew,
                   r->source ? r->source : "", last ? last : "-");
            free(last);
        }
    }
    print_pending(st, config_path);
    print_dns01(st);
    for (size_t i = 0; i < n; i++)
        moat_cert_record_clear(&recs[i]);
    free(recs);
    st->ops->close(st);
    return fflush(stdout) == 0 ? 0 : 1;
}
