"""Operations, for real: the dashboard in a real headless Chromium (Debian's
chromium and chromium-driver, driven by selenium) on a real ferryd with a
running guest — a live migration started from the page, its progress to the
end, the domain's host changing, the console in the browser following the
domain and the guest echoing what is typed — and, around that migration, the
events stream, the job's log on both hosts, and /metrics."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import FERRY, Host, Probe, free_port, guest_config, peer_hosts, started

ADDRS = {"da": "127.0.0.1", "db": "127.0.0.2"}


class Pair:
    def __init__(self, root: Path) -> None:
        self.ui_port = free_port(socket.SOCK_STREAM, "127.0.0.1")
        self.metrics_port = free_port(socket.SOCK_STREAM, "127.0.0.1")
        extra = {"da": {"ui_address": f"127.0.0.1:{self.ui_port}",
                        "metrics_address": f"127.0.0.1:{self.metrics_port}",
                        # a cap, so that the page sees the copy under way
                        "migration": {"bandwidth_mibps": 24}},
                 "db": {}}
        self.hosts = peer_hosts(root, ADDRS, extra)

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]


@pytest.fixture(scope="module")
def pair(guest: Any, workdir: Path) -> Iterator[Pair]:
    p = Pair(workdir)
    with started(p.hosts):
        yield p


@pytest.fixture
def browser(workdir: Path) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    for tool in ("chromium", "chromedriver"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run scripts/setup.sh")
    profile = tempfile.mkdtemp(prefix="fychrome", dir="/tmp")
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1400,1000",
                 f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    service = Service(executable_path=shutil.which("chromedriver") or "/usr/bin/chromedriver",
                      log_output=str(workdir / "chromedriver.log"))
    driver = webdriver.Chrome(options=opts, service=service)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def raw_get(host: Host, path: str) -> str:
    """A GET on the host's Unix socket, its body as text (for /metrics)."""
    status, body = host.request("GET", path)
    assert status == 200, status
    return body.decode()


