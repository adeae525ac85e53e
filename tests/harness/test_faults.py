"""Faults a cluster user meets, each tried for real: concurrent writers on a new store, SIGTERM to `run` and
then --resume into the same run, SIGTERM and kill -9 to `ui`, a half-written checkpoint, a store that cannot be
opened, a bad --resume, and Ray's processes after kill -9 of the process that started them.

Sweeps under SIGTERM and kill -9, and a sweep logging to a tracking server, are in tests/harness/test_sweep_ray.py.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.cli import main
from harness.launch import reaper
from harness.track.mlflow import metric_history, search_runs
from tests.helpers.processes import answers, free_port, pids_with, started, stop, wait_until
from tests.helpers.runs import FAST_EVAL, REPO, TINY, env_for, harness_cmd, new_store

# ----------------------------------------------------------------------------- concurrent writers


@pytest.mark.slow  # four training processes
def test_four_runs_started_together_on_a_new_store_all_finish(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'new.db'}"
    procs = [
        subprocess.Popen(
            harness_cmd("-q", "run", str(REPO / "configs/simclr_shapes.yaml"), *TINY, *FAST_EVAL, "tracking.experiment=concurrent", f"seed={i}", f"pretrain.checkpoint_dir={tmp_path / str(i)}"),
            cwd=tmp_path, env={**env_for(uri), "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # one thread each: 4 processes share 2 cores
        for i in range(4)
    ]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, [err[-800:] for _, err in results]
    runs = search_runs("concurrent", uri)
    assert len(runs) == 4 and {r["status"] for r in runs} == {"FINISHED"}
    for r in runs:  # complete histories: every epoch once, and the final metrics
        assert [step for step, _ in metric_history(r["run_id"], "train/loss", uri)] == [1, 2]
        assert "eval/knn/top1" in r["metrics"]
    assert sorted(r["params"]["seed"] for r in runs) == [str(i) for i in range(4)]


def test_a_store_that_cannot_be_opened_is_one_line_exit_2_and_no_run(tmp_path, tiny_overrides, capsys) -> None:
    db = tmp_path / "broken.db"
    db.write_bytes(b"this is not a database" * 100)
    code = main(["-q", "run", str(REPO / "configs/simclr_shapes.yaml"), *tiny_overrides, f"tracking.uri=sqlite:///{db}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: tracking.uri: ") and str(db) in err[0], err
    assert db.read_bytes() == b"this is not a database" * 100  # left as it was


def test_a_store_whose_folder_cannot_be_written_is_one_line_exit_2(tmp_path, tiny_overrides, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = "/proc/mlflow.db"  # a folder nobody may create files in, root included
    code = main(["-q", "run", str(REPO / "configs/simclr_shapes.yaml"), *tiny_overrides, f"tracking.uri=sqlite:///{store}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith(f"error: tracking.uri: cannot write in the folder of {store} ("), err


def test_a_read_only_store_is_one_line_exit_2(tmp_path, tiny_overrides, capsys, monkeypatch) -> None:
    import harness.track.mlflow as adapter

    db = tmp_path / "ro.db"
    db.write_bytes(b"")
    real = os.access  # mode 0444 stops every user but root, who may run this test: the check is stood in for
    monkeypatch.setattr(adapter.os, "access", lambda path, mode: False if Path(path) == db else real(path, mode))
    code = main(["-q", "run", str(REPO / "configs/simclr_shapes.yaml"), *tiny_overrides, f"tracking.uri=sqlite:///{db}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [f"error: tracking.uri: {db} is read-only for this user; every run writes to its store: make it writable or point tracking.uri elsewhere"]


def test_a_store_deleted_while_a_run_logs_is_one_line_exit_1(tmp_path, tiny_overrides, capsys, monkeypatch) -> None:
    """SQLite writes on into the unlinked file without an error: the run's record is gone, and the run says so."""
    import harness.trial.run as trial_run

    db = tmp_path / "gone.db"
    evaluate = trial_run.evaluate

    def delete_then_evaluate(*args, **kwargs):
        db.unlink()
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(trial_run, "evaluate", delete_then_evaluate)
    code = main(["-q", "run", str(REPO / "configs/simclr_shapes.yaml"), *tiny_overrides, *FAST_EVAL, f"tracking.uri=sqlite:///{db}"])
    out, err = capsys.readouterr()
    assert code == 1 and "eval/knn/top1" not in out  # no results printed as if they were recorded
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: tracking.uri: the store {db} was deleted or replaced while run ") and line.endswith(
        "was logging: its record is lost (its checkpoint stays); keep the store in place during runs"
    ), line


