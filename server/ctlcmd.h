/* The command-line side of the control socket (server/ctlcmd.c): send one request to the
 * running moat and read its answer; print `moat status`. */
#ifndef MOAT_CTLCMD_H
#define MOAT_CTLCMD_H

#include "ctlproto.h"

#include <jansson.h>
#include <stdio.h>

/* Send req to DATA/control.sock and wait at most timeout_ms for the answer. 0 with *answer
 * (json_decref it); MOAT_ENOT_FOUND when there is no socket or nobody listens on it (the
 * caller falls back to the pid file and signals); another negative code with a sentence in
 * err. */
int moat_ctl_call(const char *data_dir, const moat_ctl_req_t *req, int timeout_ms, json_t **answer,
                  char *err, size_t errlen);

/* `moat status`: one screen (at most 80 columns; colour when color is set) from the status
 * answer. */
void moat_ctl_print_status(const json_t *st, FILE *out, int color);

#endif
