/* Session-ticket keys shared by the instances on one store (server/tickets.c), so that a
 * client resumes its TLS session on whichever instance it reaches. Control thread. */
#ifndef MOAT_TICKETS_H
#define MOAT_TICKETS_H

#include "moat/storage.h"
#include "snapshot.h"

#include <stdint.h>

/* Whether keys are shared on this store: only on a shared store whose secrets are sealed
 * (--storage-key); ticket keys lying readable in a database would let whoever reads it
 * decrypt recorded resumptions. */
int moat_tickets_shared(const moat_storage_t *st);

/* Make the snapshot's ticket keys the store's for the current hour (now / 3600): the first
 * instance to reach a new hour rotates them there (a fresh key before the two newest), the
 * others adopt them. 0, or a negative code when the store did not answer (the caller keeps
 * its keys and rotates on its own if this lasts). Storage row: kv "tls-ticket-keys" =
 * "<hour> <base64 of the keys>". */
int moat_tickets_sync(moat_storage_t *st, moat_snapmgr_t *snap, int64_t now);

#endif
