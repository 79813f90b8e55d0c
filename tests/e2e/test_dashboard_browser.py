"""The dashboard in a real browser: Debian's headless Chromium driven by Selenium, against a
real local fleet (2 hosts, process driver).

Each page loads without a console error; a plot holds points from the server's metric
history; an action confirmed in the page changes the fleet (seen through the API); a change
made through the API shows in an open page without a reload (the SSE relay); the token of the
one-click URL leaves the address and the session cookie is HttpOnly; a read-only session sees
no action button and its forged POST is refused.

With ``CORRAL_SCREENSHOTS=DIR`` each page is also saved as ``DIR/<page>.png``
(``scripts/screenshots`` does that for ``docs/screenshots``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import ssl
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fleetkit import Fleet, fleet_for

from corral.rig.context import load_context

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(f"{CHROMIUM} (and {CHROMEDRIVER}) missing: apt-get install chromium "
                "chromium-driver (scripts/bootstrap does)", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import (  # noqa: E402
    NoSuchElementException,
    StaleElementReferenceException,
    TimeoutException,
)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

pytestmark = pytest.mark.timeout(900)
SHOTS = os.environ.get("CORRAL_SCREENSHOTS")
WAIT = 45.0
#: a small web server's access log, written by a shell loop (Common Log Format)
ACCESS = ('i=0; while [ $i -lt 100000 ]; do '
          'echo "10.9.0.$((i % 7)) - - [$(date -u +%d/%b/%Y:%H:%M:%S) +0000] '
          '\\"GET /shop/$((i % 4)) HTTP/1.1\\" $((200 + (i % 9 / 7) * 204)) 512 \\"-\\" \\"sh\\"" '
          '>> {log}; echo "served $i"; i=$((i+1)); sleep 0.4; done')


class Dash:
    """The fleet, its API and the browser."""

    def __init__(self, fleet: Fleet, driver: Any, ro_token: str, names: dict[str, str]) -> None:
        assert fleet.ctx is not None
        self.fleet = fleet
        self.url = fleet.ctx.url.split(",")[0]
        self.token = fleet.ctx.token
        self.verify = verify(fleet)
        self.driver = driver
        self.ro_token = ro_token
        self.names = names
        #: the one-click URL ``corral up`` printed
        self.link = ""

    def api(self, method: str, path: str, **kw: Any) -> Any:
        with httpx.Client(base_url=self.url, timeout=30, verify=self.verify,
                          headers={"Authorization": f"Bearer {self.token}"}) as c:
            r = c.request(method, path, **kw)
        assert r.status_code < 400, r.text
        return r.json() if r.content else None

    def login(self, token: str) -> None:
        # from a page that refreshes nothing: a page left open would see its session go and
        # send itself to the login form, racing the navigation below
        self.quiesce()
        self.driver.get(self.url + "/login")
        self.driver.delete_all_cookies()
        self.driver.get(f"{self.url}/?token={token}")
        self.until(lambda d: d.current_url == f"{self.url}/")

    def quiesce(self) -> None:
        """No htmx request in flight, and none to start: leaving a page in the middle of one
        makes htmx log the aborted request as an error, which would be counted against the
        next page."""
        if not self.driver.execute_script("return !!window.htmx"):
            return
        self.driver.execute_script(
            "document.body.addEventListener('htmx:beforeRequest', e => e.preventDefault())")
        self.until(lambda drv: drv.execute_script(
            "return document.querySelectorAll('.htmx-request').length === 0"),
            why="htmx to finish its requests")

    def open(self, path: str, ready: str) -> None:
        self.quiesce()
        self.driver.get(self.url + path)
        self.until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ready)))

    def until(self, cond: Callable[[Any], Any], timeout: float = WAIT, why: str = "") -> Any:
        try:
            return WebDriverWait(self.driver, timeout, poll_frequency=0.2, ignored_exceptions=(
                NoSuchElementException, StaleElementReferenceException)).until(cond)
        except TimeoutException:
            raise AssertionError(f"waited {timeout:.0f}s for {why or cond}; page at "
                                 f"{self.driver.current_url}:\n"
                                 f"{self.text()[:3000]}\n"
                                 f"console: {self.errors()}\n{self.fleet.logs()}") from None

    def click(self, selector: str) -> None:
        """Click the element ``selector`` names, found again if htmx swapped it meanwhile
        (the page refreshes its parts on every event)."""
        def clicked(drv: Any) -> bool:
            try:
                el = drv.find_element(By.CSS_SELECTOR, selector)
                # a button htmx just swapped in does nothing until htmx has processed it
                # (its hx- handlers attached): a click in between was lost (CI)
                if not drv.execute_script(
                        "const e = arguments[0];"
                        "return !e.getAttributeNames().some(n => n.startsWith('hx-'))"
                        " || !!(e['htmx-internal-data'] || {}).initHash;", el):
                    return False
                el.click()
                return True
            except (StaleElementReferenceException, NoSuchElementException):
                return False
        self.until(clicked, why=f"a click on {selector}")

    def text(self) -> str:
        try:
            return str(self.driver.find_element(By.TAG_NAME, "body").text)
        except Exception as exc:  # a page that is not there has no body: say why
            return f"(no text: {exc})"

    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.driver.get_log("browser") if e.get("level") == "SEVERE"]

    def shot(self, name: str, settle: float = 1.0, tallest: int = 2400) -> None:
        """The page as a picture, whole (the window grown to its height for the shot)."""
        if not SHOTS:
            return
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        time.sleep(settle)  # let the plots and the live parts draw (a picture, not a test)
        height = int(self.driver.execute_script(
            "return document.documentElement.scrollHeight"))
        self.driver.set_window_size(1280, min(max(height + 140, 600), tallest))
        time.sleep(0.3)
        self.driver.save_screenshot(str(Path(SHOTS) / f"{name}.png"))
        self.driver.set_window_size(1280, 1000)


def verify(fleet: Fleet) -> ssl.SSLContext | bool:
    assert fleet.ctx is not None
    return ssl.create_default_context(cafile=fleet.ctx.ca_file) if fleet.ctx.ca_file else True


def chromium(profile: Path) -> Any:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    opts = Options()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1000",
                 f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # the fleet's API is https with the fleet's own CA (loopback only): not the browser's
    opts.accept_insecure_certs = True
    return webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))


@pytest.fixture(scope="module")
def dash(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dash]:
    tag = uuid.uuid4().hex[:6]
    names = {"web": f"web-{tag}", "worker": f"worker-{tag}", "batch": f"batch-{tag}"}
    tmp = tmp_path_factory.mktemp("dash")
    with fleet_for(tmp / "fleet") as fleet:
        said = fleet.ok("up", "--data", str(fleet.tmp / "data"), "--hosts", "2", timeout=180)
        fleet.ctx = load_context(fleet.context_file)
        link = re.search(r"^dashboard: (\S+)$", said, re.MULTILINE)
        assert link is not None, f"corral up printed no dashboard link:\n{said}"
        log = tmp / "access.log"
        fleet.ok("run", names["web"], "--host", "host1", "--cpus", "0.5", "--memory", "128M",
                 "--tail", f"access={log}", "--", "sh", "-c", ACCESS.format(log=log))
        fleet.ok("run", names["worker"], "--host", "host1", "--", "sh", "-c",
                 "while :; do i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done; sleep 0.2; "
                 "done")
        fleet.ok("run", names["batch"], "--host", "host2", "--", "sleep", "3600")
        fleet.ok("standby", "add", names["web"], "--host", "host2", "--every", "30s",
                 timeout=300)
        fleet.ok("standby", "sync", names["web"], timeout=300)
        assert fleet.ctx is not None
        with httpx.Client(base_url=fleet.ctx.url.split(",")[0], timeout=30,
                          verify=verify(fleet),
                          headers={"Authorization": f"Bearer {fleet.ctx.token}"}) as c:
            r = c.post("/v1/tokens", json={"name": f"ro-{tag}", "role": "read-only"})
            assert r.status_code == 201, r.text
            ro = str(r.json()["token"])
        profile = Path(tempfile.mkdtemp(prefix="corral-chromium-"))
        driver = None
        try:
            driver = chromium(profile)
            d = Dash(fleet, driver, ro, names)
            d.link = link.group(1)
            wait_points(d, names["web"], 2)
            yield d
        finally:
            if driver is not None:
                driver.quit()
            shutil.rmtree(profile, ignore_errors=True)


def wait_points(d: Dash, name: str, n: int) -> None:
    """Until the server's history holds ``n`` CPU points of ``name`` (bounded)."""
    deadline = time.monotonic() + 120
    while True:
        got = d.api("GET", f"/v1/instances/{name}/metrics",
                    params={"since": int(time.time()) - 3600})
        points = [p for p in got["points"] if p["cpu_core_pct"] is not None]
        if len(points) >= n:
            return
        assert time.monotonic() < deadline, f"no {n} metric points for {name}: {got}"
        time.sleep(1.0)


