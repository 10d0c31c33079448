/* Fuzz the PostgreSQL protocol decoder (storage/pgwire.c) with what a server, or something
 * pretending to be one, could send. Input: a stream of backend messages, decoded in one piece
 * and again fed in pseudo-random splits (the two must agree); every DataRow's columns read;
 * every error and notice turned into a sentence; every SASL list searched; the body of each
 * SASL continue message is also handed to the SCRAM step as a server-first message, and each
 * SASL final one to the verifier. Every slice must lie inside the input. */
#include "moat/pgwire.h"

#include <stdlib.h>

static void check_in(moat_slice_t s, const char *buf, size_t len)
{
    if (s.len > 0 && (s.base < buf || s.base + s.len > buf + len))
        abort();
}

static void look(const moat_pgw_msg_t *m, const char *buf, size_t len)
{
    char sentence[600];
    check_in(m->body, buf, len);
    switch (m->type) {
    case 'D':
        for (uint16_t i = 0; i < m->u.row.ncols; i++) {
            moat_slice_t v;
            int isnull;
            if (moat_pgw_row_col(m, i, &v, &isnull) != 0)
                abort(); /* the decoder accepted the row: every column must be readable */
            check_in(v, buf, len);
        }
        break;
    case 'E':
    case 'N':
        moat_pgw_error_sentence(&m->u.error, sentence, sizeof sentence);
        if (strlen(sentence) >= sizeof sentence)
            abort();
        break;
    case 'R': {
        check_in(m->u.auth.data, buf, len);
        moat_pgw_sasl_offers(m->u.auth.data, "SCRAM-SHA-256");
        if (m->u.auth.code != MOAT_PGW_AUTH_SASL_CONTINUE)
            break;
        /* Keep the PBKDF2 cheap: a large i= is refused before the work, a small one runs. */
        moat_pgw_scram_t s;
        moat_buf_t out = {0};
        char err[200];
        if (moat_pgw_scram_first(&s, "fuzznonce", NULL, 0, 0, &out) == 0) {
            moat_buf_reset(&out);
            if (moat_pgw_scram_final(&s, "pw", m->u.auth.data, &out, err, sizeof err) == 0)
                moat_pgw_scram_verify(&s, m->u.auth.data, err, sizeof err);
        }
        moat_pgw_scram_clear(&s);
        moat_buf_free(&out);
        break;
    }
    case 'A':
        check_in(m->u.notify.channel, buf, len);
        check_in(m->u.notify.payload, buf, len);
        break;
    default: break;
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *buf = (const char *)data;
    char err[300];
    size_t at = 0, whole_msgs = 0, whole_end = 0;
    int whole_rc = 0;
    /* Whole. */
    while (at < size) {
        moat_pgw_msg_t m;
        size_t used = 0;
        int rc = moat_pgw_next(buf + at, size - at, &m, &used, err, sizeof err);
        if (rc <= 0) {
            whole_rc = rc;
            break;
        }
        if (used < 5 || used > size - at)
            abort();
        look(&m, buf, size);
        at += used;
        whole_msgs++;
    }
    whole_end = at;
    /* Split: grow the window a few bytes at a time, as reads arrive. */
    at = 0;
    size_t msgs = 0, avail = 0, step = 1;
    int rc = 0;
    while (at < size) {
        moat_pgw_msg_t m;
        size_t used = 0;
        rc = moat_pgw_next(buf + at, avail - at, &m, &used, err, sizeof err);
        if (rc < 0)
            break;
        if (rc == 0) {
            if (avail == size)
                break;
            avail = MOAT_MIN(size, avail + step);
            step = step % 13 + 1;
            continue;
        }
        at += used;
        msgs++;
    }
    if (msgs != whole_msgs || at != whole_end || (rc < 0) != (whole_rc < 0))
        abort();
    return 0;
}
