/* Unit tests for acme/dnsmsg.c: queries and updates on the wire, the parser's bounds (pointer
 * loops, forward pointers, truncation), TXT and name rdata, TSIG signing against a message
 * nsupdate (BIND 9) signed, and tsig-keygen key files. */
#include "moat/common.h"
#include "moat/dnsmsg.h"
#include "test.h"

#include <stdlib.h>

static size_t unhex(const char *h, uint8_t *out)
{
    size_t n = 0;
    for (; h[0] && h[1]; h += 2)
        out[n++] = (uint8_t)strtoul((char[]){h[0], h[1], 0}, NULL, 16);
    return n;
}

static const char key_file[] = "key \"moat-test\" {\n"
                               "\talgorithm hmac-sha256;\n"
                               "\tsecret \"c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=\";\n"
                               "};\n";

static void load_key(moat_dns_tsig_key_t *k)
{
    char err[256];
    CHECK_INT(moat_dns_tsig_key_parse(key_file, sizeof key_file - 1, k, err, sizeof err), 0);
}

static void test_query(void)
{
    uint8_t b[512];
    int n = moat_dns_build_query(b, sizeof b, 0x1234, "_acme-challenge.Example.COM.", MOAT_DNS_TXT);
    CHECK_INT(n, 12 + 1 + 15 + 1 + 7 + 1 + 3 + 1 + 4);
    CHECK(memcmp(b, "\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00", 12) == 0);
    CHECK(memcmp(b + 12,
                 "\x0f_acme-challenge\x07"
                 "example\x03"
                 "com\x00\x00\x10\x00\x01",
                 30) == 0);
    moat_dns_msg_t m;
    CHECK_INT(moat_dns_parse(b, (size_t)n, &m), 0);
    CHECK_STR(m.qname, "_acme-challenge.example.com");
    CHECK_INT(m.qtype, MOAT_DNS_TXT);
    CHECK_INT(m.qr, 0);
    /* Bad names: empty label, label over 63, too small a buffer. */
    CHECK_INT(moat_dns_build_query(b, sizeof b, 1, "a..b", MOAT_DNS_A), MOAT_EINVAL);
    char big[80];
    memset(big, 'a', 64);
    big[64] = '\0';
    CHECK_INT(moat_dns_build_query(b, sizeof b, 1, big, MOAT_DNS_A), MOAT_EINVAL);
    CHECK_INT(moat_dns_build_query(b, 20, 1, "example.com", MOAT_DNS_A), MOAT_EINVAL);
    CHECK_INT(moat_dns_build_query(b, sizeof b, 1, "a b.com", MOAT_DNS_A), MOAT_EINVAL);
}

