/* Unit tests for the PostgreSQL protocol codec (storage/pgwire.c): frontend messages byte for
 * byte, backend messages whole and split, malformed input refused, and SCRAM-SHA-256 against
 * the RFC 7677 example. */
#include "moat/pgwire.h"
#include "test.h"

#include <stdlib.h>

static int buf_is(const moat_buf_t *b, const void *want, size_t n)
{
    return moat_buf_size(b) == n && memcmp(moat_buf_data(b), want, n) == 0;
}

static void test_encode(void)
{
    moat_buf_t b = {0};
    CHECK_INT(moat_pgw_ssl_request(&b), 0);
    CHECK(buf_is(&b, "\0\0\0\x08\x04\xd2\x16\x2f", 8));
    moat_buf_reset(&b);

    CHECK_INT(moat_pgw_startup(&b, "moat", "db", NULL), 0);
    static const char startup[] = "\0\0\0\x34\0\x03\0\0user\0moat\0database\0db\0"
                                  "client_encoding\0UTF8\0";
    CHECK(buf_is(&b, startup, sizeof startup)); /* the literal's own NUL ends the list */
    moat_buf_reset(&b);

    CHECK_INT(moat_pgw_parse(&b, NULL, "SELECT $1"), 0);
    CHECK(buf_is(&b, "P\0\0\0\x11\0SELECT $1\0\0\0", 18));
    moat_buf_reset(&b);

    const char *vals[] = {"ab", NULL};
    size_t lens[] = {2, 0};
    int bin[] = {1, 0};
    CHECK_INT(moat_pgw_bind(&b, NULL, 2, vals, lens, bin), 0);
    static const char bind[] = "B\0\0\0\x1a\0\0\0\x02\0\x01\0\0\0\x02\0\0\0\x02"
                               "ab\xff\xff\xff\xff\0\0";
    CHECK(buf_is(&b, bind, sizeof bind - 1));
    moat_buf_reset(&b);

    CHECK_INT(moat_pgw_describe(&b, 'P', NULL), 0);
    CHECK_INT(moat_pgw_execute(&b, NULL, 0), 0);
    CHECK_INT(moat_pgw_sync(&b), 0);
    CHECK(buf_is(&b, "D\0\0\0\x06P\0E\0\0\0\x09\0\0\0\0\0S\0\0\0\x04", 22));
    CHECK_INT(moat_pgw_describe(&b, 'X', NULL), MOAT_EINVAL);
    moat_buf_reset(&b);

    CHECK_INT(moat_pgw_sasl_initial(&b, "SCRAM-SHA-256", "n,,", 3), 0);
    CHECK(buf_is(&b, "p\0\0\0\x19SCRAM-SHA-256\0\0\0\0\x03n,,", 26));
    moat_buf_free(&b);
}

/* Feed `in` to the decoder whole and one byte at a time more; both must agree. */
static int decode_one(const void *in, size_t n, moat_pgw_msg_t *m)
{
    char err[200];
    size_t used = 0;
    for (size_t k = 0; k < n; k++)
        if (moat_pgw_next(in, k, m, &used, err, sizeof err) != 0)
            return -1000;
    int rc = moat_pgw_next(in, n, m, &used, err, sizeof err);
    if (rc == 1 && used != n)
        return -1001;
    return rc;
}

