/* The control socket (server/ctlsock.c): DATA/control.sock, a unix socket on the control
 * thread's loop that `moat reload|stop|renew|health|status` talk to (the protocol is in
 * server/ctlproto.h). It is created mode 0600, and only in a data folder no other user can
 * enter: the folder's mode is what keeps others away from the socket between bind and chmod.
 * Each connection carries one request, read within MOAT_CTLSOCK_READ_MS, and one answer. */
#ifndef MOAT_CTLSOCK_H
#define MOAT_CTLSOCK_H

#include "ctlproto.h"

#include <jansson.h>
#include <stddef.h>
#include <uv.h>

#define MOAT_CTLSOCK_READ_MS 5000

typedef struct moat_ctlsock moat_ctlsock_t;
typedef struct moat_ctlconn moat_ctlconn_t;

/* A request arrived on conn: answer it with moat_ctlsock_reply, now or later (the connection
 * waits; the client may have gone meanwhile, which the reply then ignores). */
typedef void (*moat_ctl_handler_cb)(moat_ctlconn_t *conn, const moat_ctl_req_t *req, void *data);

/* Check the data folder and listen on DATA/control.sock. 0, or a negative code with a sentence
 * in err (the folder is open to others, the path is too long, another moat answers there...);
 * moat then runs without the socket and the CLI falls back to signals. */
int moat_ctlsock_open(uv_loop_t *loop, const char *data_dir, moat_ctl_handler_cb handler,
                      void *data, moat_ctlsock_t **out, char *err, size_t errlen);
/* Send `answer` (reference taken over) and close the connection; then, once written, call
 * after(after_data) if given. */
void moat_ctlsock_reply(moat_ctlconn_t *conn, json_t *answer, void (*after)(void *),
                        void *after_data);
/* Stop listening, remove the socket file, close every connection (a handler must not reply
 * after this). Handles close on the loop: run it once more. NULL is ignored. */
void moat_ctlsock_close(moat_ctlsock_t *s);

/* Whether the folder is private to its owner (no group or other bits) and owned by this
 * user: 0, or MOAT_EINVAL with a sentence in err saying how to fix it. */
int moat_ctlsock_check_dir(const char *data_dir, char *err, size_t errlen);

#endif
