#!/usr/bin/env python
"""Screenshots of the MLflow UI over real trainer runs, taken by headless Chromium, and checks of what they show.

    python scripts/screenshots                      # three real runs in a temp store, PNGs into docs/
    python scripts/screenshots --store sqlite:////abs/mlflow.db --out /tmp/shots

It starts a real `mlflow server` on 127.0.0.1 (a free port) over the store, and asks Debian's `chromium`
(`make screenshots` installs it) for:

  (a) the experiment page, by the address the trainer's links use (`?workflowType=machine_learning`): it must
      land on the runs list (its address `#/experiments/<id>/runs?...`, every run's name on the page, no GenAI
      overview's "Detect Issues"); saved as mlflow-ui.png, the README's picture;
  (b) the run page, by the link the trainer printed at the end of training (port changed to the server's): the
      run's name; then its metric charts, once the train/loss chart is drawn (its legend names the metric);
      saved as mlflow-ui-run.png.

Without the query MLflow 3.17.2 opens the experiment on its GenAI overview, whatever the experiment's tags:
the script prints where that address lands (`#/experiments/<id>/overview/usage?workflowType=genai` in a fresh
browser), for the record. Exit 1 with one line when a check fails. Chromium is driven over its DevTools pipe
(class Browser), so the checks wait in real time for what must be on the page.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNS = (("adam", "1e-2"), ("sgd", "1e-2"), ("adam", "1e-3"))  # three runs the names must tell apart
STEPS = 300
WINDOW = "1600,1000"
LINK = re.compile(r"^MLflow: (http://127\.0\.0\.1:5000/\S+)", re.MULTILINE)


class Failed(Exception):
    """A check that did not hold: one line."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", help="an existing tracking store URI; default: three new runs in a temp dir")
    parser.add_argument("--experiment", default="tape-trainer", help="the experiment to show (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where the PNGs go (default: docs/)")
    args = parser.parse_args(argv)
    try:
        binary = _chromium()
        with tempfile.TemporaryDirectory(prefix="screenshots-") as tmp:
            store, links = (args.store, []) if args.store else _train(Path(tmp))
            with _server(store, Path(tmp)) as address:
                browser = Browser(binary, Path(tmp) / "profile")
                try:
                    _shoot_all(browser, store, args.experiment, address, links, args.out)
                finally:
                    browser.close()
    except Failed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    raise Failed("no chromium on PATH: `make screenshots` installs Debian's (apt-get install -y chromium)")


def _train(directory: Path) -> tuple[str, list[str]]:
    """Three real runs in a new SQLite store; the run-page links the trainer printed."""
    store = f"sqlite:///{directory / 'mlflow.db'}"
    links = []
    for optimizer, lr in RUNS:
        args = [f"optimizer={optimizer}", f"optimizer.lr={lr}", f"trainer.max_steps={STEPS}",
                "tracking.log_model=false", f"tracking.uri={store}", "trainer.progress=false"]  # fmt: skip
        proc = subprocess.run([sys.executable, "-m", "trainer", *args], cwd=directory, capture_output=True,
                              text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}, check=False)  # fmt: skip
        if proc.returncode != 0 or not (found := LINK.search(proc.stdout + proc.stderr)):
            raise Failed(f"training {' '.join(args)} failed or printed no link: {proc.stderr.strip()[-500:]}")
        links.append(found.group(1))
        print(f"trained: {found.group(0)}")
    return store, links