def metric(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        base, _, lab = key.partition("{")
        if base == name and ",".join(sorted(lab.rstrip("}").split(","))) == want:
            return float(value)
    return None


def test_the_dashboard_migrates_a_guest_and_shows_its_console(
        pair: Pair, browser: Any, workdir: Path) -> None:
    from selenium.common.exceptions import (
        NoSuchElementException,
        StaleElementReferenceException,
    )
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    # the page redraws what changed: look things up afresh, and again if they went
    flaky = (StaleElementReferenceException, NoSuchElementException)

    def waiting(seconds: float) -> WebDriverWait:  # type: ignore[type-arg]
        return WebDriverWait(browser, seconds, poll_frequency=0.1, ignored_exceptions=flaky)

    def click(css: str) -> None:
        waiting(30).until(lambda d: d.find_element(By.CSS_SELECTOR, css).click() or True)

    def attr(css: str, name: str) -> str:
        return str(browser.find_element(By.CSS_SELECTOR, css).get_attribute(name))

    def text(css: str) -> str:
        return str(browser.find_element(By.CSS_SELECTOR, css).text)

    da, db = pair["da"], pair["db"]
    port = free_port()
    da.create(guest_config("webui", port, bind="", memory=192,
                           cmdline_extra="ferry.mem=96"))
    probe = Probe(port, *ADDRS.values())
    events = subprocess.Popen([FERRY, "events", "--json"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "FERRY_SOCKET": str(da.socket)})
    try:
        first = probe.wait_up()
        browser.get(f"http://127.0.0.1:{pair.ui_port}/ui/")
        waiting(60).until(lambda d: text("#dom-webui .host") == "da")
        assert "da" in text("#me")

        # the console, opened while the guest is on da
        click("#dom-webui button.console")
        waiting(60).until(lambda d: text("#console-where") == "on da")

        waiting(30).until(lambda d: Select(d.find_element(
            By.CSS_SELECTOR, "select.dest[data-domain=webui]")).select_by_value("db") or True)
        click("button.migrate[data-domain=webui]")
        job_id = waiting(60).until(lambda d: attr("#jobs .job", "id")).removeprefix("job-")
        # mid-migration: progress under way on the page
        waiting(60).until(lambda d: attr(f"#job-{job_id}", "data-state") == "running"
                          and 0 < int(attr(f"#job-{job_id}", "data-progress")) < 100)
        shot = Path(os.environ.get("FERRY_SCREENSHOT_DIR", str(workdir))) / "dashboard.png"
        browser.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        shown = waiting(10).until(lambda d: text(f"#job-{job_id}"))
        assert "da → db" in shown and "Mbit/s" in shown and "dirty" in shown, shown
        da.ferry("job", "set", job_id, "--bandwidth", "0")   # (seen: now be quick)

        waiting(180).until(lambda d: attr(f"#job-{job_id}", "data-state") == "completed")
        assert attr(f"#job-{job_id}", "data-progress") == "100"
        waiting(60).until(lambda d: text("#dom-webui .host") == "db")
        assert db.domains()["webui"]["state"] == "running" and "webui" not in da.domains()

        # the console followed the guest to db: what is typed there reaches it
        waiting(60).until(lambda d: text("#console-where") == "on db")
        browser.find_element(By.CSS_SELECTOR, "#terminal .xterm-helper-textarea").send_keys(
            "hello-dashboard" + Keys.ENTER)
        waiting(30).until(lambda d: "FERRY-AGENT heard: hello-dashboard" in text(
            "#terminal .xterm-rows"))

        # the page took nothing from anywhere but this ferryd
        fetched = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)")
        assert fetched and all(u.startswith(f"http://127.0.0.1:{pair.ui_port}/") or
                               u.startswith(f"ws://127.0.0.1:{pair.ui_port}/")
                               for u in fetched), fetched
        reply = probe.wait_up(10)
        assert reply["boot_id"] == first["boot_id"] and reply["corrupt"] == "0"

        # the events stream saw the job's phases, progress and end
        events.terminate()
        out, _ = events.communicate(timeout=10)
        seen = [json.loads(line) for line in out.splitlines() if line.strip()]
        mine = [e for e in seen if e.get("job") == job_id]
        kinds = {(e["kind"], e["state"] if e["kind"] == "migration.state" else e.get("phase"))
                 for e in mine}
        assert ("migration.phase", "perform") in kinds and \
            ("migration.state", "completed") in kinds, kinds
        assert any(e["kind"] == "migration.progress" and e["progress_pct"] for e in mine)
        assert all(e["host"] == "da" for e in seen)
        assert [e["seq"] for e in seen] == sorted(e["seq"] for e in seen)

        # the job's log, from either host, has both hosts' parts in time order
        log = json.loads(da.ferry("job", "log", job_id, "--json").stdout)
        assert {e["host"] for e in log["entries"]} == {"da", "db"} and not log["unreachable"]
        times = [e["time"] for e in log["entries"]]
        assert times == sorted(times)
        assert any(e["host"] == "db" and e["what"] == "phase" and e["detail"] == "finish"
                   for e in log["entries"])
        human = db.ferry("job", "log", job_id).stdout
        assert "da" in human and "db" in human and "completed" in human

        # /metrics: on the API and on metrics_address, the migration counted
        text = raw_get(da, "/metrics")
        assert metric(text, "ferry_migrations_total", role="source", mode="live",
                      result="completed") == 1.0, text
        assert metric(text, "ferry_migration_duration_seconds_count", mode="live") == 1.0
        assert (metric(text, "process_resident_memory_bytes") or 0) > 0
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{pair.metrics_port}/metrics",
                                    timeout=10) as res:
            scraped = res.read().decode()
        assert metric(scraped, "ferry_domains", state="running") == 0.0
        dbm = raw_get(db, "/metrics")
        assert metric(dbm, "ferry_domains", state="running") == 1.0
        assert metric(dbm, "ferry_migrations_total", role="destination", mode="live",
                      result="completed") == 1.0
    finally:
        if events.poll() is None:
            events.kill()
            events.wait()
        probe.close()
        for h in (da, db):
            if "webui" in h.domains():
                h.ferry("destroy", "webui", check=False)
                h.ferry("undefine", "webui", check=False)


def test_the_dashboards_http_listener_refuses_what_another_page_could_send(
        pair: Pair) -> None:
    """Plain HTTP has no certificate: a change needs the X-Ferry header (which a
    page of another origin cannot add without a CORS preflight, never granted)."""
    import urllib.error
    import urllib.request
    base = f"http://127.0.0.1:{pair.ui_port}"
    req = urllib.request.Request(f"{base}/v1/host/maintenance", data=b'{"on": true}',
                                 headers={"Content-Type": "application/json"}, method="POST")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 403 and b"X-Ferry" in err.value.read()
    assert pair["da"].json("host")["maintenance"] is False
    with urllib.request.urlopen(f"{base}/ui/", timeout=10) as res:
        assert b"<title>Ferry</title>" in res.read()
    with urllib.request.urlopen(f"{base}/v1/openapi.json", timeout=10) as res:
        assert json.loads(res.read())["openapi"].startswith("3.1")
