"""The HTML report in a real browser, and Snakemake's native report.

Headless Chromium (Debian's ``chromium`` package; ``.ci/run`` installs it) is driven over the
DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages separated by NUL bytes on
file descriptors 3 and 4, no websocket library needed). The page is loaded, every image is
decoded (a broken one rejects ``img.decode()`` or has no natural width), console messages,
uncaught exceptions and browser log entries (failed loads) are collected, and a full-page
screenshot is taken. A missing chromium fails the tests: CI installs it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import select
import shutil
import subprocess
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from conftest import BIN, run, study_dir

SCREENSHOT_COPY = Path("/tmp/report_screenshot.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# --------------------------------------------------------------------------- a minimal DevTools client


def chromium() -> str:
    """Path of the chromium executable; fails (never skips) when it is missing."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail("chromium is not installed: the browser test needs it (.ci/run installs Debian's package: "
                "apt-get install -y --no-install-recommends chromium)")


@dataclass
class PageResult:
    """What the browser saw while loading a page."""

    images: list[dict[str, Any]]
    figures: list[dict[str, Any]]
    console: list[dict[str, Any]] = field(default_factory=list)
    exceptions: list[str] = field(default_factory=list)
    log: list[dict[str, Any]] = field(default_factory=list)
    title: str = ""
    screenshot: Path | None = None

    def problems(self) -> list[str]:
        """Broken images, figures without alt text or caption, console errors/warnings, uncaught
        exceptions and error-level browser log entries (e.g. a resource that failed to load)."""
        out = [f"image {i['index']} did not load ({i['src'][:60]!r}, decoded={i['decoded']}, "
               f"naturalWidth={i['naturalWidth']})" for i in self.images
               if not (i["decoded"] and i["complete"] and i["naturalWidth"] > 0)]
        out += [f"figure {f['id']!r} has no alt text" for f in self.figures if not (f["alt"] or "").strip()]
        out += [f"figure {f['id']!r} has no caption" for f in self.figures if not (f["caption"] or "").strip()]
        out += [f"console {c['type']}: {c['text']}" for c in self.console if c["type"] in ("error", "assert",
                                                                                          "warning")]
        out += [f"uncaught exception: {e}" for e in self.exceptions]
        out += [f"browser log {e['level']}: {e['text']} ({e.get('url', '')})" for e in self.log
                if e["level"] in ("error", "warning")]
        return out


class DevTools:
    """Chromium over ``--remote-debugging-pipe``: commands on fd 3, replies and events on fd 4."""

    def __init__(self, profile: Path, width: int = 1400, height: int = 1000, timeout: float = 60.0) -> None:
        cmd_r, self._w = os.pipe()
        self._r, res_w = os.pipe()

        def child_fds() -> None:  # runs in the child before exec: its fd 3 reads commands, fd 4 writes replies
            a, b = os.dup(cmd_r), os.dup(res_w)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.stderr = profile.parent / f"{profile.name}.stderr.txt"
        with open(self.stderr, "wb") as err:
            self.proc = subprocess.Popen(
                [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                 "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
                 f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
                preexec_fn=child_fds, close_fds=False, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=err)
        os.close(cmd_r)
        os.close(res_w)
        self.timeout = timeout
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []

    def _read(self, want: Any, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                msg = json.loads(raw)
                if want(msg):
                    return msg
                self.events.append(msg)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"chromium did not answer within {timeout} s; stderr: {self._stderr_tail()}")
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium closed the pipe; stderr: {self._stderr_tail()}")
                self._buf += chunk

    def _stderr_tail(self) -> str:
        try:
            return self.stderr.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        """Send one command and wait for its reply (events arriving meanwhile are kept)."""
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        mid = self._id
        reply = self._read(lambda m: m.get("id") == mid, self.timeout)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def wait_event(self, method: str, session: str) -> dict[str, Any]:
        for i, ev in enumerate(self.events):
            if ev.get("method") == method and ev.get("sessionId") == session:
                return self.events.pop(i)
        return self._read(lambda m: m.get("method") == method and m.get("sessionId") == session, self.timeout)

    def drain(self, seconds: float) -> None:
        """Collect events for ``seconds`` (late console messages, failed loads)."""
        with contextlib.suppress(TimeoutError):
            self._read(lambda m: False, seconds)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("Browser.close")
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)
        for fd in (self._w, self._r):
            with contextlib.suppress(OSError):
                os.close(fd)


