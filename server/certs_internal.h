/* Server-internal parts of the certificate module (server/certs.c) that tests and the fuzz
 * target reach without going through files. */
#ifndef MOAT_CERTS_INTERNAL_H
#define MOAT_CERTS_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

/* moat_certmgr_load_files on texts already read: cert_text holds the PEM chain, key_text the
 * PEM key (both NUL-terminated); the paths only name them in messages. Same checks, results
 * and ownership as moat_certmgr_load_files. */
int moat__certs_check_pem(const char *cert_path, const char *cert_text, const char *key_path,
                          const char *key_text, char **chain_pem, char **key_pem,
                          int64_t *not_before, int64_t *not_after, char *err, size_t errlen);

#endif
