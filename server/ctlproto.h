/* The control protocol (server/ctlproto.c): what `moat reload|stop|renew|health|status` send
 * to the running moat over DATA/control.sock, and the parser the control thread reads it with.
 *
 * One request per connection: a JSON object on one line (it ends at the first newline, or
 * when the client shuts its side down), at most MOAT_CTL_MAX_REQUEST bytes:
 *
 *   {"cmd":"reload"}                     re-read the site file; the answer waits for the result
 *   {"cmd":"stop","grace":5}             stop; grace (seconds, 0-3600) overrides --grace
 *   {"cmd":"renew","name":"a.example","force":true}   name and force optional
 *   {"cmd":"health"}  {"cmd":"status"}
 *
 * One answer, a JSON object, then the server closes: {"ok":true,...} or
 * {"ok":false,"error":"sentence","errors":["FILE:LINE:COL: message",...]}. Unknown members are
 * ignored (a newer CLI may send more); an unknown command is an error answer. */
#ifndef MOAT_CTLPROTO_H
#define MOAT_CTLPROTO_H

#include <stddef.h>

#define MOAT_CTL_MAX_REQUEST 4096
#define MOAT_CTL_SOCKET      "control.sock"

typedef enum {
    MOAT_CTL_RELOAD,
    MOAT_CTL_STOP,
    MOAT_CTL_RENEW,
    MOAT_CTL_HEALTH,
    MOAT_CTL_STATUS,
} moat_ctl_cmd_t;

typedef struct {
    moat_ctl_cmd_t cmd;
    int grace_s;    /* stop: -1 when not given */
    int force;      /* renew */
    char name[256]; /* renew: "" for every certificate */
} moat_ctl_req_t;

/* Parse one request from buf[0..len) (the newline, if any, excluded or not). 0, or MOAT_EPARSE
 * with a sentence in err. Never reads past len; buf need not be NUL-terminated. */
int moat_ctl_parse(const char *buf, size_t len, moat_ctl_req_t *req, char *err, size_t errlen);

/* The request as one line of JSON with its newline (free()). */
char *moat_ctl_format(const moat_ctl_req_t *req);

/* The command's name in the protocol. */
const char *moat_ctl_cmd_name(moat_ctl_cmd_t cmd);

#endif
