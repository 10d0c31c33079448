/* Feeds arbitrary bytes to the site-file parser, and when a config comes out, prints it and
 * re-parses the same bytes as command-line words, so the printer and from_args run too. */
#include "moat/config.h"
#include "moat/common.h"

#include <stdio.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    moat_config_t *cfg = NULL;
    moat_config_errors_t errs = {0};
    int rc = moat_config_parse("Moatfile", (const char *)data, size, &cfg, &errs);
    if ((rc == 0) != (cfg != NULL) || (rc == 0) != (errs.n == 0))
        abort();
    static FILE *devnull;
    if (devnull == NULL)
        devnull = fopen("/dev/null", "w");
    if (devnull != NULL) {
        moat_config_errors_print(&errs, devnull);
        if (cfg != NULL)
            moat_config_print(cfg, devnull);
    }
    moat_config_free(cfg);
    moat_config_errors_free(&errs);

    /* The first line split at spaces, as a shell would hand it over. */
    if (size <= 4096) {
        char *line = moat_xstrndup((const char *)data, size);
        char *argv[64];
        int argc = 0;
        for (char *save = NULL, *w = strtok_r(line, " \n", &save); w && argc < 64;
             w = strtok_r(NULL, " \n", &save))
            argv[argc++] = w;
        rc = moat_config_from_args(argc, argv, &cfg, &errs);
        if ((rc == 0) != (cfg != NULL))
            abort();
        if (devnull != NULL && cfg != NULL)
            moat_config_print(cfg, devnull);
        moat_config_free(cfg);
        moat_config_errors_free(&errs);
        free(line);
    }
    return 0;
}
