/* The control socket's request parser and formatter (server/ctlproto.c). */
#include "ctlproto.h"
#include "moat/common.h"
#include "test.h"

#include <stdlib.h>

static int parse(const char *s, moat_ctl_req_t *r, char *err)
{
    return moat_ctl_parse(s, strlen(s), r, err, 200);
}

static void test_commands(void)
{
    moat_ctl_req_t r;
    char err[200];
    CHECK_INT(parse("{\"cmd\":\"reload\"}\n", &r, err), 0);
    CHECK_INT(r.cmd, MOAT_CTL_RELOAD);
    CHECK_INT(r.grace_s, -1);
    CHECK_INT(parse("{\"cmd\":\"stop\",\"grace\":7}", &r, err), 0);
    CHECK_INT(r.cmd, MOAT_CTL_STOP);
    CHECK_INT(r.grace_s, 7);
    CHECK_INT(parse("{\"cmd\":\"renew\",\"name\":\"a.example\",\"force\":true}", &r, err), 0);
    CHECK_STR(r.name, "a.example");
    CHECK_INT(r.force, 1);
    CHECK_INT(parse("{\"cmd\":\"status\",\"later\":{\"x\":1}}", &r, err), 0);
    CHECK_INT(r.cmd, MOAT_CTL_STATUS);
    CHECK_INT(parse("{\"cmd\":\"health\"}", &r, err), 0);
}

static void test_refused(void)
{
    moat_ctl_req_t r;
    char err[200];
    CHECK_INT(parse("", &r, err), MOAT_EPARSE);
    CHECK_INT(parse("{\"cmd\":\"frob\"}", &r, err), MOAT_EPARSE);
    CHECK(strstr(err, "unknown command") != NULL);
    CHECK_INT(parse("{\"cmd\":\"stop\",\"grace\":-1}", &r, err), MOAT_EPARSE);
    CHECK_INT(parse("{\"cmd\":\"stop\",\"grace\":3601}", &r, err), MOAT_EPARSE);
    CHECK_INT(parse("{\"cmd\":\"reload\",\"grace\":1}", &r, err), MOAT_EPARSE);
    CHECK_INT(parse("{\"cmd\":\"renew\",\"name\":\"a\\u0000b\"}", &r, err), MOAT_EPARSE);
    CHECK_INT(parse("{\"cmd\":\"renew\",\"force\":1}", &r, err), MOAT_EPARSE);
    CHECK_INT(parse("{\"cmd\":\"stop\",\"cmd\":\"reload\"}", &r, err), MOAT_EPARSE);
    CHECK_INT(parse("[\"stop\"]", &r, err), MOAT_EPARSE);
    CHECK_INT(parse("{\"cmd\":1}", &r, err), MOAT_EPARSE);
    /* Not NUL-terminated, and cut short: the parser stays inside len. */
    char *cut = moat_xstrndup("{\"cmd\":\"stop\"}", 10);
    CHECK_INT(moat_ctl_parse(cut, 10, &r, err, sizeof err), MOAT_EPARSE);
    free(cut);
    char big[MOAT_CTL_MAX_REQUEST + 2];
    memset(big, ' ', sizeof big);
    CHECK_INT(moat_ctl_parse(big, sizeof big, &r, err, sizeof err), MOAT_EPARSE);
}

static void test_round_trip(void)
{
    moat_ctl_req_t r = {.cmd = MOAT_CTL_RENEW, .grace_s = -1, .force = 1}, back;
    strcpy(r.name, "x.example");
    char *line = moat_ctl_format(&r), err[200];
    CHECK(line[strlen(line) - 1] == '\n');
    CHECK_INT(parse(line, &back, err), 0);
    CHECK(memcmp(&r, &back, sizeof r) == 0);
    free(line);
}

int main(void)
{
    test_commands();
    test_refused();
    test_round_trip();
    return test_summary("ctlproto_test");
}
