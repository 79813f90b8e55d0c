"""The tour's small web server: stdlib ``http.server`` writing a Common Log Format access log.

``python3 -m http.server`` logs to stderr in a format of its own, which no access-log reader
parses; corral's traffic view reads Common/Combined Log Format lines from a tailed file (source
``access``), as nginx or Apache write them. So the tour runs a few lines of stdlib Python that
serve the instance's own disk and append one CLF line per request to ``access.log`` there: the
log moves with the disk (migration, shelving) and corral tails it wherever it runs.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import urllib.error
import urllib.request

ACCESS_LOG = "access.log"

SERVER = """\
import http.server, os, sys, time
port, bind = int(sys.argv[1]), sys.argv[2]
if not os.path.exists('index.html'):
    with open('index.html', 'w') as f:
        f.write('<h1>hello from corral</h1>\\n')
if not os.path.exists('blob.bin'):
    with open('blob.bin', 'wb') as f:
        f.write(os.urandom(256 * 1024))

class H(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def log_request(self, code='-', size='-'):
        t = time.strftime('%d/%b/%Y:%H:%M:%S +0000', time.gmtime())
        code = getattr(code, 'value', code)
        with open('access.log', 'a') as f:
            f.write(f'{self.client_address[0]} - - [{t}] "{self.requestline}" {code} {size}\\n')

http.server.ThreadingHTTPServer.allow_reuse_address = True
server = http.server.ThreadingHTTPServer((bind, port), H)
print(f'serving {os.getcwd()} on {bind}:{port}', flush=True)
server.serve_forever()
"""


def command(port: int, bind: str = "127.0.0.1") -> list[str]:
    """The workload's argv: this very interpreter (stdlib only), whatever PATH holds. ``bind``:
    loopback on a local fleet; all addresses in a ``--netns`` fleet, where a host's loopback is
    its namespace's own and the tour reaches the server at its host's bridge address."""
    return [sys.executable, "-c", SERVER, str(port), bind]


def free_port() -> int:
    """A port free on loopback now; the server binds it again wherever it runs (every host of a
    local fleet shares loopback, and only one copy runs at a time)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(address: str, port: int, path: str, timeout: float = 2.0) -> int | None:
    """The status of ``GET path`` (a 404 included), None when nothing answered."""
    try:
        with urllib.request.urlopen(f"http://{address}:{port}{path}", timeout=timeout) as r:
            r.read()
            return int(r.status)
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(OSError):
            exc.read()
        return int(exc.code)
    except OSError:
        return None