@contextlib.contextmanager
def _server(store: str, directory: Path) -> Iterator[str]:
    """A real `mlflow server` over the store on a free loopback port, stopped (its process group) at the end."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = (directory / "server.log").open("w")
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store, "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=directory, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(address, proc, directory / "server.log")
        yield address
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def _wait_healthy(address: str, proc: subprocess.Popen, log: Path, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise Failed(f"mlflow server exited {proc.returncode}: {log.read_text()[-500:]}")
        with contextlib.suppress(OSError):
            if urllib.request.urlopen(f"{address}/health", timeout=2).read() == b"OK":
                return
        time.sleep(0.5)
    raise Failed(f"mlflow server at {address} not healthy after {timeout_s:.0f} s")


class Browser:
    """Headless Chromium driven over its DevTools pipe (`--remote-debugging-pipe`: JSON messages ending in NUL
    on its fds 3 and 4), stdlib only. It waits in real time for what a page must show: with
    `--screenshot --virtual-time-budget=25000` the run page's charts were still loading spinners in 2 of the 3 shots
    looked at."""

    def __init__(self, binary: str, profile: Path):
        to_chrome, self._send = os.pipe()
        self._receive, from_chrome = os.pipe()

        def on_3_and_4() -> None:  # in the child, before exec: the pipe ends where Chromium looks for them
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_chrome, from_chrome)]  # either may be 3 or 4
            os.dup2(high[0], 3)
            os.dup2(high[1], 4)

        w, h = WINDOW.split(",")
        cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--remote-debugging-pipe",
               f"--window-size={w},{h}", f"--user-data-dir={profile}", "about:blank"]  # fmt: skip
        self.proc = subprocess.Popen(cmd, preexec_fn=on_3_and_4, close_fds=False, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # fmt: skip
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer, self._id, self.size = b"", 0, (int(w), int(h))

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._send, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._receive, 1 << 20)
                if not chunk:
                    raise Failed(f"chromium exited during {method}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise Failed(f"chromium: {method}: {reply['error'].get('message')}")
                return reply.get("result", {})

    @contextlib.contextmanager
    def page(self, url: str) -> Iterator[str]:
        """A new tab at `url`, its session id for `evaluate`, `wait` and `screenshot`; closed afterwards."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        w, h = self.size
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": w, "height": h, "deviceScaleFactor": 1, "mobile": False}, session)  # fmt: skip
        self.call("Page.navigate", {"url": url}, session)
        try:
            yield session
        finally:
            self.call("Target.closeTarget", {"targetId": target})

    def evaluate(self, session: str, expression: str) -> object:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
        return result.get("result", {}).get("value")

    def wait(self, session: str, expression: str, what: str, timeout_s: float = 60.0) -> None:
        """Until the page's `expression` is true (polled every 0.25 s); Failed naming `what` after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not self.evaluate(session, expression):
            if time.monotonic() > deadline:
                url = self.evaluate(session, "location.href")
                raise Failed(f"{url}: no {what} after {timeout_s:.0f} s")
            time.sleep(0.25)

    def screenshot(self, session: str, path: Path) -> None:
        data = self.call("Page.captureScreenshot", {"format": "png"}, session)["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(Failed, OSError):
            self.call("Browser.close")
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        os.close(self._send)
        os.close(self._receive)


TEXT = "document.body ? document.body.innerText : ''"
# MLflow 3.17's "MLflow Assistant" side panel opens itself on a browser's first visit, over a third of the page:
# closed by its own button, which the browser profile then remembers (local storage mlflow.assistant.panelOpen_v1).
CLOSE_ASSISTANT = """(() => {
    const b = document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]');
    if (b) b.click(); return true; })()"""
LANDED = f"({TEXT}).includes('matching runs') || ({TEXT}).includes('Detect Issues')"


def _shoot_all(browser: Browser, store: str, experiment: str, address: str, links: list[str], out: Path) -> None:
    from mlflow.tracking import MlflowClient

    from trainer.tracking.ui import run_link

    client = MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise Failed(f"no experiment {experiment!r} in {store}: --experiment names one")
    runs = client.search_runs([exp.experiment_id], max_results=50)
    if not runs:
        raise Failed(f"experiment {experiment!r} in {store} has no runs")
    out.mkdir(parents=True, exist_ok=True)
    # (a) the experiment page, as the trainer's links open it
    names = [r.info.run_name for r in runs if "mlflow.parentRunId" not in r.data.tags][:10]
    with browser.page(f"{address}/#/experiments/{exp.experiment_id}?workflowType=machine_learning") as tab:
        browser.wait(tab, LANDED, "runs list or GenAI overview")
        browser.wait(tab, " && ".join(f"({TEXT}).includes({json.dumps(n)})" for n in names), "run names", 20)
        browser.evaluate(tab, CLOSE_ASSISTANT)
        time.sleep(1.0)  # the table takes the width
        landed, text = browser.evaluate(tab, "location.href"), browser.evaluate(tab, TEXT)
        if "/runs" not in landed or "Detect Issues" in text:
            raise Failed(f"the experiment page landed on {landed}, not the runs list")
        browser.screenshot(tab, out / "mlflow-ui.png")
    print(f"(a) landed on {landed}: the runs list, {len(names)} names shown -> {out / 'mlflow-ui.png'}")
    with browser.page(f"{address}/#/experiments/{exp.experiment_id}") as tab:
        browser.wait(tab, LANDED, "runs list or GenAI overview")
        landed = browser.evaluate(tab, "location.href")
    kind = exp.tags.get("mlflow.experimentKind")
    print(f"    without ?workflowType (experiment tag {kind!r}, the sidebar switch never used): landed on {landed}")
    # (b) a run's page, by the link the trainer printed (or built as it builds them)
    trained = [r for r in runs if "train/loss" in r.data.metrics]  # not a sweep's parent
    if not trained:
        raise Failed(f"no run of experiment {experiment!r} in {store} has a train/loss metric")
    run = trained[-1]  # the oldest: the first link printed
    link = links[0] if links else run_link("http://127.0.0.1:5000", exp.experiment_id, run.info.run_id)
    link = link.replace("http://127.0.0.1:5000", address)
    run_id = link.split("/runs/")[1].split("?")[0]
    name = client.get_run(run_id).info.run_name
    with browser.page(link) as tab:
        browser.wait(tab, f"({TEXT}).includes({json.dumps(name)})", f"run name {name!r}")
    charts = link.replace(f"/runs/{run_id}", f"/runs/{run_id}/model-metrics")
    with browser.page(charts) as tab:
        drawn = f"({TEXT}).includes({json.dumps(name)}) && ({TEXT}).includes('(train/loss)')"  # the chart's legend
        browser.wait(tab, drawn, "train/loss chart drawn")
        browser.evaluate(tab, CLOSE_ASSISTANT)
        time.sleep(1.0)  # plotly's last frame
        browser.screenshot(tab, out / "mlflow-ui-run.png")
    print(f"(b) {link} opens run {name!r}; its charts -> {out / 'mlflow-ui-run.png'}")


if __name__ == "__main__":
    sys.exit(main())
