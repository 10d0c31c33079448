/* Fuzz the HTTP/2 session: arbitrary client bytes (after a valid preface, so the fuzzer
 * spends its time on frames) go into moat_h2_recv; every request is answered with a body so
 * the response path and flow control run too, and the session is asked to rest between
 * pieces so the rebuilt sessions meet the same frames. */
#include "moat/h2.h"

#include <stdint.h>
#include <stdlib.h>

typedef struct {
    moat_h2_t *h;
    int32_t ids[8];
    int n;
} fz_t;

static void *on_request(void *ud, int32_t id, const moat_h2_request_t *r)
{
    fz_t *f = ud;
    (void)r;
    if (f->n < 8)
        f->ids[f->n++] = id;
    return f;
}

static void on_data(void *ud, void *st, int32_t id, moat_slice_t d)
{
    fz_t *f = ud;
    (void)st;
    if (d.len & 1) /* hold some bytes back: exercises the unconsumed-window path */
        moat_h2_consume(f->h, id, d.len);
}

static void on_end(void *ud, void *st, int32_t id)
{
    (void)ud, (void)st, (void)id;
}

static void on_close(void *ud, void *st, int32_t id, uint32_t code)
{
    fz_t *f = ud;
    (void)st, (void)code;
    for (int i = 0; i < f->n; i++)
        if (f->ids[i] == id)
            f->ids[i] = 0;
}

static const moat_h2_cb_t cb = {on_request, on_data, on_end, on_close};

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char preface[] = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    fz_t f = {0};
    moat_h2_settings_t set = {.enable_connect_protocol = size & 1};
    f.h = moat_h2_new(&set, &cb, &f);
    if (f.h == NULL)
        return 0;
    moat_h2_recv(f.h, preface, sizeof preface - 1, 1);
    /* Feed in pieces whose sizes come from the input, so frame boundaries move. */
    size_t off = 0;
    uint64_t now = 1;
    while (off < size) {
        size_t piece = 1 + data[off] % 64;
        off++;
        piece = piece > size - off ? size - off : piece;
        if (moat_h2_recv(f.h, data + off, piece, now++) < 0)
            break;
        off += piece;
        for (int i = 0; i < f.n; i++) {
            if (f.ids[i] == 0)
                continue;
            moat_header_t h = {MOAT_SLICE_LIT("Content-Type"), MOAT_SLICE_LIT("text/plain")};
            if (moat_h2_respond(f.h, f.ids[i], 200, &h, 1, -1, 1) == 0) {
                moat_h2_send_data(f.h, f.ids[i], MOAT_SLICE_LIT("hello"));
                moat_h2_send_end(f.h, f.ids[i]);
            }
        }
        moat_slice_t out;
        while (moat_h2_send(f.h, &out) == 0 && out.len > 0) {
        }
        /* Pieces whose size byte has the top bit set are followed by a quiet moment: the
         * session rests when it can, and the next piece wakes it (session.c, "rest"). */
        if (data[off - piece - 1] & 0x80)
            moat_h2_rest(f.h);
    }
    moat_h2_free(f.h);
    return 0;
}
