/* Reason phrases and the pages moat answers with itself (include/moat/http.h). */
#include "moat/http.h"

const moat_header_t moat_http_page_headers[MOAT_HTTP_PAGE_NHEADERS] = {
    {MOAT_SLICE_LIT("content-type"), MOAT_SLICE_LIT("text/html; charset=utf-8")},
    {MOAT_SLICE_LIT("cache-control"), MOAT_SLICE_LIT("no-store")},
};

const char *moat_http_reason(int status)
{
    switch (status) {
    case 100: return "Continue";
    case 101: return "Switching Protocols";
    case 200: return "OK";
    case 201: return "Created";
    case 202: return "Accepted";
    case 204: return "No Content";
    case 206: return "Partial Content";
    case 301: return "Moved Permanently";
    case 302: return "Found";
    case 303: return "See Other";
    case 304: return "Not Modified";
    case 307: return "Temporary Redirect";
    case 308: return "Permanent Redirect";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 403: return "Forbidden";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 409: return "Conflict";
    case 413: return "Content Too Large";
    case 414: return "URI Too Long";
    case 422: return "Unprocessable Content";
    case 429: return "Too Many Requests";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 501: return "Not Implemented";
    case 502: return "Bad Gateway";
    case 503: return "Service Unavailable";
    case 504: return "Gateway Timeout";
    case 505: return "HTTP Version Not Supported";
    default: return "Status";
    }
}

const char *moat_http_error_page(int status)
{
    switch (status) {
    case 400:
        return "<!doctype html><title>400 Bad Request</title><h1>400 Bad Request</h1>"
               "<p>The request was malformed and was not passed on.</p>\n";
    case 404:
        return "<!doctype html><title>404 Not Found</title><h1>404 Not Found</h1>"
               "<p>No site is configured for this host name.</p>\n";
    case 405:
        return "<!doctype html><title>405 Method Not Allowed</title><h1>405 Method Not "
               "Allowed</h1><p>moat does not pass TRACE requests on.</p>\n";
    case 413:
        return "<!doctype html><title>413 Content Too Large</title><h1>413 Content Too "
               "Large</h1><p>The request body is larger than this site accepts "
               "(max_body).</p>\n";
    case 414: return "<!doctype html><title>414 URI Too Long</title><h1>414 URI Too Long</h1>\n";
    case 431:
        return "<!doctype html><title>431 Request Header Fields Too Large</title>"
               "<h1>431 Request Header Fields Too Large</h1>\n";
    case 501:
        return "<!doctype html><title>501 Not Implemented</title><h1>501 Not "
               "Implemented</h1>\n";
    case 502:
        return "<!doctype html><title>502 Bad Gateway</title><h1>502 Bad Gateway</h1>"
               "<p>moat could not get an answer from the app behind this site. If it was "
               "just started it may still be starting: try again in a few seconds.</p>\n";
    case 503:
        return "<!doctype html><title>503 Service Unavailable</title><h1>503 Service "
               "Unavailable</h1><p>moat is shutting down.</p>\n";
    case 504:
        return "<!doctype html><title>504 Gateway Timeout</title><h1>504 Gateway Timeout</h1>"
               "<p>The app behind this site stopped answering (read_timeout).</p>\n";
    case 505:
        return "<!doctype html><title>505 HTTP Version Not Supported</title>"
               "<h1>505 HTTP Version Not Supported</h1>\n";
    default: return "";
    }
}

/* Kept small and dependency-free: it runs while the app is away. A fetch of the same URL waits
 * inside moat for up to upstream_wait; any answer but 502/503/504 means the app is back, and
 * a reload shows its page under the URL the visitor asked for. Without JavaScript the meta
 * refresh asks again every 5 s. */
const char *moat_http_retry_page(void)
{
    return "<!doctype html><html><head><meta charset=\"utf-8\"><title>Restarting</title>"
           "<noscript><meta http-equiv=\"refresh\" content=\"5\"></noscript></head><body>"
           "<h1>The app is restarting</h1><p>This page loads by itself as soon as it answers."
           "</p><p id=\"moat-retry\"></p><script>(function(){var d=1000;"
           "function ask(){fetch(location.href,{cache:\"no-store\",credentials:\"same-origin\"})"
           ".then(function(r){if([502,503,504].indexOf(r.status)<0)location.reload();"
           "else later();},later);}"
           "function later(){document.getElementById(\"moat-retry\").textContent="
           "\"Trying again in \"+Math.round(d/1000)+\" s\";setTimeout(ask,d);"
           "d=Math.min(d*2,30000);}later();})();</script></body></html>\n";
}

const char *moat_http_busy_page(void)
{
    return "<!doctype html><title>503 Service Unavailable</title><h1>503 Service "
           "Unavailable</h1><p>The app behind this site is restarting and too many requests "
           "are already waiting for it. Try again in a few seconds.</p>\n";
}