def test_token_leaves_the_address_and_the_cookie_is_http_only(dash: Dash) -> None:
    d = dash
    d.driver.delete_all_cookies()
    d.open("/", "form input[name=token]")  # no session: the login form
    assert d.driver.current_url == f"{d.url}/login"
    d.shot("login", 0.2)
    assert d.link == f"{d.url}/?token={d.token}"
    d.driver.get(d.link)  # what a person clicks in the terminal
    d.until(lambda drv: drv.current_url == f"{d.url}/", why="the redirect to the clean URL")
    d.until(expected_conditions.presence_of_element_located((By.ID, "instances")))
    assert "token" not in d.driver.current_url
    cookie = d.driver.get_cookie("corral_session")
    assert cookie is not None and cookie["httpOnly"] is True
    assert cookie.get("sameSite") == "Strict"
    assert cookie.get("secure") is d.url.startswith("https://")
    assert "corral_session" not in d.driver.execute_script("return document.cookie")
    assert d.token not in d.driver.page_source


def test_each_page_loads_without_console_errors(dash: Dash) -> None:
    d = dash
    d.login(d.token)
    d.errors()  # reading the log empties it
    web = d.names["web"]
    pages = [("fleet", "/", f'tr[data-instance="{web}"]'),
             ("instance", f"/instances/{web}", "#cpu-plot .u-over"),
             ("host", "/hosts/host1", "#cpu-plot .u-over"),
             ("operations", "/ops", "#history"),
             ("events", "/events", "#events tbody tr")]
    for shot, path, ready in pages:
        d.open(path, ready)
        d.until(lambda drv: drv.execute_script(
            "return document.readyState === 'complete' && !!window.htmx && !!window.uPlot"))
        time.sleep(1.5)  # the fetches a page starts on load (plots, live stream) have answered
        if shot != "operations":  # its picture shows a running one (below)
            d.shot(shot, 8.0 if shot == "instance" else 1.0,
                   1200 if shot == "events" else 2400)
        assert d.errors() == [], f"console errors on {path}"


