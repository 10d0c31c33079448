#!/bin/sh
# Container entrypoint. `exec` makes moat PID 1, so `docker stop` (SIGTERM) reaches it
# directly and an idle moat stops at once.
#   IMAGE                                  site from $MOAT_SITE, else /etc/moat/Moatfile
#   IMAGE chat.example.com app:8080 ...    site from the arguments
#   IMAGE health | validate | version ...  any moat command
#   MOAT_METRICS=0.0.0.0:9180              also serve Prometheus metrics there (--metrics)
set -e
case "${1:-}" in
run | validate | reload | stop | health | status | renew | ca-root | certs | version | help | --help | -h)
    exec moat "$@"
    ;;
esac
# MOAT_SITE is used when no site is given: no arguments, or options only.
if [ -n "${MOAT_SITE:-}" ] && { [ "$#" -eq 0 ] || [ "${1#--}" != "$1" ]; }; then
    # MOAT_SITE is one site line: splitting it on blanks is the point (globbing is not).
    set -f
    # shellcheck disable=SC2086
    set -- $MOAT_SITE "$@"
    set +f
fi
if [ -n "${MOAT_HTTP_PORT:-}" ]; then set -- "$@" --http-port "$MOAT_HTTP_PORT"; fi
if [ -n "${MOAT_HTTPS_PORT:-}" ]; then set -- "$@" --https-port "$MOAT_HTTPS_PORT"; fi
if [ -n "${MOAT_LISTEN:-}" ]; then set -- "$@" --listen "$MOAT_LISTEN"; fi
if [ -n "${MOAT_METRICS:-}" ]; then set -- "$@" --metrics "$MOAT_METRICS"; fi
exec moat run "$@"
