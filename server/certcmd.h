/* Certificate CLI commands (server/certcmd.c): `moat ca-root`, `moat trust`, `moat certs`.
 * Each prints to stdout/stderr and returns a process exit code. Server-internal: main.c calls
 * them; they use the certificate module (include/moat/certs.h) and storage. */
#ifndef MOAT_CERTCMD_H
#define MOAT_CERTCMD_H

/* The store the commands below open: NULL (DATA/moat.db), "sqlite:DIR" or a postgres:// URL
 * (include/moat/storage.h, moat_storage_open), and the key file sealing its secrets (NULL:
 * none). Borrowed; set once before the command. */
void moat_cmd_set_storage(const char *spec, const char *key_file);
/* `moat storage copy --from STORE --to STORE`: every certificate and setting, safe to repeat
 * (moat_storage_copy); both opened with the key file set above. Prints what it did. */
int moat_cmd_storage_copy(const char *from, const char *to, const char *data_dir);
/* Print the internal root CA certificate (PEM), creating the CA on first use. */
int moat_cmd_ca_root(const char *data_dir);
/* add != 0: install the root into the system trust store
 * (/usr/local/share/ca-certificates/moat-root.crt + update-ca-certificates); add == 0: remove
 * it again. Needs root privileges. */
int moat_cmd_trust(const char *data_dir, int add);
/* Print a table of stored certificates (ID NAMES ISSUER NOT-AFTER NEXT-RENEWAL SOURCE
 * LAST-ERROR), then the ACME names of the site file at config_path (may be NULL) that are
 * still pending, with the next attempt and the last error. */
int moat_cmd_certs(const char *data_dir, const char *config_path);

/* moat_cmd_trust with the trust folder and the updater command given: for tests. */
int moat__cmd_trust_at(const char *data_dir, int add, const char *dir, const char *updater);

#endif