_PAGE_STATE = """
(async () => {
  const imgs = [...document.images];
  const decoded = await Promise.all(imgs.map(i => i.decode().then(() => true, () => false)));
  return {
    title: document.title,
    images: imgs.map((i, k) => ({index: k, src: i.getAttribute('src') || '', complete: i.complete,
                                 naturalWidth: i.naturalWidth, decoded: decoded[k], alt: i.alt})),
    figures: [...document.querySelectorAll('figure')].map(f => ({
      id: f.id, alt: (f.querySelector('img') || {}).alt || '',
      caption: (f.querySelector('figcaption') || {}).textContent || ''})),
  };
})()
"""


def load_page(html: Path, screenshot: Path | None, tmp: Path) -> PageResult:
    """Open ``html`` in headless chromium, inspect it and (optionally) save a full-page screenshot."""
    browser = DevTools(tmp / f"profile-{html.stem}")
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page.enable", "Runtime.enable", "Log.enable"):
            browser.call(domain, session=session)
        browser.call("Page.navigate", {"url": html.resolve().as_uri()}, session=session)
        browser.wait_event("Page.loadEventFired", session)
        state = browser.call("Runtime.evaluate", {"expression": _PAGE_STATE, "awaitPromise": True,
                                                  "returnByValue": True}, session=session)
        if "exceptionDetails" in state:
            raise RuntimeError(f"page inspection failed: {state['exceptionDetails']}")
        value = state["result"]["value"]
        browser.drain(0.5)
        if screenshot is not None:
            shot = browser.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True},
                                session=session)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        events = browser.events
    finally:
        browser.close()
    console = [{"type": e["params"]["type"],
                "text": " ".join(str(a.get("value", a.get("description", ""))) for a in e["params"]["args"])}
               for e in events if e.get("method") == "Runtime.consoleAPICalled"]
    exceptions = [(e["params"]["exceptionDetails"].get("exception") or {}).get("description")
                  or json.dumps(e["params"]["exceptionDetails"])[:1000]
                  for e in events if e.get("method") == "Runtime.exceptionThrown"]
    log = [e["params"]["entry"] for e in events if e.get("method") == "Log.entryAdded"]
    return PageResult(images=value["images"], figures=value["figures"], console=console, exceptions=exceptions,
                      log=log, title=value["title"], screenshot=screenshot)


# --------------------------------------------------------------------------- the checks can fail


def test_browser_check_catches_broken_images_and_console_errors(tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><head><title>broken</title></head><body>"
        '<figure id="fig-a"><img alt="a" src="data:image/png;base64,iVBORw0KGgoAAAAN"><figcaption>a</figcaption>'
        "</figure>"
        '<figure id="fig-b"><img src="missing.png"><figcaption></figcaption></figure>'
        '<script>console.error("boom"); undefinedFunction();</script></body></html>',
        encoding="utf-8")
    result = load_page(page, tmp_path / "broken.png", tmp_path)
    problems = "\n".join(result.problems())
    assert "image 0 did not load" in problems and "image 1 did not load" in problems
    assert "figure 'fig-b' has no alt text" in problems and "figure 'fig-b' has no caption" in problems
    assert "console error: boom" in problems
    assert "uncaught exception" in problems and "undefinedFunction" in problems
    assert "ERR_FILE_NOT_FOUND" in problems  # the missing file, from the browser log
    assert (tmp_path / "broken.png").read_bytes()[:8] == PNG_MAGIC


def test_browser_check_passes_a_clean_page(tmp_path: Path) -> None:
    from pruneshot.report.plotting import empty_figure, save_png

    png = tmp_path / "fig.png"
    save_png(empty_figure("ok"), png)
    data = base64.b64encode(png.read_bytes()).decode()
    page = tmp_path / "clean.html"
    page.write_text(f'<!DOCTYPE html><html><head><title>clean</title></head><body><figure id="f"><img alt="x" '
                    f'src="data:image/png;base64,{data}"><figcaption>x</figcaption></figure></body></html>')
    result = load_page(page, None, tmp_path)
    assert result.problems() == []
    assert result.images[0]["naturalWidth"] > 0


# --------------------------------------------------------------------------- the real report


