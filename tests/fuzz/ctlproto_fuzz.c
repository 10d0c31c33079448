/* Feeds arbitrary bytes to the control socket's request parser (server/ctlproto.c); a request
 * that parses must format back to one that parses to the same thing. */
#include "ctlproto.h"
#include "moat/common.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    moat_ctl_req_t req, again;
    char err[256];
    if (moat_ctl_parse((const char *)data, size, &req, err, sizeof err) != 0) {
        if (memchr(err, 0, sizeof err) == NULL)
            abort();
        return 0;
    }
    char *line = moat_ctl_format(&req);
    if (moat_ctl_parse(line, strlen(line), &again, err, sizeof err) != 0 ||
        memcmp(&req, &again, sizeof req) != 0)
        abort();
    free(line);
    return 0;
}
