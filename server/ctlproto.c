/* The control protocol's request parser (server/ctlproto.h). Outside input: whoever can open
 * the socket; tests/fuzz/ctlproto_fuzz.c feeds it. */
#include "ctlproto.h"
#include "moat/common.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *const cmd_names[] = {"reload", "stop", "renew", "health", "status"};

const char *moat_ctl_cmd_name(moat_ctl_cmd_t cmd)
{
    return (size_t)cmd < MOAT_ARRAY_LEN(cmd_names) ? cmd_names[cmd] : "?";
}

int moat_ctl_parse(const char *buf, size_t len, moat_ctl_req_t *req, char *err, size_t errlen)
{
    memset(req, 0, sizeof *req);
    req->grace_s = -1;
    if (len > MOAT_CTL_MAX_REQUEST) {
        snprintf(err, errlen, "request longer than %d bytes", MOAT_CTL_MAX_REQUEST);
        return MOAT_EPARSE;
    }
    json_error_t je;
    /* DISABLE_EOF_CHECK: a trailing newline (or anything after the object) is not an error; a
     * NUL byte inside the request is (jansson rejects it in strings, and the object then
     * cannot be complete). */
    json_t *j = json_loadb(buf, len, JSON_DISABLE_EOF_CHECK | JSON_REJECT_DUPLICATES, &je);
    int rc = MOAT_EPARSE;
    if (j == NULL) {
        snprintf(err, errlen, "the request is not JSON: %s", je.text);
        return MOAT_EPARSE;
    }
    if (!json_is_object(j)) {
        snprintf(err, errlen, "the request must be a JSON object");
        goto out;
    }
    const char *cmd = json_string_value(json_object_get(j, "cmd"));
    if (cmd == NULL) {
        snprintf(err, errlen, "the request has no \"cmd\" string");
        goto out;
    }
    size_t i;
    for (i = 0; i < MOAT_ARRAY_LEN(cmd_names); i++)
        if (strcmp(cmd, cmd_names[i]) == 0)
            break;
    if (i == MOAT_ARRAY_LEN(cmd_names)) {
        snprintf(err, errlen, "unknown command \"%.40s\" (reload, stop, renew, health, status)",
                 cmd);
        goto out;
    }
    req->cmd = (moat_ctl_cmd_t)i;
    json_t *grace = json_object_get(j, "grace");
    if (grace != NULL) {
        if (req->cmd != MOAT_CTL_STOP || !json_is_integer(grace) || json_integer_value(grace) < 0 ||
            json_integer_value(grace) > 3600) {
            snprintf(err, errlen, "\"grace\" is a number of seconds from 0 to 3600, for stop");
            goto out;
        }
        req->grace_s = (int)json_integer_value(grace);
    }
    json_t *name = json_object_get(j, "name");
    if (name != NULL) {
        const char *s = json_string_value(name);
        if (req->cmd != MOAT_CTL_RENEW || s == NULL || strlen(s) >= sizeof req->name ||
            strlen(s) != json_string_length(name)) {
            snprintf(err, errlen, "\"name\" is a host name, for renew");
            goto out;
        }
        memcpy(req->name, s, strlen(s) + 1);
    }
    json_t *force = json_object_get(j, "force");
    if (force != NULL) {
        if (req->cmd != MOAT_CTL_RENEW || !json_is_boolean(force)) {
            snprintf(err, errlen, "\"force\" is true or false, for renew");
            goto out;
        }
        req->force = json_is_true(force);
    }
    rc = 0;
out:
    json_decref(j);
    return rc;
}

char *moat_ctl_format(const moat_ctl_req_t *req)
{
    json_t *j = json_pack("{ss}", "cmd", moat_ctl_cmd_name(req->cmd));
    if (req->cmd == MOAT_CTL_STOP && req->grace_s >= 0)
        json_object_set_new(j, "grace", json_integer(req->grace_s));
    if (req->cmd == MOAT_CTL_RENEW) {
        if (req->name[0])
            json_object_set_new(j, "name", json_string(req->name));
        if (req->force)
            json_object_set_new(j, "force", json_true());
    }
    char *s = json_dumps(j, JSON_COMPACT);
    json_decref(j);
    if (s == NULL)
        abort();
    size_t n = strlen(s);
    char *line = moat_xmalloc(n + 2);
    memcpy(line, s, n);
    line[n] = '\n';
    line[n + 1] = 0;
    free(s);
    return line;
}
