/* HTTP/2 connections: not yet (part 3). ALPN offers only http/1.1 until this file does the
 * real work, so moat_h2conn_new is never reached. */
#include "moat/h2conn.h"
#include "moat/common.h"

void moat_h2conn_init_alpn(void)
{
}

moat_h2conn_t *moat_h2conn_new(moat_worker_t *w, moat_sock_t *sock, const struct sockaddr *peer,
                               int port, const moat_h2conn_owner_t *owner, void *owner_data)
{
    (void)w, (void)sock, (void)peer, (void)port, (void)owner, (void)owner_data;
    return NULL;
}

void moat_h2conn_on_read(moat_h2conn_t *h)
{
    (void)h;
}

void moat_h2conn_on_drain(moat_h2conn_t *h)
{
    (void)h;
}

void moat_h2conn_on_eof(moat_h2conn_t *h, int err)
{
    (void)h, (void)err;
}

void moat_h2conn_shutdown(moat_h2conn_t *h)
{
    (void)h;
}

void moat_h2conn_free(moat_h2conn_t *h)
{
    (void)h;
}
