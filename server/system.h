/* How moat fits into the system around it: systemd's readiness protocol, dropping root after
 * the ports are bound, and the status file `moat health` reads. No libsystemd: the notify
 * protocol is one datagram on the socket named by $NOTIFY_SOCKET. */
#ifndef MOAT_SYSTEM_H
#define MOAT_SYSTEM_H

#include "server.h"
#include <stddef.h>

/* Exit codes of `moat run`. A configuration error (bad site file or command line) is 1 so
 * that systemd's RestartPreventExitStatus=1 stops a restart loop that cannot succeed; any
 * other failure to start (a port in use, an unreadable data folder, an upstream name that does
 * not resolve yet) is 3, which Restart=on-failure retries. */
#define MOAT_EXIT_CONFIG 1
#define MOAT_EXIT_START  3

/* The status file written at ready, in the data folder; `moat health` reads it. */
#define MOAT_STATUS_FILE "moat.status"

/* Send one notify message ("READY=1", "STOPPING=1", ...) to $NOTIFY_SOCKET. Returns 0 when it
 * was sent or when moat is not run by a service manager (no NOTIFY_SOCKET), else a negative
 * code. Safe to call from any thread. */
int moat_system_notify(const char *msg);

/* Remember the --user of `moat run` (NULL: "moat" when that user exists). The string must
 * outlive the run. */
void moat_system_set_user(const char *user);

/* Called once the listening sockets are bound and the data folder is open. When moat runs as
 * root, give the data folder and its files (moat.db, -wal, -shm, moat.pid) to the run user,
 * then set the groups, gid and uid to that user's; afterwards root cannot be regained. Does
 * nothing when not root, when the user is "root", or when no user was named and no "moat"
 * user exists (a warning says moat keeps running as root). Returns 0, MOAT_ENOT_FOUND for a
 * named user that does not exist, or another negative code, with a sentence in err. */
int moat_system_drop_privileges(const char *data_dir, char *err, size_t errlen);

/* Ready: write DATA/moat.status (pid and the listening ports) and notify READY=1 with a
 * STATUS= line. A status file that cannot be written only costs `moat health`. */
void moat_system_ready(const char *data_dir, const moat_server_opts_t *s);
/* Around a reload: RELOADING=1 (with MONOTONIC_USEC, which newer systemd wants) and back to
 * READY=1. */
void moat_system_reloading(void);
void moat_system_reloaded(void);
/* Still serving, without something (a damaged store): `moat health` says so in a second line
 * and still exits 0, and systemd's STATUS= shows it. */
void moat_system_degraded(const char *data_dir, const char *why);
/* What was missing is back (a shared store answers again): `moat health` stops saying
 * degraded. */
void moat_system_recovered(const char *data_dir);
/* Stopping: notify STOPPING=1 and remove the status file, so health fails at once. */
void moat_system_stopping(const char *data_dir);

/* `moat health`: exit status 0 when the moat using data_dir serves. It reads the status file,
 * checks the process is alive, and sends a request to its plain-HTTP listener on loopback (or
 * completes a TCP connection to its HTTPS port when it has no plain one), waiting at most
 * timeout_ms. Prints one line saying why on failure. Returns the exit status: 0 or 1. */
int moat_system_health(const char *data_dir, int timeout_ms);

#endif