static void test_update_sign_verify(void)
{
    moat_dns_tsig_key_t k;
    load_key(&k);
    CHECK_STR(k.name, "moat-test");
    CHECK_INT(k.secret_len, 32);
    uint8_t b[1024], mac[32];
    int n = moat_dns_build_update(b, sizeof b, 7, "example.test", "_acme-challenge.example.test",
                                  60, "abc", 1);
    CHECK(n > 0);
    int s = moat_dns_tsig_sign(b, (size_t)n, sizeof b, &k, 1700000000, mac);
    CHECK(s > n);
    moat_dns_msg_t m;
    CHECK_INT(moat_dns_parse(b, (size_t)s, &m), 0);
    CHECK_INT(m.opcode, MOAT_DNS_OP_UPDATE);
    CHECK_INT(m.nscount, 1);
    CHECK_INT(m.arcount, 1);
    CHECK_STR(m.rr[0].name, "_acme-challenge.example.test");
    char txt[64];
    CHECK_INT(moat_dns_rr_txt(&m, &m.rr[0], txt, sizeof txt), 3);
    CHECK_STR(txt, "abc");
    int terr = -1;
    CHECK_INT(moat_dns_tsig_verify(&m, &k, NULL, 1700000100, &terr), 0);
    CHECK_INT(terr, 0);
    /* Outside the 300 s fudge: BADTIME. */
    CHECK_INT(moat_dns_tsig_verify(&m, &k, NULL, 1700000400, &terr), MOAT_ECRYPTO);
    CHECK_INT(terr, MOAT_DNS_BADTIME);
    /* Any changed byte before the TSIG record breaks the MAC. */
    b[14] ^= 1;
    CHECK_INT(moat_dns_parse(b, (size_t)s, &m), 0);
    CHECK_INT(moat_dns_tsig_verify(&m, &k, NULL, 1700000000, &terr), MOAT_ECRYPTO);
    b[14] ^= 1;
    /* Another secret: refused. */
    moat_dns_tsig_key_t k2 = k;
    k2.secret[0] ^= 1;
    CHECK_INT(moat_dns_parse(b, (size_t)s, &m), 0);
    CHECK_INT(moat_dns_tsig_verify(&m, &k2, NULL, 1700000000, &terr), MOAT_ECRYPTO);
    /* Unsigned: not found. */
    n = moat_dns_build_update(b, sizeof b, 7, "example.test", "_acme-challenge.example.test", 60,
                              "abc", 1);
    CHECK_INT(moat_dns_parse(b, (size_t)n, &m), 0);
    CHECK_INT(moat_dns_tsig_verify(&m, &k, NULL, 1700000000, &terr), MOAT_ENOT_FOUND);
    /* Delete form: class NONE, TTL 0. */
    n = moat_dns_build_update(b, sizeof b, 8, "example.test", "_acme-challenge.example.test", 60,
                              "abc", 0);
    CHECK_INT(moat_dns_parse(b, (size_t)n, &m), 0);
    CHECK_INT(m.rr[0].cls, MOAT_DNS_CLASS_NONE);
    CHECK_INT(m.rr[0].ttl, 0);
}

/* What `nsupdate -y hmac-sha256:moat-test:<the secret above>` sent for "update add
 * _acme-challenge.example.test 60 TXT abc" (captured from the socket): BIND's own signature,
 * with name compression, must verify here. */
static void test_nsupdate_vector(void)
{
    static const char hex[] =
        "5c2528000001000000010001076578616d706c65047465737400000600010f5f61636d652d6368616c6c"
        "656e6765c00c001000010000003c000403616263096d6f61742d746573740000fa00ff00000000003d0b"
        "686d61632d7368613235360000006b151d1b012c0020daa9632ee7443c0544cd475eb70c64eb6a64a389"
        "aaf87eb40275970ca5f7e0c05c2500000000";
    uint8_t b[512];
    size_t n = unhex(hex, b);
    moat_dns_tsig_key_t k;
    load_key(&k);
    moat_dns_msg_t m;
    CHECK_INT(moat_dns_parse(b, n, &m), 0);
    CHECK_STR(m.rr[0].name, "_acme-challenge.example.test");
    int terr = -1;
    CHECK_INT(moat_dns_tsig_verify(&m, &k, NULL, 0x6b151d1b, &terr), 0);
    /* Our own signature of the same message (same id and time) equals BIND's. */
    uint8_t mine[512], mac[32];
    size_t unsigned_len = m.rr[1].start;
    memcpy(mine, b, unsigned_len);
    mine[11] = 0; /* ARCOUNT back to 0 */
    int s = moat_dns_tsig_sign(mine, unsigned_len, sizeof mine, &k, 0x6b151d1b, mac);
    CHECK(s > 0);
    CHECK(memcmp(mac, b + m.rr[1].rdoff + 13 + 10, 32) == 0);
}