def test_a_plot_has_points(dash: Dash) -> None:
    d = dash
    d.login(d.token)
    d.open(f"/instances/{d.names['web']}", "#cpu-plot")
    n = d.until(lambda drv: drv.execute_script(
        "const u = window.corralPlots['cpu-plot'];"
        "return u && u.data[0].length >= 2 && u.data[1].some(v => v != null)"
        " ? u.data[0].length : false"), why="CPU points in the plot")
    assert n >= 2
    mem = d.until(lambda drv: drv.execute_script(
        "const u = window.corralPlots['mem-plot']; return u ? u.data[1] : false"),
        why="the memory plot")
    assert any(v is not None and v > 0 for v in mem)
    # the fleet page's sparkline is drawn from the same history
    d.open("/", f'[data-spark="{d.names["web"]}"]')
    d.until(lambda drv: drv.execute_script(
        "const e = document.querySelector('[data-spark=\"' + arguments[0] + '\"]');"
        "return !!(e && e._uplot && e._uplot.data[0].length >= 2)", d.names["web"]),
        why="a sparkline")


def test_an_action_confirmed_in_the_page_changes_the_fleet(dash: Dash) -> None:
    d = dash
    d.login(d.token)
    name = d.names["batch"]
    d.open(f"/instances/{name}", '#actions [data-action="stop"]')
    d.click('#actions [data-action="stop"]')
    alert = d.until(expected_conditions.alert_is_present(), why="the confirmation")
    assert name in alert.text
    alert.accept()
    d.until(lambda _: d.api("GET", f"/v1/instances/{name}")["state"] == "stopped",
            why=f"{name} stopped through the API")
    # the page says so, and offers to start it again; dismissing the confirmation does nothing
    d.until(expected_conditions.presence_of_element_located(
        (By.CSS_SELECTOR, '#actions [data-action="start"]')))
    assert "stop" in d.driver.find_element(By.ID, "flash").text
    d.click('#actions [data-action="start"]')
    d.until(expected_conditions.alert_is_present()).dismiss()
    time.sleep(1.0)
    assert d.api("GET", f"/v1/instances/{name}")["state"] == "stopped"
    d.click('#actions [data-action="start"]')
    d.until(expected_conditions.alert_is_present()).accept()
    d.until(lambda _: d.api("GET", f"/v1/instances/{name}")["state"] == "running",
            why=f"{name} running again")
    assert d.errors() == []


