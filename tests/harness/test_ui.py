"""After a tiny sweep, ``python -m harness ui`` serves MLflow's UI: the link it prints opens the runs view, whose
REST API and page in headless Chromium list the child runs under the parent, whose chart view shows the
online kNN curve of each child, and the compare link it prints opens MLflow's comparison of the sweep's trials.
The screenshots are kept in ``test-artifacts/``.

Needs Debian's ``chromium`` (``.ci/run`` installs it) and the ``playwright`` package (the ``test`` extra);
the browser is the system one, nothing is downloaded. Skipped where Chromium is missing, except in CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.request

import pytest

from harness.cli import main
from tests.helpers.processes import free_port, wait_until
from tests.helpers.runs import REPO, env_for, write_sweep

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.slow  # a sweep, MLflow's UI server and Chromium

if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)


def api(base: str, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def wait_for(base: str, timeout_s: float = 120) -> None:
    """Until the UI's REST API answers (not only its health check)."""

    def api_answers() -> bool:
        try:
            api(base, "/api/2.0/mlflow/experiments/search", {"max_results": 1})
        except OSError:
            return False
        return True

    wait_until(api_answers, timeout_s, f"MLflow UI at {base} did not answer", every_s=0.5)


def test_ui_lists_child_runs_under_the_parent(tmp_path, tracking_uri, ray_address) -> None:
    from playwright.sync_api import sync_playwright

    path = write_sweep(tmp_path, space={"method.temperature": [0.2]}, seeds=[0, 1], max_concurrent=2)
    assert main(["sweep", str(path), "--results", str(tmp_path / "results")]) == 0

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = env_for()
    server = subprocess.Popen([sys.executable, "-m", "harness", "ui", "--port", str(port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        printed = [server.stdout.readline() for _ in range(3)]  # the header, then per experiment its runs and sweep
        threading.Thread(target=server.stdout.read, daemon=True).start()  # keep the pipe drained
        (link,) = [line.split(": ", 1)[1].strip() for line in printed if line.startswith("  unit: ")]
        (compare,) = [line.split(": ", 1)[1].strip() for line in printed if line.startswith("    compare its last sweep's 2 trials: ")]
        wait_for(base)
        exp = api(base, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=unit")["experiment"]
        runs = api(base, "/api/2.0/mlflow/runs/search", {"experiment_ids": [exp["experiment_id"]], "max_results": 100})["runs"]
        tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
        parents = [r for r, t in zip(runs, tags) if t.get("harness.role") == "sweep"]
        assert len(parents) == 1
        parent_id = parents[0]["info"]["run_id"]
        children = sorted(r["info"]["run_name"] for r, t in zip(runs, tags) if t.get("mlflow.parentRunId") == parent_id)
        assert children == ["method.temperature=0.2 seed=0", "method.temperature=0.2 seed=1"]
        assert all(r["info"]["status"] == "FINISHED" for r in runs)

        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            assert link == f"{base}/#/experiments/{exp['experiment_id']}/runs"
            page.goto(link, timeout=60_000)  # the link `harness ui` printed opens the runs view
            parent_row = page.get_by_role("row").filter(has_text="unit sweep")
            parent_row.first.wait_for(timeout=60_000)
            assert page.get_by_text(children[0], exact=True).count() == 0  # collapsed under the parent
            parent_row.first.get_by_role("button").first.click()  # the expander in the parent's row
            for name in children:
                page.get_by_text(name, exact=True).first.wait_for(timeout=30_000)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "mlflow_ui_sweep.png"))
            # the chart view: the online monitor's learning curve, one line per child
            page.goto(f"{link}?compareRunsMode=CHART", timeout=60_000)
            page.get_by_placeholder("Search metric charts").fill("online/knn_top1")
            for name in children:
                page.get_by_text(f"{name} (online/knn_top1)").first.wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "mlflow_ui_online_knn.png"))
            # the compare link: MLflow's own comparison of the sweep's trials (parallel coordinates, a metrics table)
            child_ids = sorted(r["info"]["run_id"] for r, t in zip(runs, tags) if t.get("mlflow.parentRunId") == parent_id)
            assert compare.startswith(f"{base}/#/compare-runs?runs=[") and all(run_id in compare for run_id in child_ids)
            page.goto(compare, timeout=60_000)
            page.get_by_text("Comparing 2 Runs from 1 Experiment").first.wait_for(timeout=60_000)
            for name in children:
                page.get_by_text(name).first.wait_for(timeout=30_000)
            page.screenshot(path=str(ARTIFACTS / "mlflow_ui_compare.png"))
            browser.close()
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