static void test_parse_bounds(void)
{
    moat_dns_msg_t m;
    uint8_t b[512];
    /* A response: question + SOA in authority, names compressed. */
    size_t o = 0;
    memcpy(b, "\xab\xcd\x81\x80\x00\x01\x00\x00\x00\x01\x00\x00", 12);
    o = 12;
    memcpy(b + o,
           "\x03www\x07"
           "example\x04test\x00\x00\x01\x00\x01",
           22);
    o += 22;
    /* owner: pointer to "example.test" at 16 */
    memcpy(b + o, "\xc0\x10\x00\x06\x00\x01\x00\x00\x0e\x10", 10);
    o += 10;
    size_t rdlen_at = o;
    o += 2;
    size_t rd = o;
    memcpy(b + o, "\x03ns1\xc0\x10\xc0\x10", 8);
    o += 8;
    memset(b + o, 0, 20);
    o += 20;
    b[rdlen_at] = 0;
    b[rdlen_at + 1] = (uint8_t)(o - rd);
    CHECK_INT(moat_dns_parse(b, o, &m), 0);
    CHECK_INT(m.rcode, 0);
    CHECK_INT(m.nrr, 1);
    CHECK_STR(m.rr[0].name, "example.test");
    CHECK_INT(m.rr[0].section, MOAT_DNS_AUTHORITY);
    char name[MOAT_DNS_NAME_MAX];
    CHECK_INT(moat_dns_rr_name(&m, &m.rr[0], name, sizeof name), 0);
    CHECK_STR(name, "ns1.example.test");
    /* Truncated anywhere: an error, never a read past the end. */
    for (size_t cut = 0; cut < o; cut++)
        CHECK(moat_dns_parse(b, cut, &m) != 0);
    /* Trailing garbage. */
    CHECK(moat_dns_parse(b, o + 1, &m) != 0);
    /* A pointer to itself, and a forward pointer. */
    b[34] = 0xc0;
    b[35] = 34;
    CHECK(moat_dns_parse(b, o, &m) != 0);
    b[35] = 40;
    CHECK(moat_dns_parse(b, o, &m) != 0);
    /* Unusual bytes in a label come out escaped. */
    static const uint8_t odd[] = {0, 1, 0x81, 0x80, 0,    1, 0, 0, 0, 0, 0,
                                  0, 3, 'a',  '.',  0xff, 0, 0, 1, 0, 1};
    CHECK_INT(moat_dns_parse(odd, sizeof odd, &m), 0);
    CHECK_STR(m.qname, "a\\046\\255");
    CHECK(moat_dns_name_eq("Example.COM.", "example.com"));
    CHECK(!moat_dns_name_eq("example.com", "example.co"));
    CHECK_STR(moat_dns_rcode_name(9), "NOTAUTH");
    CHECK_STR(moat_dns_rcode_name(17), "BADKEY");
    CHECK_STR(moat_dns_rcode_name(42), "RCODE42");
}

static void test_key_files(void)
{
    moat_dns_tsig_key_t k;
    char err[256];
    static const char with_comments[] = "# made by tsig-keygen\n/* c */ key moat-test. {\n"
                                        "  secret \"c2VjcmV0\"; // x\n  algorithm HMAC-SHA256;\n};";
    CHECK_INT(moat_dns_tsig_key_parse(with_comments, sizeof with_comments - 1, &k, err, sizeof err),
              0);
    CHECK_STR(k.name, "moat-test");
    CHECK_INT(k.secret_len, 6);
    static const char sha512[] = "key \"x\" { algorithm hmac-sha512; secret \"c2VjcmV0\"; };";
    CHECK_INT(moat_dns_tsig_key_parse(sha512, sizeof sha512 - 1, &k, err, sizeof err), MOAT_EPARSE);
    CHECK(strstr(err, "tsig-keygen -a hmac-sha256") != NULL);
    CHECK(strstr(err, "c2VjcmV0") == NULL);
    static const char nosecret[] = "key \"x\" { algorithm hmac-sha256; };";
    CHECK_INT(moat_dns_tsig_key_parse(nosecret, sizeof nosecret - 1, &k, err, sizeof err),
              MOAT_EPARSE);
    static const char badb64[] = "key \"x\" { algorithm hmac-sha256; secret \"!!not base64\"; };";
    CHECK_INT(moat_dns_tsig_key_parse(badb64, sizeof badb64 - 1, &k, err, sizeof err), MOAT_EPARSE);
    CHECK(strstr(err, "not base64") == NULL);
    static const char unclosed[] = "key \"x\" { algorithm hmac-sha256; secret \"c2VjcmV0\";";
    CHECK_INT(moat_dns_tsig_key_parse(unclosed, sizeof unclosed - 1, &k, err, sizeof err),
              MOAT_EPARSE);
    CHECK_INT(moat_dns_tsig_key_parse("", 0, &k, err, sizeof err), MOAT_EPARSE);
}

int main(void)
{
    test_query();
    test_update_sign_verify();
    test_nsupdate_vector();
    test_parse_bounds();
    test_key_files();
    return test_summary("dnsmsg_test");
}