static void test_decode(void)
{
    moat_pgw_msg_t m;
    static const char ready[] = "Z\0\0\0\x05I";
    CHECK_INT(decode_one(ready, 6, &m), 1);
    CHECK_INT(m.type, 'Z');
    CHECK_INT(m.u.ready, 'I');

    static const char sasl[] = "R\0\0\0\x2a\0\0\0\x0aSCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0";
    CHECK_INT(decode_one(sasl, sizeof sasl - 1, &m), 1);
    CHECK_INT(m.u.auth.code, MOAT_PGW_AUTH_SASL);
    CHECK(moat_pgw_sasl_offers(m.u.auth.data, "SCRAM-SHA-256"));
    CHECK(moat_pgw_sasl_offers(m.u.auth.data, "SCRAM-SHA-256-PLUS"));
    CHECK(!moat_pgw_sasl_offers(m.u.auth.data, "SCRAM"));

    static const char row[] = "D\0\0\0\x13\0\x03\0\0\0\x01x\xff\xff\xff\xff\0\0\0\0";
    CHECK_INT(decode_one(row, sizeof row - 1, &m), 1);
    CHECK_INT(m.u.row.ncols, 3);
    moat_slice_t v;
    int isnull = -1;
    CHECK_INT(moat_pgw_row_col(&m, 0, &v, &isnull), 0);
    CHECK(v.len == 1 && v.base[0] == 'x' && isnull == 0);
    CHECK_INT(moat_pgw_row_col(&m, 1, &v, &isnull), 0);
    CHECK(isnull == 1 && v.base == NULL);
    CHECK_INT(moat_pgw_row_col(&m, 2, &v, &isnull), 0);
    CHECK(isnull == 0 && v.len == 0);
    CHECK_INT(moat_pgw_row_col(&m, 3, &v, &isnull), MOAT_EINVAL);

    static const char err[] = "E\0\0\0\x3aSERROR\0VERROR\0C28P01\0Mpassword authentication "
                              "failed\0\0";
    CHECK_INT(decode_one(err, sizeof err - 1, &m), 1);
    char sentence[300];
    moat_pgw_error_sentence(&m.u.error, sentence, sizeof sentence);
    CHECK_STR(sentence, "ERROR: password authentication failed [SQLSTATE 28P01]");

    static const char note[] = "A\0\0\0\x14\0\0\0\x07moat\0cert:a\0";
    CHECK_INT(decode_one(note, sizeof note - 1, &m), 1);
    CHECK(moat_slice_eq(m.u.notify.channel, "moat"));
    CHECK(moat_slice_eq(m.u.notify.payload, "cert:a"));
    CHECK_INT(m.u.notify.pid, 7);

    static const char tag[] = "C\0\0\0\x0fINSERT 0 1\0";
    CHECK_INT(decode_one(tag, sizeof tag - 1, &m), 1);
    CHECK(moat_slice_eq(m.u.tag, "INSERT 0 1"));

    /* Two messages in one read: the first is returned with its length. */
    char two[12];
    memcpy(two, ready, 6);
    memcpy(two + 6, ready, 6);
    size_t used = 0;
    char e[200];
    CHECK_INT(moat_pgw_next(two, 12, &m, &used, e, sizeof e), 1);
    CHECK_INT(used, 6);

    /* Malformed: a length below 4, a huge length, a row whose columns overrun, a bad status,
     * an unknown type, an error without its terminator. */
    CHECK_INT(moat_pgw_next("Z\0\0\0\x03", 5, &m, &used, e, sizeof e), MOAT_EPARSE);
    CHECK_INT(moat_pgw_next("D\x7f\0\0\0", 5, &m, &used, e, sizeof e), MOAT_EPARSE);
    CHECK(strstr(e, "PostgreSQL") != NULL);
    CHECK_INT(moat_pgw_next("D\0\0\0\x0a\0\x01\0\0\0\x09", 11, &m, &used, e, sizeof e),
              MOAT_EPARSE);
    CHECK_INT(moat_pgw_next("Z\0\0\0\x05Q", 6, &m, &used, e, sizeof e), MOAT_EPARSE);
    CHECK_INT(moat_pgw_next("G\0\0\0\x04", 5, &m, &used, e, sizeof e), MOAT_EPARSE);
    CHECK_INT(moat_pgw_next("E\0\0\0\x07Mxy", 8, &m, &used, e, sizeof e), MOAT_EPARSE);
    CHECK(strstr(e, "malformed") != NULL);
}

