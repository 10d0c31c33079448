/* DNS messages for ACME DNS-01 (acme/dnsmsg.c), sans-I/O: build queries (RFC 1035) and dynamic
 * updates (RFC 2136), parse answers, sign and verify them with TSIG HMAC-SHA256 (RFC 8945),
 * and read a TSIG key file in the format tsig-keygen writes. Nothing here touches a socket,
 * the clock or the disk: the caller (server/dns01.c) sends the bytes, passes the time in and
 * reads the key file.
 *
 * Hand-written rather than libldns or c-ares: moat needs one query shape, one update shape and
 * one TSIG algorithm; a few hundred lines here are easier to fuzz than a new dependency, and
 * c-ares does neither UPDATE nor TSIG. Names are handled as presentation text without escapes
 * (host names and _acme-challenge labels); a label in a received message that holds a dot, a
 * backslash or a byte outside printable ASCII is shown as \DDD. */
#ifndef MOAT_DNSMSG_H
#define MOAT_DNSMSG_H

#include <stddef.h>
#include <stdint.h>

#define MOAT_DNS_MAX_MSG  65535
#define MOAT_DNS_UDP_MAX  1232 /* what we accept over UDP before asking for TCP (EDNS-less) */
#define MOAT_DNS_NAME_MAX 256  /* presentation text of a name, NUL included */
#define MOAT_DNS_MAX_RR   48   /* records kept by the parser; more is an error */

enum {
    MOAT_DNS_A = 1,
    MOAT_DNS_NS = 2,
    MOAT_DNS_CNAME = 5,
    MOAT_DNS_SOA = 6,
    MOAT_DNS_TXT = 16,
    MOAT_DNS_AAAA = 28,
    MOAT_DNS_TSIG = 250,
};
enum { MOAT_DNS_IN = 1, MOAT_DNS_CLASS_NONE = 254, MOAT_DNS_CLASS_ANY = 255 };
enum { MOAT_DNS_OP_QUERY = 0, MOAT_DNS_OP_UPDATE = 5 };
/* Response codes, and the TSIG error codes (RFC 8945 §5.3.2) in the same space. */
enum {
    MOAT_DNS_NOERROR = 0,
    MOAT_DNS_FORMERR = 1,
    MOAT_DNS_SERVFAIL = 2,
    MOAT_DNS_NXDOMAIN = 3,
    MOAT_DNS_NOTIMP = 4,
    MOAT_DNS_REFUSED = 5,
    MOAT_DNS_NOTAUTH = 9,
    MOAT_DNS_NOTZONE = 10,
    MOAT_DNS_BADSIG = 16,
    MOAT_DNS_BADKEY = 17,
    MOAT_DNS_BADTIME = 18,
};
enum { MOAT_DNS_ANSWER = 1, MOAT_DNS_AUTHORITY = 2, MOAT_DNS_ADDITIONAL = 3 };

/* "NOERROR", "NOTAUTH", "BADSIG", ... or "RCODE<n>". Static. */
const char *moat_dns_rcode_name(int rcode);

/* --- TSIG keys --------------------------------------------------------------------------- */

typedef struct {
    char name[MOAT_DNS_NAME_MAX]; /* lower case, no trailing dot */
    uint8_t secret[128];
    size_t secret_len;
} moat_dns_tsig_key_t;

/* Parse a key file as tsig-keygen writes it:
 *     key "NAME" { algorithm hmac-sha256; secret "BASE64"; };
 * (comments # // and C style allowed). Only hmac-sha256. 0, or MOAT_EPARSE with a sentence in
 * err that never contains the secret. The caller wipes k when done. */
int moat_dns_tsig_key_parse(const char *text, size_t len, moat_dns_tsig_key_t *k, char *err,
                            size_t errlen);

/* --- building ----------------------------------------------------------------------------- */

/* A query with RD set for (name, qtype) class IN. Returns its length, or MOAT_EINVAL when the
 * name is not a valid name or does not fit in cap. */
int moat_dns_build_query(uint8_t *out, size_t cap, uint16_t id, const char *name, uint16_t qtype);
/* An UPDATE for zone that adds (add=1: class IN, ttl) or deletes (add=0: class NONE, ttl 0, the
 * one value only, RFC 2136 §2.5.4) the TXT record name = txt (at most 255 bytes). No
 * prerequisites. Returns its length or MOAT_EINVAL. */
int moat_dns_build_update(uint8_t *out, size_t cap, uint16_t id, const char *zone, const char *name,
                          uint32_t ttl, const char *txt, int add);

/* Sign msg[0..len) in place: the TSIG record (hmac-sha256, fudge 300 s, time `now`) is appended
 * and ARCOUNT incremented. Returns the new length, or MOAT_EINVAL when cap is too small. The
 * MAC is copied to mac (the response's verification needs it). */
int moat_dns_tsig_sign(uint8_t *msg, size_t len, size_t cap, const moat_dns_tsig_key_t *k,
                       uint64_t now, uint8_t mac[32]);

/* --- parsing ------------------------------------------------------------------------------ */

typedef struct {
    char name[MOAT_DNS_NAME_MAX];
    uint16_t type, cls;
    uint32_t ttl;
    uint16_t rdoff, rdlen; /* the rdata in the message */
    uint8_t section;       /* MOAT_DNS_ANSWER ... */
    uint16_t start;        /* where the record starts (TSIG verification) */
} moat_dns_rr_t;

typedef struct {
    const uint8_t *msg; /* borrowed: the parsed bytes */
    size_t len;
    uint16_t id;
    int qr, opcode, aa, tc, rcode;
    uint16_t qdcount, ancount, nscount, arcount;
    char qname[MOAT_DNS_NAME_MAX];
    uint16_t qtype;
    moat_dns_rr_t rr[MOAT_DNS_MAX_RR];
    size_t nrr;
} moat_dns_msg_t;

/* Parse a whole message (header, at most one question, every record). 0 or MOAT_EPARSE; m keeps
 * a pointer to msg. */
int moat_dns_parse(const uint8_t *msg, size_t len, moat_dns_msg_t *m);
/* The rdata of rr as a name (NS, CNAME, and SOA's MNAME). 0 or MOAT_EPARSE. */
int moat_dns_rr_name(const moat_dns_msg_t *m, const moat_dns_rr_t *rr, char *out, size_t cap);
/* A TXT record's character-strings joined. Returns the length or MOAT_EPARSE (also when it does
 * not fit in cap with its NUL). */
int moat_dns_rr_txt(const moat_dns_msg_t *m, const moat_dns_rr_t *rr, char *out, size_t cap);
/* 1 when a and b are the same name (ASCII case, a trailing dot ignored). */
int moat_dns_name_eq(const char *a, const char *b);

/* Verify the TSIG record that ends a response to a request signed with req_mac (NULL: m is a
 * request itself, as a server would check it; tests use it). 0 when the MAC
 * and time are right; MOAT_ENOT_FOUND when the response is not signed; MOAT_ECRYPTO when the
 * MAC, key or time is wrong. *tsig_error gets the TSIG error field (BADSIG, BADKEY, BADTIME:
 * the server refused our signature; such answers carry no MAC to check) or 0. */
int moat_dns_tsig_verify(const moat_dns_msg_t *m, const moat_dns_tsig_key_t *k,
                         const uint8_t req_mac[32], uint64_t now, int *tsig_error);

#endif
