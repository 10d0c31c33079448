/* Renewal and backoff arithmetic (include/moat/acme.h). Pure functions, so the schedule can be
 * tested without a clock. */
#include "moat/acme.h"

#include <ctype.h>
#include <stdlib.h>
#include <strings.h>
#include <time.h>

int64_t moat_acme_renew_at(int64_t not_before, int64_t not_after, int64_t ari_start,
                           int64_t ari_end, double jitter)
{
    if (ari_start > 0 && ari_end >= ari_start) {
        if (jitter < 0)
            jitter = 0;
        if (jitter > 1)
            jitter = 1;
        return ari_start + (int64_t)((double)(ari_end - ari_start) * jitter);
    }
    /* A third of the lifetime left: 30 days of a 90-day certificate, 2 days of a 6-day one. */
    int64_t life = not_after > not_before ? not_after - not_before : 0;
    return not_after - life / 3;
}

int64_t moat_acme_backoff(int failures, int64_t retry_after, int rate_limited)
{
    if (failures < 1)
        failures = 1;
    int64_t d = MOAT_ACME_BACKOFF_MIN;
    for (int i = 1; i < failures && d < MOAT_ACME_BACKOFF_MAX; i++)
        d *= 2;
    if (d > MOAT_ACME_BACKOFF_MAX)
        d = MOAT_ACME_BACKOFF_MAX;
    if (rate_limited && retry_after <= 0 && d < 3600)
        d = 3600;
    /* The CA knows its own limits: a longer Retry-After always wins, even past 6 h. */
    if (retry_after > d)
        d = retry_after;
    return d;
}

int64_t moat_acme_parse_retry_after(const char *v, int64_t now)
{
    if (v == NULL)
        return 0;
    while (*v == ' ')
        v++;
    if (isdigit((unsigned char)*v)) {
        char *end;
        long long n = strtoll(v, &end, 10);
        return (*end == '\0' || *end == ' ') && n > 0 ? (int64_t)n : 0;
    }
    struct tm tm = {0};
    const char *e = strptime(v, "%a, %d %b %Y %H:%M:%S GMT", &tm);
    if (e == NULL)
        return 0;
    int64_t t = (int64_t)timegm(&tm);
    return t > now ? t - now : 0;
}
