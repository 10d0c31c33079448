/* Inside the site-file parser: the option value kinds (server/config_kinds.c) and what they
 * share with the grammar (server/config.c). An option row names its kind; a kind parses,
 * defaults, compares and prints one site field. Not a module contract: only these two files
 * include it. */
#ifndef MOAT_CONFIG_KINDS_H
#define MOAT_CONFIG_KINDS_H

#include "moat/config.h"

#include <stdint.h>
#include <stdio.h>

/* A slice of the current line with its 1-based column, for messages. */
typedef struct {
    const char *p;
    size_t len;
    int col;
} tok_t;

/* Text the user wrote, made safe to echo: control bytes escaped, long tokens cut. */
#define SHOW_MAX 80
typedef struct {
    char s[SHOW_MAX * 4 + 4];
} shown_t;

typedef struct pctx pctx_t; /* one parse (config.c) */

/* The line being parsed (1-based). */
int moat__cfg_line(const pctx_t *c);
/* An error at line:col of the file being parsed. */
void moat__cfg_err(pctx_t *c, int line, int col, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
const char *moat__cfg_show(shown_t *o, tok_t t);
int moat__cfg_tok_ieq(tok_t t, const char *lit);
/* The closest of names to t, for "did you mean", or NULL. */
const char *moat__cfg_suggest(tok_t t, const char *const *names, size_t n);
/* The next comma-separated item of t from *pos; 0 when there is none. */
int moat__cfg_next_item(tok_t t, size_t *pos, tok_t *item);

typedef struct opt_row opt_row_t;

typedef struct {
    /* Parse v into the row's field; reports its own errors. */
    void (*parse)(pctx_t *c, const opt_row_t *r, moat_site_t *s, tok_t v);
    void (*set_default)(const opt_row_t *r, moat_site_t *s);
    int (*is_default)(const opt_row_t *r, const moat_site_t *s);
    void (*print)(const opt_row_t *r, const moat_site_t *s, FILE *f);
} opt_kind_t;

typedef struct {
    const char *name;
    int value;
} enum_val_t;

struct opt_row {
    const char *name;
    const opt_kind_t *kind;
    size_t off;       /* the field in moat_site_t */
    size_t count_off; /* list kinds: its size_t count */
    int64_t def;
    uint64_t min, max;
    const enum_val_t *vals; /* enum kind, NULL-terminated */
    const char *expect;     /* "expected ..." in messages */
};

#define FIELD(s, r, type)  ((type *)((char *)(s) + (r)->off))
#define CFIELD(s, r, type) ((type const *)((const char *)(s) + (r)->off))

extern const opt_kind_t moat__cfg_kind_enum, moat__cfg_kind_duration, moat__cfg_kind_size,
    moat__cfg_kind_string, moat__cfg_kind_secret, moat__cfg_kind_email, moat__cfg_kind_urls,
    moat__cfg_kind_cidrs, moat__cfg_kind_tls;

#endif