/* RFC 7677 section 3: user "user", password "pencil". */
static void test_scram(void)
{
    moat_pgw_scram_t s;
    moat_buf_t out = {0};
    CHECK_INT(moat_pgw_scram_first(&s, "rOprNGfwEbeRWgbNEkqO", NULL, 0, 0, &out), 0);
    CHECK(buf_is(&out, "n,,n=,r=rOprNGfwEbeRWgbNEkqO", 28));
    /* The RFC's example names the user; PostgreSQL's clients leave it empty. */
    free(s.client_first_bare);
    s.client_first_bare = moat_xstrdup("n=user,r=rOprNGfwEbeRWgbNEkqO");
    moat_buf_reset(&out);
    const char *sf = "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                     "s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    char err[200] = "";
    CHECK_INT(moat_pgw_scram_final(&s, "pencil", moat_slice_str(sf), &out, err, sizeof err), 0);
    const char *want = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                       "p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    CHECK(buf_is(&out, want, strlen(want)));
    CHECK_INT(
        moat_pgw_scram_verify(&s, moat_slice_str("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
                              err, sizeof err),
        0);
    CHECK_INT(
        moat_pgw_scram_verify(&s, moat_slice_str("v=7rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
                              err, sizeof err),
        MOAT_EPERM);
    CHECK(strstr(err, "did not prove") != NULL);
    CHECK_INT(moat_pgw_scram_verify(&s, moat_slice_str("e=invalid-proof"), err, sizeof err),
              MOAT_EPERM);
    CHECK(strstr(err, "invalid-proof") != NULL);
    moat_pgw_scram_clear(&s);

    /* A nonce that does not extend ours, iterations out of range, bad base64. */
    const char *bad[] = {"r=other,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
                         "r=abcX,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0",
                         "r=abcX,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=99999999",
                         "r=abcX,s=!!!,i=4096",
                         "r=abcX,i=4096",
                         ""};
    for (size_t i = 0; i < MOAT_ARRAY_LEN(bad); i++) {
        moat_buf_reset(&out);
        CHECK_INT(moat_pgw_scram_first(&s, "abc", NULL, 0, 0, &out), 0);
        moat_buf_reset(&out);
        CHECK_INT(moat_pgw_scram_final(&s, "pw", moat_slice_str(bad[i]), &out, err, sizeof err),
                  MOAT_EPARSE);
        moat_pgw_scram_clear(&s);
    }

    /* With channel binding the GS2 header names it and c= carries the certificate hash. */
    moat_buf_reset(&out);
    CHECK_INT(moat_pgw_scram_first(&s, "abc", "\x01\x02", 2, 1, &out), 0);
    CHECK(buf_is(&out, "p=tls-server-end-point,,n=,r=abc", 32));
    moat_buf_reset(&out);
    CHECK_INT(moat_pgw_scram_final(&s, "pw", moat_slice_str("r=abcdef,s=QUJD,i=1"), &out, err,
                                   sizeof err),
              0);
    /* base64("p=tls-server-end-point,,\x01\x02") */
    CHECK(moat_buf_size(&out) > 40 &&
          memcmp(moat_buf_data(&out), "c=cD10bHMtc2VydmVyLWVuZC1wb2ludCwsAQI=,r=abcdef,p=", 50) ==
              0);
    moat_pgw_scram_clear(&s);

    /* Over TLS without the offer: "y", and c= carries just that header. */
    moat_buf_reset(&out);
    CHECK_INT(moat_pgw_scram_first(&s, "abc", NULL, 0, 1, &out), 0);
    CHECK(buf_is(&out, "y,,n=,r=abc", 11));
    moat_buf_reset(&out);
    CHECK_INT(moat_pgw_scram_final(&s, "pw", moat_slice_str("r=abcdef,s=QUJD,i=1"), &out, err,
                                   sizeof err),
              0);
    CHECK(moat_buf_size(&out) > 10 && memcmp(moat_buf_data(&out), "c=eSws,r=abcdef,p=", 18) == 0);
    moat_pgw_scram_clear(&s);
    moat_buf_free(&out);
}

int main(void)
{
    test_encode();
    test_decode();
    test_scram();
    return test_summary("pgwire");
}
