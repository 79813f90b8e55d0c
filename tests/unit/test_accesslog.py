from __future__ import annotations

from corral.telemetry.accesslog import AccessLogReader

COMBINED = (
    '203.0.113.7 - frank [10/Oct/2000:13:55:36 -0700] "GET /shop/cart?id=3 HTTP/1.1" 404 2326 '
    '"http://example.com/start.html" "Mozilla/4.08"'
)
COMMON = '198.51.100.2 - - [10/Oct/2000:20:55:37 +0000] "POST /login HTTP/1.0" 302 -'


def test_combined_and_common_lines_parse() -> None:
    r = AccessLogReader()
    a = r.parse(COMBINED)
    b = r.parse(COMMON)
    assert a is not None and b is not None
    assert (a.client, a.path, a.status) == ("203.0.113.7", "/shop/cart", 404)
    assert (b.client, b.path, b.status) == ("198.51.100.2", "/login", 302)
    assert b.ts - a.ts == 1.0  # 13:55:36 -0700 is 20:55:36 UTC
    assert (r.good, r.bad) == (2, 0)


def test_bad_lines_are_counted_not_fatal() -> None:
    r = AccessLogReader()
    for line in ["", "garbage", '1.2.3.4 - - [nope] "GET / HTTP/1.1" 200 1', COMMON]:
        r.parse(line)
    assert (r.good, r.bad) == (1, 3)