def test_a_running_operation_shows_its_progress_live(dash: Dash) -> None:
    d = dash
    d.login(d.token)
    name = d.names["worker"]
    assert d.fleet.ctx is not None and d.fleet.ctx.data_dir
    drills = Path(d.fleet.ctx.data_dir) / "server" / "drills"
    drills.mkdir(exist_ok=True)
    hold = drills / "migrate.adopt.before"  # the engine waits there while it exists
    reached = hold.with_name(hold.name + ".reached")
    reached.unlink(missing_ok=True)
    hold.write_text("")
    try:
        d.open(f"/instances/{name}", 'form[data-action="migrate"] select')
        Select(d.driver.find_element(By.CSS_SELECTOR, 'form[data-action="migrate"] select')
               ).select_by_visible_text("host2")
        d.click('form[data-action="migrate"] button')
        d.until(expected_conditions.alert_is_present()).accept()
        d.until(lambda _: reached.exists(), why="the migration to reach its adopt step")
        op = reached.read_text().strip()
        d.open("/ops", f"#op-{op}.running")
        # read at once in the page: htmx may swap the list between two reads from here
        shown = d.driver.execute_script(
            "const e = document.getElementById(arguments[0]);"
            "return [e.textContent, parseFloat(e.querySelector('.bar > span').style.width),"
            " e.querySelectorAll('li.st-done').length]", f"op-{op}")
        assert "migrate" in shown[0] and name in shown[0]
        assert 0 < shown[1] < 100 and shown[2] >= 2  # plan, prepare, copy... done
        d.driver.execute_script("window.__notReloaded = true")
        d.shot("operations")
    finally:
        hold.unlink(missing_ok=True)
    d.until(lambda drv: drv.find_elements(By.CSS_SELECTOR, f"#history #op-{op}")
            and "succeeded" in drv.find_element(By.CSS_SELECTOR, f"#history #op-{op}").text,
            why="the migration in the history")
    assert d.driver.execute_script("return window.__notReloaded === true")
    assert d.api("GET", f"/v1/instances/{name}")["host"] == "host2"
    assert d.errors() == []


def test_a_change_through_the_api_shows_without_a_reload(dash: Dash) -> None:
    d = dash
    d.login(d.token)
    name = d.names["worker"]
    d.open("/events", "#events")
    d.until(lambda drv: drv.find_element(By.ID, "live").get_attribute("class") == "live on",
            why="the event stream to connect")
    d.driver.execute_script("window.__notReloaded = true")
    d.api("POST", f"/v1/instances/{name}/stop")
    d.until(lambda drv: drv.execute_script(
        "return [...document.querySelectorAll('#events tbody tr.fresh')]"
        ".some(r => r.textContent.includes(arguments[0]))", name),
        why="the new event row")
    assert d.driver.execute_script("return window.__notReloaded === true")
    # the fleet page's table follows too
    d.open("/", f'tr[data-instance="{name}"]')
    d.driver.execute_script("window.__notReloaded = true")
    d.api("POST", f"/v1/instances/{name}/start")
    cell = f'tr[data-instance="{name}"] .state-cell'
    d.until(lambda drv: "running" in drv.find_element(By.CSS_SELECTOR, cell).text
            and "→" not in drv.find_element(By.CSS_SELECTOR, cell).text,
            why=f"{name} shown running")
    assert d.driver.execute_script("return window.__notReloaded === true")
    d.shot("fleet")


def test_read_only_sees_no_buttons_and_its_forged_post_is_refused(dash: Dash) -> None:
    d = dash
    d.login(d.ro_token)
    name = d.names["batch"]
    for path, ready in (("/", f'tr[data-instance="{name}"]'), (f"/instances/{name}", "#instance"),
                        ("/hosts/host2", "#cpu-plot")):
        d.open(path, ready)
        assert d.driver.find_elements(By.CSS_SELECTOR, "[hx-post='/ui/act'], button.act") == []
        assert "(read-only)" in d.driver.find_element(By.CSS_SELECTOR, "header .who").text
    d.errors()
    forged = d.driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "const csrf = JSON.parse(document.body.getAttribute('hx-headers'))['X-CSRF-Token'];"
        "fetch('/ui/act', {method: 'POST', headers: {'X-CSRF-Token': csrf, 'Content-Type': "
        "'application/x-www-form-urlencoded'}, body: 'action=stop&name=' + arguments[0]})"
        ".then(r => r.text().then(t => done([r.status, t])));", name)
    assert forged[0] == 403, forged
    assert "read-only" in json.loads(forged[1])["error"]["message"]
    assert d.api("GET", f"/v1/instances/{name}")["state"] == "running"
    d.login(d.token)  # leave the browser as the admin for whatever runs next