def _check_report_page(html: Path, shot: Path, tmp_path: Path) -> PageResult:
    result = load_page(html, shot, tmp_path)
    assert result.problems() == [], "\n".join(result.problems())
    n_embedded = html.read_text(encoding="utf-8").count("data:image/png;base64,")
    assert len(result.images) == len(result.figures) == n_embedded >= 6  # reinit gap: a line without reinit
    assert result.title.startswith("pruneshot report")
    data = shot.read_bytes()
    assert data[:8] == PNG_MAGIC
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 1200 and height > 3000, (width, height)  # the full page, not just the viewport
    return result


@pytest.mark.integration
def test_pipeline_report_renders_in_chromium(project: Path, tmp_path: Path) -> None:
    """The report the pipeline wrote: every figure decodes, no console errors; screenshot kept."""
    shot = tmp_path / "report.png"
    _check_report_page(study_dir(project) / "report/index.html", shot, tmp_path)
    shutil.copyfile(shot, SCREENSHOT_COPY)


def _copy_tables(project: Path, dst: Path) -> Path:
    """The tables, mlflow records and manifests of the fixture's study, copied below ``dst`` at the same
    relative paths (the fixture stays untouched); the copy's study root."""
    src = study_dir(project)
    root = dst / src.relative_to(project)
    files = [src / rel for rel in ("tables/results.csv", "tables/episodes.csv", "mlflow/study.json",
                                   "mlflow/sync.json", "data/source/manifest.json")]
    for path in [*files, *(src / "data/target").glob("*/manifest.json")]:
        out = root / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out)
    return root


@pytest.mark.integration
def test_cli_report_with_a_failed_row_renders_in_chromium(project: Path, tmp_path: Path) -> None:
    """`pruneshot report` rebuilds the report from the fixture's tables with one row turned into a failure
    (NaN metrics, error text): the failure is listed with its error, nothing breaks in the browser."""
    from pruneshot.cli import main

    res_dir = _copy_tables(project, tmp_path / "copy")
    csv = res_dir / "tables/results.csv"
    df = pd.read_csv(csv, dtype={"row_id": str})
    victim = df.index[(df["method"] == "l1_filter") & (df["arm"] == "finetune")][0]
    failed_id = df.loc[victim, "row_id"]
    for col in df.columns:
        if col.startswith(("acc_", "achieved_", "latency_ms", "latency_cuda_ms")) or col in (
                "params_ratio", "flops_ratio", "budget_gap", "search_seconds"):
            df.loc[victim, col] = float("nan")
    df["error"] = df["error"].astype(object)
    df.loc[victim, ["status", "error"]] = ["failed", "RuntimeError: CUDA out of memory <b>not bold</b>"]
    df.to_csv(csv, index=False)
    out = tmp_path / "report"
    assert main(["report", "--results", str(csv), "--out", str(out)]) == 0
    html = out / "index.html"
    text = html.read_text(encoding="utf-8")
    failures = text.split('id="failures-table"')[1].split("</table>")[0]
    assert failed_id in failures and "CUDA out of memory &lt;b&gt;not bold&lt;/b&gt;" in failures
    assert 'id="comparisons-table"' in text  # episodes.csv was found beside results.csv
    _check_report_page(html, tmp_path / "cli.png", tmp_path)


# --------------------------------------------------------------------------- Snakemake's native report


@pytest.mark.integration
def test_native_report_captions_every_output_and_shows_commit_and_config(project: Path, tmp_path: Path) -> None:
    zpath = tmp_path / "native.zip"
    run([str(BIN / "snakemake"), "--report", str(zpath)], project)
    with zipfile.ZipFile(zpath) as zf:
        names = zf.namelist()
        page = zf.read(next(n for n in names if n.endswith("report.html"))).decode()
    results = pd.read_csv(study_dir(project) / "tables/results.csv", dtype=str)
    commit = run(["git", "rev-parse", "HEAD"], project).stdout.strip()
    (config_sha,) = set(results["config_sha256"])
    assert commit in page, "landing page lacks the git commit"
    assert config_sha in page, "landing page lacks the config hash"
    for name in ("results.csv", "episodes.csv", "metrics.json", "index.html"):
        assert any(n.endswith(name) for n in names), name
    captions = {
        "results.csv": "One row per (method",
        "episodes.csv": "One row per (row_id, episode)",
        "metrics.json": "dvc metrics show",
        "index.html": "self-contained pruneshot report",
    }
    for output, caption in captions.items():
        assert caption in page, f"caption of {output} missing"
    figures = sorted(p.stem for p in (study_dir(project) / "report/figures").glob("*.png"))
    for stem in figures:
        assert any(n.endswith(f"{stem}.png") for n in names), stem
    # one caption per figure: each figure's own first words appear in the report
    for phrase in ("achieved fraction of the dense network's parameters", "achieved fraction of the dense "
                   "network's FLOPs", "measured CPU latency", "Requested budget against the achieved",
                   "Time spent searching", "fresh initialisation"):
        assert re.search(re.escape(phrase), page), phrase


