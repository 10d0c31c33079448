/* Fuzz what DNS-01 reads from outside: DNS messages from servers (acme/dnsmsg.c's parser, the
 * name and TXT rdata readers, TSIG verification of a response) and TSIG key files.
 *
 * Format: the first byte picks the input kind; the rest is the input.
 *   byte & 1 == 0   a DNS message (as received over UDP or after TCP's length prefix)
 *   byte & 1 == 1   a key file (tsig-keygen format)
 *
 * Checked: the parser never reads past the message and keeps its counts consistent; every
 * record's rdata lies inside the message; a name read from rdata is NUL-terminated within its
 * buffer; a TSIG verification of random bytes never passes (the MAC is 32 random-looking bytes
 * under a fixed key: a pass would mean the checker ignores the MAC); a parsed key has a name
 * and a secret, and a rejected one leaves no secret behind. */
#include "moat/common.h"
#include "moat/dnsmsg.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static moat_dns_tsig_key_t fixed_key = {
    .name = "moat-test", .secret = "fuzz-secret", .secret_len = 11};

static void fuzz_message(const uint8_t *p, size_t n)
{
    moat_dns_msg_t *m = malloc(sizeof *m);
    if (m == NULL)
        return;
    if (moat_dns_parse(p, n, m) == 0) {
        if (m->nrr != (size_t)m->ancount + m->nscount + m->arcount)
            abort();
        for (size_t i = 0; i < m->nrr; i++) {
            const moat_dns_rr_t *rr = &m->rr[i];
            if ((size_t)rr->rdoff + rr->rdlen > n || strlen(rr->name) >= sizeof rr->name)
                abort();
            char out[MOAT_DNS_NAME_MAX];
            if (moat_dns_rr_name(m, rr, out, sizeof out) == 0 && strlen(out) >= sizeof out)
                abort();
            char txt[300];
            int tl = moat_dns_rr_txt(m, rr, txt, sizeof txt);
            if (tl >= 0 && (size_t)tl != strlen(txt) && memchr(txt, 0, (size_t)tl) == NULL)
                abort();
        }
        uint8_t mac[32];
        memset(mac, 0x5a, sizeof mac);
        int terr = 0;
        if (moat_dns_tsig_verify(m, &fixed_key, mac, 0, &terr) == 0 &&
            moat_dns_tsig_verify(m, &fixed_key, NULL, 0, &terr) == 0)
            abort();
    }
    free(m);
}

static void fuzz_key(const uint8_t *p, size_t n)
{
    moat_dns_tsig_key_t k;
    char err[256];
    int rc = moat_dns_tsig_key_parse((const char *)p, n, &k, err, sizeof err);
    if (rc == 0 && (k.name[0] == '\0' || k.secret_len == 0 || k.secret_len > sizeof k.secret))
        abort();
    if (rc != 0) {
        if (strlen(err) == 0 || k.secret_len != 0)
            abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    if (data[0] & 1)
        fuzz_key(data + 1, size - 1);
    else
        fuzz_message(data + 1, size - 1);
    return 0;
}