def test_a_failed_run_says_why_in_its_tags(tmp_path, tiny_overrides, monkeypatch) -> None:
    import harness.trial.run as trial_run

    def broken(*args, **kwargs):
        raise ValueError("the battery broke")

    monkeypatch.setattr(trial_run, "evaluate", broken)
    uri = new_store(tmp_path / "m.db")
    assert main(["-q", "run", str(REPO / "configs/simclr_shapes.yaml"), *tiny_overrides, *FAST_EVAL, f"tracking.uri={uri}", "tracking.experiment=broken"]) == 1
    (run,) = search_runs("broken", uri)
    assert run["status"] == "FAILED" and run["tags"]["harness.error"] == "ValueError: the battery broke"


# ----------------------------------------------------------------------------- SIGTERM to run, then --resume


@pytest.mark.slow  # two training processes, one after the other
def test_sigterm_to_run_marks_it_killed_and_resume_continues_the_same_run(tmp_path) -> None:
    uri = new_store(tmp_path / "mlflow.db")
    ckpt_dir = tmp_path / "ckpt"
    args = ["run", str(REPO / "configs/simclr_shapes.yaml"), *TINY, *FAST_EVAL, "data.num_train=512", "pretrain.epochs=6", "tracking.experiment=term", "tracking.run_name=a run", f"pretrain.checkpoint_dir={ckpt_dir}"]
    with started(harness_cmd("-q", *args), cwd=tmp_path, env=env_for(uri), stderr_apart=True) as proc:
        wait_until(lambda: (ckpt_dir / "checkpoint.pt").is_file() or proc.poll() is not None, 300, "no checkpoint")
        code, err = stop(proc, signal.SIGTERM)
    assert code == 143, err
    assert "interrupted by SIGTERM" in err and f"--resume {ckpt_dir / 'checkpoint.pt'}" in err
    hint = err.split("continue it with: ", 1)[1].splitlines()[0]  # pasteable: a shell splits it into the same words
    assert shlex.split(hint) == ["python", "-m", "harness", *args, "--resume", str(ckpt_dir / "checkpoint.pt")]
    (killed,) = search_runs("term", uri)
    assert killed["status"] == "KILLED" and killed["tags"]["harness.stopped"] == "SIGTERM"
    assert killed["tags"]["checkpoint"] == str(ckpt_dir / "checkpoint.pt")  # absolute: `eval RUN_ID` works from anywhere
    epochs_before = [step for step, _ in metric_history(killed["run_id"], "train/loss", uri)]
    assert 1 <= len(epochs_before) < 6
    assert not list(ckpt_dir.glob(".checkpoint.pt.tmp.*"))

    resumed = subprocess.run(harness_cmd("-q", *args, "--resume", str(ckpt_dir / "checkpoint.pt")), cwd=tmp_path, env=env_for(uri), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    (run,) = search_runs("term", uri)  # the same run, not a second one
    assert run["run_id"] == killed["run_id"] and run["status"] == "FINISHED"
    assert "harness.stopped" not in run["tags"] and run["tags"]["harness.resumed_after"] == "SIGTERM"
    history = metric_history(run["run_id"], "train/loss", uri)
    assert [step for step, _ in history] == [1, 2, 3, 4, 5, 6]  # continuous, no epoch twice
    assert history[: len(epochs_before)] == metric_history(killed["run_id"], "train/loss", uri)[: len(epochs_before)]
    for key in ("baseline/raw_pixels/knn_top1", "baseline/random_init/knn_top1"):  # computed once
        assert len(metric_history(run["run_id"], key, uri)) == 1


@pytest.mark.parametrize("make_bad", ["missing", "code"])
def test_a_bad_resume_checkpoint_is_exit_2_and_opens_no_run(tmp_path, tiny_overrides, tracking_uri, capsys, recwarn, make_bad) -> None:
    path = tmp_path / "bad.pt"
    if make_bad == "code":

        class Boom:
            def __reduce__(self):
                return (os.system, (f"touch {tmp_path / 'executed'}",))

        path.write_bytes(pickle.dumps({"model": Boom()}))
    code = main(["-q", "run", str(REPO / "configs/simclr_shapes.yaml"), *tiny_overrides, "tracking.experiment=badresume", "--resume", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: pretrain.resume: ") and str(path) in err[0], err
    assert search_runs("badresume", tracking_uri) == []
    assert not (tmp_path / "executed").exists()
    assert not [str(w.message) for w in recwarn if issubclass(w.category, UserWarning)]  # outside pytest a warning is more lines on stderr


def test_a_failed_save_keeps_the_last_checkpoint_and_leaves_no_temporary_file(tmp_path, tiny_overrides, monkeypatch) -> None:
    from harness.config.loading import load_config
    from harness.train import checkpoint as train
    from harness.trial.prepare import prepare

    cfg = load_config(REPO / "configs/simclr_shapes.yaml", tiny_overrides)
    trial = prepare(cfg)
    optimizer = torch.optim.SGD(trial.method.parameters(), lr=0.1)
    path = tmp_path / "ckpt" / "checkpoint.pt"
    train.save_checkpoint(path, trial.method, optimizer, 1, [1.0], cfg, {})
    (path.parent / ".checkpoint.pt.tmp.99999").write_bytes(b"")  # left by a process killed while saving
    good = path.read_bytes()

    def interrupted(obj, f) -> None:
        Path(f).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(train.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(path, trial.method, optimizer, 2, [1.0, 0.9], cfg, {})
    assert path.read_bytes() == good
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]


def test_a_full_disk_while_saving_says_so_and_keeps_the_last_checkpoint(tmp_path, tiny_overrides, monkeypatch) -> None:
    import errno

    from harness.config.loading import load_config
    from harness.train import checkpoint as train
    from harness.trial.prepare import prepare

    cfg = load_config(REPO / "configs/simclr_shapes.yaml", tiny_overrides)
    trial = prepare(cfg)
    optimizer = torch.optim.SGD(trial.method.parameters(), lr=0.1)
    path = tmp_path / "ckpt" / "checkpoint.pt"
    train.save_checkpoint(path, trial.method, optimizer, 1, [1.0], cfg, {})
    good = path.read_bytes()

    def full(obj, f) -> None:  # what PyTorch's zip writer raises when a write comes up short
        Path(f).write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4096 vs 3840")

    monkeypatch.setattr(train.torch, "save", full)
    with pytest.raises(OSError, match=rf"^\[Errno {errno.ENOSPC}\] no space left on the disk of {path.parent} while writing the checkpoint of epoch 2 \(\d+ MB free; the checkpoint of the epoch before is kept\)") as info:
        train.save_checkpoint(path, trial.method, optimizer, 2, [1.0, 0.9], cfg, {})
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == good
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]


# ----------------------------------------------------------------------------- processes the harness starts


@pytest.mark.slow  # MLflow's UI server
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_ui_leaves_no_process_and_frees_the_port(tmp_path, sig) -> None:
    port = free_port()
    uri = new_store(tmp_path / "mlflow.db")
    try:
        with started(harness_cmd("ui", "--port", str(port)), cwd=tmp_path, env=env_for(uri), output=False) as proc:
            wait_until(lambda: answers(f"http://127.0.0.1:{port}"), 120, "the UI did not answer")
            assert len(pids_with(f"--port {port}")) >= 2  # mlflow's process and its server's
            code, _ = stop(proc, sig, 60)
            wait_until(lambda: not pids_with(f"--port {port}"), 30, f"processes left: {pids_with(f'--port {port}')}")
    finally:
        for pid in pids_with(f"--port {port}"):
            os.kill(pid, signal.SIGKILL)
    assert code == (143 if sig == signal.SIGTERM else -9)
    assert not answers(f"http://127.0.0.1:{port}")
    with socket.socket() as s:  # free again for a new server (which, like MLflow's, reuses an address in TIME_WAIT)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def test_the_reaper_ends_what_holds_the_session_after_kill_9(tmp_path) -> None:
    """A driver that watched a folder is killed outright: the process it left holding a file there is ended."""
    session = tmp_path / "session"
    session.mkdir()
    child_code = f"import time; f = open({str(session / 'log')!r}, 'w'); time.sleep(300)"
    driver_code = (
        "import subprocess, sys, time\n"
        "from harness.launch import reaper\n"
        f"reaper.watch({str(session)!r})\n"
        f"child = subprocess.Popen([sys.executable, '-c', {child_code!r}], start_new_session=True)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(300)\n"
    )
    driver = subprocess.Popen([sys.executable, "-c", driver_code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    orphan = int(driver.stdout.readline())
    try:
        wait_until(lambda: orphan in reaper.holders(str(session)), 30, "the child did not open its file")
        driver.kill()
        driver.wait(timeout=10)
        wait_until(lambda: not reaper.holders(str(session)), 30, "the reaper did not end the orphan")
    finally:
        for pid in (orphan, *reaper.holders(str(session))):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
