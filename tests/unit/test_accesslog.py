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


def test_the_quick_refusal_never_refuses_a_line_the_parser_takes() -> None:
    """A line is passed over for a format whose end it lacks: check, on lines around every
    field of those ends, that each one passed over is also one the parser itself refuses."""
    import apachelogs

    from corral.telemetry.accesslog import _PARSERS, _could_match

    head = '203.0.113.7 - frank [10/Oct/2000:13:55:36 -0700] "GET /a HTTP/1.1"'
    ends = [" 200 2326", " 200 -", " - -", " 200 0", " 200 -5", " 200 007", " 20 1",
            " 2000 1", " 200 1 ", " 200 1x", "  200 1", " 200  1", " 200", " -",
            ' 200 1 "-" "Mozilla/4.08"', ' 200 1 "-" "UA" rt=0.003', ' 200 1 "r" "u"\r',
            ' 200 1 "r" "u\\""', ' 200 1 "r" "u" "x"', ' 200 1 "r"', ' 200 1 "r" "u',
            ' 200 1 "a b" "c \\"d\\""', " 200 1 seq=5", " 200 ts=1.5 seq=5"]
    checked = 0
    for end in ends:
        line = head + end
        for parser in _PARSERS:
            if _could_match(parser, line):
                continue
            checked += 1
            try:
                parser.parse(line)
            except (apachelogs.InvalidEntryError, ValueError):
                continue
            raise AssertionError(f"passed over a line {parser.format!r} parses: {line!r}")
    assert checked > len(ends)  # most ends fit one format at most
    r = AccessLogReader()
    assert r.parse(head + ' 200 1 "-" "UA" rt=0.003') is None  # a field appended: not CLF
    assert r.parse(head + " 200 -") is not None and r.parse(head + ' 200 1 "-" "UA"')
    assert (r.good, r.bad) == (2, 1)
