/* The control thread: loads the site file, keeps certificates and the runtime snapshot
 * current, starts the workers and handles signals (SIGHUP reload, SIGTERM/SIGINT stop). */
#ifndef MOAT_CONTROL_H
#define MOAT_CONTROL_H

#include <stdint.h>

typedef struct {
    const char *config_path; /* NULL when the site came from the command line */
    int site_argc;           /* SITE UPSTREAM [key=value...] from the command line */
    char **site_argv;
    const char *data_dir;
    /* The store: NULL for DATA/moat.db, "sqlite:DIR", or postgres://... shared by several
     * instances (moat_storage_open). data_dir still holds this instance's pid and status. */
    const char *storage;
    const char *storage_key; /* key file sealing private keys at rest, or NULL */
    const char *bind_addr;
    const char *access_log;
    int http_port, https_port;
    int workers;
    uint64_t grace_ms;
    /* ACME: default contact, directory URL (NULL: Let's Encrypt, or its staging CA when
     * acme_staging), extra trust anchor PEM for the directory's HTTPS. */
    const char *email, *acme_ca, *acme_ca_root;
    int acme_staging;
    const char *metrics_addr; /* --metrics ADDR:PORT, or NULL */
} moat_run_opts_t;

/* Run until stopped; returns the process exit code (0 after a clean stop, 1 when the
 * configuration or the environment does not allow starting). */
int moat_control_run(const moat_run_opts_t *o);

#define MOAT_PID_FILE "moat.pid"

#endif