# --------------------------------------------------------------------------- tables fit the page (issue 15)

_TABLE_WIDTHS = """
(() => {
  const body = document.body, cs = getComputedStyle(body);
  const content = body.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight);
  return {content, page: document.documentElement.scrollWidth, tables: [...document.querySelectorAll('table')].map(
    t => ({id: t.id || t.className, scroll: Math.max(t.scrollWidth, t.getBoundingClientRect().width),
           box: t.parentElement.scrollWidth}))};
})()
"""


def table_widths(html: Path, tmp: Path, width: int, media: str = "screen") -> dict[str, Any]:
    """Every table's scroll width (and its wrapper's) against the body's content width, in a window
    ``width`` px wide under the ``media`` CSS media type (``print``: the page as printed)."""
    browser = DevTools(tmp / f"profile-widths-{width}-{media}", width=width)
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        browser.call("Page.enable", session=session)
        browser.call("Emulation.setDeviceMetricsOverride", {"width": width, "height": 1000, "deviceScaleFactor": 1,
                                                            "mobile": False}, session=session)
        browser.call("Emulation.setEmulatedMedia", {"media": media}, session=session)
        browser.call("Page.navigate", {"url": html.resolve().as_uri()}, session=session)
        browser.wait_event("Page.loadEventFired", session)
        state = browser.call("Runtime.evaluate", {"expression": _TABLE_WIDTHS, "returnByValue": True},
                             session=session)
    finally:
        browser.close()
    return state["result"]["value"]


def _wide_report(tmp_path: Path) -> Path:
    """A report from many methods, a reinit arm, CPU and CUDA latencies at two batch sizes and long device
    names: the widest detail table the report makes."""
    from test_report import make_many_methods_results, make_provenance

    from pruneshot.report.build import build_report

    results = make_many_methods_results()
    reinit = results[results["method"].isin(["dense", "l1_filter", "dap"])].assign(arm="reinit")
    results = pd.concat([results, reinit.assign(row_id=reinit["row_id"] + "r")], ignore_index=True)
    results["latency_device"] = "cpu:Intel(R) Xeon(R) Platinum 8480+ x86_64"
    results["latency_cuda_device"] = "cuda:NVIDIA H100 80GB HBM3"
    results["latency_cuda_ms_b1"] = 0.21
    results["latency_cuda_ms_b64"] = 1.75
    results["search_scope"] = "once"
    results["budget_gap"] = results["requested_budget"] - results["params_ratio"]
    results["budget_missed"] = results["budget_gap"].abs() > 0.015
    csv = tmp_path / "wide.csv"
    results.to_csv(csv, index=False)
    out = tmp_path / "wide" / "index.html"
    build_report(csv, make_provenance(), out, tmp_path / "wide" / "figures")
    return out


@pytest.fixture(scope="module")
def wide_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One wide report, built once for the three page widths (building it is most of the test's time)."""
    return _wide_report(tmp_path_factory.mktemp("wide"))


@pytest.mark.parametrize(("width", "media"), [(1400, "screen"), (1000, "screen"), (794, "print")])
def test_no_table_is_wider_than_the_page(wide_report: Path, tmp_path: Path, width: int, media: str) -> None:
    """Issue 15: the cost-detail table scrolled sideways and lost columns in print."""
    html = wide_report
    assert "achieved − requested" in html.read_text(encoding="utf-8")
    widths = table_widths(html, tmp_path, width, media)
    content = widths["content"]
    wide = [(t["id"], t["scroll"], t["box"]) for t in widths["tables"] if max(t["scroll"], t["box"]) > content + 1]
    assert len(widths["tables"]) > 5
    assert wide == [], f"content width {content}px"
    assert widths["page"] <= width
