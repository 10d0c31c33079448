/* The exchange as proxy.c and proxy_wait.c see it: server-internal, no other file includes
 * this. proxy.c runs an exchange's life and the response relay; proxy_wait.c keeps the
 * requests that wait for an app that is restarting (upstream_wait=). */
#ifndef MOAT_PROXY_INTERNAL_H
#define MOAT_PROXY_INTERNAL_H

#include "moat/proxy.h"
#include "upstream.h"
#include "worker.h"

/* Waiting for the app: the first dial again after WAIT_FIRST_MS (a connect to a name whose
 * app is away is also cut after it, so a waiting request learns of a move soon). */
#define WAIT_FIRST_MS 100

struct moat_exchange {
    moat_worker_t *w;
    int refs;
    const moat_front_ops_t *ops;
    void *front;
    const moat_runtime_t *rt;
    const moat_site_rt_t *site;
    const moat_upstream_t *upstream;
    moat_upstream_state_t *ustate;
    moat_upconn_t *up;
    moat_buf_t head; /* the upstream request head, kept for one retry until a response byte */
    moat_req_body_t req_body;
    moat_http1_body_t resp;
    int status;
    uint64_t t_start, t_first_byte;
    int tries;
    unsigned over : 1;     /* completed or aborted: no more calls to the front end */
    unsigned produced : 1; /* output given to the front end since its last flush */
    unsigned head_req : 1;
    unsigned upgrade_req : 1;
    unsigned tls : 1;
    unsigned hsts : 1;
    unsigned idempotent : 1;
    unsigned reused : 1;
    unsigned req_done : 1;
    unsigned resp_head_done : 1;
    unsigned resp_started : 1;
    unsigned resp_done : 1;
    unsigned up_keep_alive : 1;
    unsigned tunnel : 1;
    unsigned tunnel_client_eof : 1;
    unsigned tunnel_up_eof : 1;
    unsigned client_paused : 1;
    unsigned up_paused : 1;
    /* lb=cookie: the upstream the client's moat_upstream cookie names (-1: none), and
     * whether the response must (re)set that cookie (value kept here for send_head). */
    unsigned set_cookie : 1;
    int sticky;
    char cookie[96];
    /* Waiting for the app (see the top of the file). */
    moat_exchange_t *wnext, *wprev; /* the worker's waiting list */
    moat_exchange_t *dnext;         /* the timer's list of those due */
    moat_runtime_t *rt_held;        /* a newer runtime taken up while waiting (worker-local) */
    moat_buf_t pending;             /* request body kept while no upstream connection is up */
    uint64_t wait_until, retry_at;  /* loop times; retry_at UINT64_MAX while dialling */
    unsigned backoff_ms;
    int deferred;          /* a status to answer from the timer (found inside moat_proxy_start) */
    unsigned starting : 1; /* inside moat_proxy_start: nothing may complete */
    unsigned waited : 1;   /* has waited (wait_until is set) */
    unsigned waiting : 1;  /* on the worker's waiting list: from the first refusal until a
                              connection is up or the exchange ends */
    unsigned get_req : 1;
    unsigned html : 1;        /* a browser page load: GET with Accept: text/html */
    unsigned slow_mark : 1;   /* the connect timer is set to SLOW_DIAL_MS, connect_rest after */
    unsigned slow_kicked : 1; /* this dial has had its name looked up again */
    uint64_t connect_rest;    /* the connect timeout left after the slow-dial mark */
    /* Names the request in log lines (moat_request_t.context). */
    const char *(*context)(const void *ctx, char *buf, size_t n);
    const void *ctx;
};

/* proxy.c */
void moat__proxy_hold(moat_exchange_t *x);
/* Drop the reference an event (or the waiting timer) took; x may be freed on return. */
void moat__proxy_leave(moat_exchange_t *x);
/* Over: the front end's done(), the upstream connection released or closed. */
void moat__proxy_complete(moat_exchange_t *x, int err);
/* One of moat's own pages as the response (nothing from the app was sent). */
void moat__proxy_send_page(moat_exchange_t *x, int status, const char *body, const moat_header_t *h,
                           size_t n);
/* Pick an upstream and take a pooled connection or dial one: 0, or a negative code when
 * every upstream refused on the spot. */
int moat__proxy_connect(moat_exchange_t *x);
/* Stop reading the client's body (it stays with the client). */
void moat__proxy_pause_client(moat_exchange_t *x);
/* Keep what was written to a connection that never came up, for the next one: 0 or ENOMEM. */
int moat__proxy_keep_unsent(moat_exchange_t *x);
void moat__proxy_release_upstream(moat_exchange_t *x, int reusable);
/* "label (dialled ADDR)" for log lines. */
const char *moat__proxy_who(const moat_exchange_t *x, char *buf, size_t n);

/* proxy_wait.c */
/* Every upstream refused x: wait and dial again, or answer 502/503 (from the timer when
 * inside moat_proxy_start). */
void moat__proxy_wait_or_fail(moat_exchange_t *x, const char *why);
/* A first dial to a named upstream goes on the waiting list, not due: when the name moves
 * (moat_proxy_waiting_wake) it is dropped and dialled again at the new address. */
void moat__proxy_dial_link(moat_exchange_t *x);
/* Off the worker's waiting list (a connection came up, or the exchange ended). */
void moat__proxy_wait_unlink(moat_exchange_t *x);

#endif
