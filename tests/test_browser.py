"""In a real browser (headless Chromium through Debian's chromium-driver): the report page and ``optim dashboard``.

Nothing downloads a browser: ``scripts/install_system_deps.sh`` installs ``chromium``
and ``chromium-driver``; selenium (the ``test`` extra) drives them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from optim_helpers import assert_one_line_error, cli, create_study, opened_study, start_cli, wait_for, write_speech_data
from servers import free_port
from test_report import PNG, _study

from stagetune.optim.worker import WorkerOptions, run_worker

HINT = "run `scripts/install_system_deps.sh` as root (chromium, chromium-driver) and install the test extra (selenium)"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless Chromium, driven through the system's chromedriver."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail(f"selenium is missing: {HINT}")
    driver_path = shutil.which("chromedriver") or "/usr/bin/chromedriver"
    binary = shutil.which("chromium") or "/usr/bin/chromium"
    if not (os.path.exists(driver_path) and os.path.exists(binary)):
        pytest.fail(f"chromium or chromedriver is missing: {HINT}")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,2000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def test_the_report_page_renders_every_figure_in_chromium(browser: Any, tmp_path: Path) -> None:
    from stagetune.optim.report import study_report, write_report_dir, write_study_report
    from stagetune.optim.storage import storage_session
    from stagetune.optim.study import load_study

    url, _ = _study(tmp_path, 12)
    with storage_session(url, heartbeat_interval=None, create=False) as storage:  # as `optim report` (tested apart)
        report = study_report(*load_study(storage, "optim", url), storage)
    write_report_dir(tmp_path / "report", lambda out: write_study_report(report, out))
    browser.get((tmp_path / "report" / "index.html").as_uri())
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
    assert sorted(images) == sorted([name, True] for name in (
        "history.png", "importance.png", "learning_curves.png", "parallel_coordinates.png", "memory.png",
        "timeline.png"))
    assert "budget" in browser.find_element("css selector", "table.summary").text
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot)) and shot.read_bytes().startswith(PNG)
    assert shot.stat().st_size > 20_000  # a page of figures, not a blank one


def _get_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return json.load(response)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def _page_text(browser: Any, page: str, needle: str) -> str:
    """The text of ``page`` once it holds ``needle`` (the dashboard renders in the browser)."""
    browser.get(page)
    return wait_for(f"{needle!r} on {page}", lambda: needle in (text := browser.find_element("tag name", "body").text)
                    and text, timeout=60, interval=0.5)


def test_the_dashboard_page_shows_the_trial_count_and_the_best_value(browser: Any, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    create_study(url, "optim", write_speech_data(tmp_path / "data"), whitelist=["training.learning_rate"],
                 num_trials=5)
    run_worker(url, "optim", WorkerOptions(objective="quadratic", sampler="random", seed=0), log=lambda _m: None)
    with opened_study(url, "optim") as study:
        best, study_id, attrs = study.best_trial, study._study_id, study.user_attrs
    port = free_port()
    dashboard = start_cli(["optim", url, "dashboard", "--port", port], tmp_path, tmp_path / "dashboard.log")
    try:
        page = f"http://127.0.0.1:{port}/dashboard/studies/{study_id}"
        wait_for("the dashboard", lambda: "Ctrl-C" in (tmp_path / "dashboard.log").read_text(), timeout=60)
        wait_for("the dashboard to listen", lambda: _get_json(f"http://127.0.0.1:{port}/api/studies"), timeout=60,
                 interval=0.5)
        study_page = _page_text(browser, page, f"Best Trial (number={best.number})")
        trials_page = _page_text(browser, f"{page}/trials", "5 Trials")  # "0 Trials" until its data loaded
        taken = cli(["optim", url, "dashboard", "--port", port], tmp_path)
    finally:
        os.killpg(dashboard.pid, signal.SIGINT)  # Ctrl-C
        code = dashboard.wait(timeout=30)
    # Bound to 127.0.0.1: the URL, and the ssh line that forwards it from another machine.
    said = (tmp_path / "dashboard.log").read_text().splitlines()
    assert said[0] == f"optuna-dashboard of {url}: {page}"
    assert said[1].startswith(f"from another machine: ssh -N -L {port}:127.0.0.1:{port} ")
    assert said[1].endswith(f", then open {page}") and code == 130
    assert_one_line_error(taken, f"--port {port}: 127.0.0.1:{port} is taken")
    # Short attributes beside the full spec (which workers read), the first ones on the dashboard's page.
    assert {k: v for k, v in attrs.items() if k != "stagetune_spec"} == {
        "data": f"{tmp_path / 'data'} (dev 0.1 of it)", "tuned": "1: training.learning_rate", "budget": 5,
        "metric": "error", "pruner": "hyperband", "mem_limit_bytes": "none", "parent_study": "none",
    }
    lines = study_page.splitlines()
    assert lines[0] == f"optim (id={study_id})"
    assert float(lines[lines.index(f"Best Trial (number={best.number})") + 1]) == pytest.approx(best.value)
    assert "5 Trials" in trials_page.splitlines()
    # The short attributes are listed for the user (the spec too, cut short).
    assert re.search(r"^budget 5$", study_page, re.M) and re.search(r"^metric error$", study_page, re.M)
    assert re.search(r"^tuned 1: training.learning_rate$", study_page, re.M)


def test_the_dashboard_reads_a_sqlite_study_while_four_workers_write_it(browser: Any, tmp_path: Path) -> None:
    """60 s of 4 workers finishing a trial every ~0.1 s each, the dashboard polled throughout."""
    url = f"sqlite:///{tmp_path / 'optim.db'}"
    create_study(url, "optim", write_speech_data(tmp_path / "data"), whitelist=["training.learning_rate"],
                 num_trials=100_000, pruner="none")
    with opened_study(url, "optim") as study:
        study_id = study._study_id
    port = free_port()
    dashboard = start_cli(["optim", url, "dashboard", "--port", port], tmp_path, tmp_path / "dashboard.log")
    workers = start_cli(["optim", url, "run", "--workers", 4, "--objective", "sleep", "--sleep-seconds", 0.1,
                         "--timeout", 60, "--quiet"], tmp_path, tmp_path / "workers.log")
    api = f"http://127.0.0.1:{port}/api/studies/{study_id}?after=0"
    seen: list[int] = []
    try:
        wait_for("the dashboard to listen", lambda: _get_json(f"http://127.0.0.1:{port}/api/studies"), timeout=60,
                 interval=0.5)
        while workers.poll() is None:  # the browser and the API read while the workers write
            browser.get(f"http://127.0.0.1:{port}/dashboard/studies/{study_id}")
            answer = _get_json(api)
            assert answer is not None, f"the dashboard stopped answering: {(tmp_path / 'dashboard.log').read_text()}"
            seen.append(len(answer["trials"]))
        code = workers.wait(timeout=120)
    finally:
        if workers.poll() is None:
            os.killpg(workers.pid, signal.SIGKILL)
        os.killpg(dashboard.pid, signal.SIGINT)
        dashboard.wait(timeout=30)
    logs = {name: (tmp_path / name).read_text() for name in ("workers.log", "dashboard.log")}
    assert code == 0, logs["workers.log"][-3000:]
    for name, text in logs.items():
        assert "database is locked" not in text, f"{name}: {text[-3000:]}"
        assert "Traceback" not in text, f"{name}: {text[-3000:]}"
    with opened_study(url, "optim") as study:
        trials = study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state.is_finished()]
    print(f"{len(finished)} trials finished by 4 workers, the dashboard read {len(seen)} times")
    assert len(finished) >= 200 and len(seen) >= 10  # it was busy, and read all along
    assert seen == sorted(seen) and seen[-1] <= len(trials)
