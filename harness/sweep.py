"""Sweeps: one YAML ablation -> one trial per point and seed, scheduled by Ray Tune -> MLflow parent and child runs -> tables.

    # sweeps/temperature.yaml
    name: temperature                      # the MLflow experiment and the results/ folder
    base: ../configs/simclr_shapes.yaml    # a run config (relative to this file)
    run: {pretrain: {epochs: 8}}           # overrides on top of base
    space:
      method.temperature: {grid: [0.05, 0.1, 0.2, 0.5, 1.0]}
    seeds: [0, 1]                          # every point runs once per seed

    python -m harness sweep sweeps/temperature.yaml [key=value ...] [--resume]

A swept key is any dotted key of the run config. Domains: ``grid`` (every value),
``choice`` (drawn), ``uniform`` and ``loguniform`` (drawn), ``cases`` (a grid whose
points set several keys at once, :class:`Domain`); ``num_samples`` draws
of the random domains are crossed with the grids, and every point is repeated
for each seed. Everything is validated (every trial's run config built) before
Ray starts; each trial then runs exactly what ``harness run`` runs
(:func:`harness.run.prepare` and :func:`harness.run.execute`).

MLflow: the driver opens the parent run and one child run per trial (status
SCHEDULED) before any trial starts; trials log into their child; the driver sets
each child's final status (FINISHED, FAILED, or KILLED when stopped early or
interrupted), so no run is left RUNNING and none is duplicated across retries or
``--resume``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from harness import raytune
from harness.config import RunConfig, Section, _first_error, build_config, flatten, parse_overrides, read_yaml, set_values
from harness.errors import BadInput, ConfigError, RunFailed, suggest
from harness.provenance import git_commit
from harness.tracking import absolute_uri, create_run, open_run, search_runs, tracking_uri

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
TAG_SWEEP, TAG_TRIAL, TAG_SWEPT_KEYS = "harness.sweep", "harness.trial", "harness.swept_keys"
SWEPT_TAG_PREFIX = "swept."
FINISHED_KEY = "trial/finished"
"""Reported (value 1) by a trial after its evaluation: a trial that ends without it was stopped early."""


# ----------------------------------------------------------------------------- schema


class Domain(Section):
    """Values of one swept key: exactly one of ``grid``, ``choice``, ``uniform``, ``loguniform``, ``cases``.

    ``cases`` is a grid whose points each set several run keys at once, e.g. a method
    together with its own optimiser; the swept key is then only the label of the column
    (the value a case gives that key, or the case itself, names the point)::

        method:
          cases:
            - {method: {name: simclr, temperature: 0.2}}
            - {method: {name: barlow_twins}, pretrain.optimizer: lars, pretrain.base_lr: 0.2}

    Every key of a case is set as if it were swept alone (a mapping replaces the section it
    names; a dotted key changes one value).
    """

    grid: list[Any] | None = Field(None, min_length=1)
    cases: list[dict[str, Any]] | None = Field(None, min_length=1)
    choice: list[Any] | None = Field(None, min_length=1)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None

    @model_validator(mode="before")
    @classmethod
    def _bare_list_is_grid(cls, v: Any) -> Any:
        if isinstance(v, list):
            return {"grid": v}
        if not isinstance(v, dict):
            raise ValueError("expected {grid: [...]}, {choice: [...]}, {uniform: [lo, hi]}, {loguniform: [lo, hi]} or {cases: [{key: value, ...}, ...]}")
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> Domain:
        given = [k for k in ("grid", "choice", "uniform", "loguniform", "cases") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of grid, choice, uniform, loguniform, cases (got {', '.join(given) or 'none'})")
        if self.cases is not None and any(not case for case in self.cases):
            raise ValueError("cases: every case sets at least one run key")
        if self.uniform is not None and not self.uniform[0] < self.uniform[1]:
            raise ValueError(f"uniform: need lo < hi (got {list(self.uniform)})")
        if self.loguniform is not None:
            lo, hi = self.loguniform
            if lo <= 0 or hi <= 0:
                raise ValueError(f"loguniform: bounds must be positive (got {[lo, hi]})")
            if not lo < hi:
                raise ValueError(f"loguniform: need lo < hi (got {[lo, hi]})")
        return self

    @property
    def random(self) -> bool:
        return self.grid is None and self.cases is None

    def points(self) -> list[Any]:
        """Every value of a grid-like domain (grid or cases)."""
        return list(self.grid or self.cases or [])

    def bounds(self) -> list[Any]:
        """The values a trial config must accept: every grid/choice value or case, or both ends of a range."""
        return list(self.grid or self.cases or self.choice or self.uniform or self.loguniform or [])

    def run_values(self, key: str, value: Any) -> dict[str, Any]:
        """The run-config keys one value of this domain sets: ``{key: value}``, or a case's keys."""
        return dict(value) if self.cases is not None else {key: value}

    def label(self, key: str, value: Any) -> Any:
        """What names the value in trial names, tags and tables: the value, or what a case sets ``key`` to
        (the whole case when it does not set it, or when another case sets it to the same)."""
        if self.cases is None:
            return value
        labels = [json.dumps(case.get(key, case), sort_keys=True) for case in self.cases]
        return value.get(key, value) if len(set(labels)) == len(labels) else value

    def draw(self, rng: np.random.Generator) -> Any:
        if self.choice is not None:
            return self.choice[int(rng.integers(len(self.choice)))]
        if self.uniform is not None:
            return float(rng.uniform(*self.uniform))
        lo, hi = self.loguniform  # type: ignore[misc]
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


class Resources(Section):
    """What one trial gets: CPUs (also its torch threads) and GPUs (fractions share one GPU)."""

    cpus: float = Field(1.0, gt=0)
    gpus: float = Field(0.0, ge=0)


class SchedulerConfig(Section):
    """FIFO runs every trial to the end; ASHA stops poor trials early on an online metric."""

    name: Literal["fifo", "asha"] = "fifo"
    metric: str | None = None
    """A metric every trial reports each epoch, e.g. ``train/loss``."""
    mode: Literal["min", "max"] = "min"
    grace_period: int = Field(1, ge=1)
    """Epochs every trial runs before it may be stopped."""
    reduction_factor: float = Field(2.0, gt=1)

    @model_validator(mode="after")
    def _asha_needs_metric(self) -> SchedulerConfig:
        if self.name == "asha" and not self.metric:
            raise ValueError("asha needs a metric reported every epoch, e.g. metric: train/loss")
        return self


class SweepConfig(Section):
    """One ablation: a base run config, a search space, seeds, and how to schedule the trials."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """The MLflow experiment and the folder under ``results/``."""
    base: Path | None = None
    """A run config YAML the trials start from (relative to the sweep file)."""
    run: dict[str, Any] = Field(default_factory=dict)
    """Run-config keys set on top of ``base`` for every trial."""
    space: dict[str, Domain] = Field(min_length=1)
    """Dotted run-config key -> domain."""
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    num_samples: int = Field(1, ge=1)
    """Draws of the random domains (crossed with the grids)."""
    sample_seed: int = 0
    """Seed of those draws, so a sweep's points are reproducible."""
    resources: Resources = Field(default_factory=Resources)
    max_concurrent: int | None = Field(None, ge=1)
    """At most this many trials at once (default: as many as the resources allow)."""
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    max_failures: int = Field(0, ge=0)
    """Retries of a failed trial, from its last checkpoint."""
    address: str | None = None
    """An existing Ray cluster (HOST:PORT, ray://HOST:PORT or auto); else ``RAY_ADDRESS``; else a local instance."""
    storage: Path = Path("outputs/sweeps")
    """Where Ray Tune keeps trial state and checkpoints (a shared filesystem on a cluster)."""
    headline: list[str] = Field(default_factory=lambda: ["eval/knn/top1"], min_length=1)
    """Metrics plotted against each numeric swept key."""

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct (got {v})")
        return v

    @field_validator("space")
    @classmethod
    def _no_seed_in_space(cls, v: dict[str, Domain]) -> dict[str, Domain]:
        if "seed" in v:
            raise ValueError("sweep seeds with the top-level 'seeds' list, not in space")
        return v

    @model_validator(mode="after")
    def _samples_need_randomness(self) -> SweepConfig:
        if self.num_samples > 1 and not any(d.random for d in self.space.values()):
            raise ValueError(f"num_samples: {self.num_samples} draws need a choice, uniform or loguniform domain in space (seeds repeat grid points)")
        return self


@dataclass(frozen=True)
class TrialSpec:
    """One trial: a point of the search space and a seed."""

    point: dict[str, Any]
    seed: int
    labels: dict[str, Any] = field(default_factory=dict)
    """How each point value is named (a case by what it sets its key to); the values themselves by default."""

    @property
    def point_key(self) -> str:
        return " ".join(f"{k}={json.dumps(self.labels.get(k, v))}" for k, v in self.point.items())

    @property
    def key(self) -> str:
        return f"{self.point_key} seed={self.seed}"


@dataclass
class Sweep:
    """A validated sweep: its config, the base run config (raw), and one resolved RunConfig per trial."""

    cfg: SweepConfig
    source: Path | None
    text: str
    trials: list[TrialSpec]
    configs: dict[str, RunConfig] = field(default_factory=dict)

    @property
    def keys(self) -> list[str]:
        return [t.key for t in self.trials]


# ----------------------------------------------------------------------------- loading and expansion


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Read, override and validate a sweep YAML, expand it and build every trial's run config (ConfigError on anything wrong)."""
    path = Path(path)
    raw = read_yaml(path)
    raw = apply_sweep_overrides(raw, overrides)
    try:
        cfg = SweepConfig(**raw)
    except ValidationError as err:
        raise ConfigError(_first_error(err, SweepConfig)) from None
    run_raw = _merge(read_yaml(_relative(cfg.base, path)) if cfg.base else {}, cfg.run)
    run_raw = set_values(run_raw, {"tracking.experiment": cfg.name}, RunConfig)
    sweep = Sweep(cfg, path, path.read_text(), expand(cfg))
    for key, domain in cfg.space.items():  # every value (or both ends of a range) must make a valid run config
        for value in domain.bounds():
            _build(run_raw, domain.run_values(key, value), f"space.{key}")
    for trial in sweep.trials:
        values = {k: v for key, value in trial.point.items() for k, v in cfg.space[key].run_values(key, value).items()}
        sweep.configs[trial.key] = _build(run_raw, {**values, "seed": trial.seed, "tracking.run_name": trial.key}, "space")
    return sweep


def apply_sweep_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``key=value`` on the command line: sweep keys (``max_concurrent=1``, ``seeds=[0]``,
    ``space.method.temperature=[0.1,0.2]``) or run-config keys (``pretrain.epochs=2``, set under ``run``)."""
    values = parse_overrides(overrides, example="max_concurrent=1 or pretrain.epochs=2")
    raw = json.loads(json.dumps(raw, default=str))  # a deep copy of plain YAML data
    for key, value in values.items():
        head, _, rest = key.partition(".")
        if head in RunConfig.model_fields:
            raw["run"] = set_values(raw.get("run") or {}, {key: value}, RunConfig)
        elif head == "run" and rest:
            raw["run"] = set_values(raw.get("run") or {}, {rest: value}, RunConfig)
        elif head == "space" and rest:
            raw.setdefault("space", {})[rest] = value
        elif key in SweepConfig.model_fields or head in ("resources", "scheduler"):
            raw = set_values(raw, {key: value}, SweepConfig)
        else:
            known = list(SweepConfig.model_fields) + list(RunConfig.model_fields)
            raise ConfigError(f"override {key}: unknown key {key!r}{suggest(key, known, n=1)}")
    return raw


def expand(cfg: SweepConfig) -> list[TrialSpec]:
    """Every (point, seed): the grids' product crossed with ``num_samples`` draws of the random domains, times the seeds."""
    grid_keys = [k for k, d in cfg.space.items() if not d.random]
    random_keys = [k for k, d in cfg.space.items() if d.random]
    rng = np.random.default_rng(cfg.sample_seed)
    draws = [{k: cfg.space[k].draw(rng) for k in random_keys} for _ in range(cfg.num_samples)]
    combos = [dict(zip(grid_keys, values)) for values in itertools.product(*(cfg.space[k].points() for k in grid_keys))]
    points = [{k: {**combo, **draw}[k] for k in cfg.space} for draw in draws for combo in combos]
    labelled = [(point, {k: cfg.space[k].label(k, v) for k, v in point.items()}) for point in points]
    return [TrialSpec(point, seed, labels) for point, labels in labelled for seed in cfg.seeds]


def _build(run_raw: dict[str, Any], values: dict[str, Any], where: str) -> RunConfig:
    raw = set_values(run_raw, values, RunConfig, what=where)
    try:
        return build_config(raw)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Nested dict merge: ``over`` wins; mappings merge key by key."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _relative(path: Path, sweep_file: Path) -> Path:
    return path if path.is_absolute() else (sweep_file.parent / path)


# ----------------------------------------------------------------------------- the driver


@dataclass
class SweepOutcome:
    parent_run_id: str
    finished: list[str]
    failed: dict[str, str]
    stopped: list[str]
    interrupted: list[str]
    wall_s: float

    @property
    def exit_code(self) -> int:
        return 130 if self.interrupted else (1 if self.failed else 0)


def run_sweep(sweep: Sweep, *, resume: bool = False, verbose: int = 1) -> SweepOutcome:
    """Run (or resume) a validated sweep to the end; returns what became of each trial."""
    cfg = sweep.cfg
    uri = absolute_uri(tracking_uri(next(iter(sweep.configs.values())).tracking.uri))
    root = cfg.storage.resolve() / cfg.name
    state_path = root / STATE_FILE
    if resume:
        state = _load_state(state_path, sweep, uri)
    else:
        _check_preparable(sweep)
        address = raytune.cluster_address(cfg.address)
        if address:
            raytune.check_address(address)
        state = _new_state(sweep, uri, root)
    parent = open_run(state["parent_run_id"], uri)
    children = {key: open_run(run_id, uri) for key, run_id in state["trials"].items()}
    parent.set_status("RUNNING")
    todo = [k for k in sweep.keys if children[k].info()["status"] != "FINISHED"]
    for key in todo:
        children[key].set_status("SCHEDULED")
    specs = {key: {"run": _trial_run_dict(sweep.configs[key]), "run_id": children[key].run_id, "uri": uri, "cpus": cfg.resources.cpus} for key in sweep.keys}

    stopped: list[str] = []
    done = [len(sweep.keys) - len(todo)]
    t0 = time.perf_counter()

    def say(key: str, what: str) -> None:
        if verbose:
            print(f"[{done[0]}/{len(sweep.keys)} {time.perf_counter() - t0:5.0f} s] {key}: {what}", flush=True)

    def on_start(key: str) -> None:
        children[key].set_status("RUNNING")
        say(key, "started")

    def on_complete(key: str, result: dict[str, Any]) -> None:
        done[0] += 1
        if result.get(FINISHED_KEY):
            children[key].end("FINISHED")
            say(key, "finished  " + "  ".join(f"{m} {result[m]:.4f}" for m in cfg.headline if m in result))
        else:
            stopped.append(key)
            children[key].set_tags({"harness.stopped": f"stopped early by the scheduler after epoch {result.get('epoch', '?')}"})
            children[key].end("KILLED")
            say(key, f"stopped early by the scheduler after epoch {result.get('epoch', '?')}")

    def on_error(key: str, error: str) -> None:
        if children[key].info()["status"] == "FAILED":
            return
        done[0] += 1
        children[key].set_tags({"harness.error": error[:5000]})
        children[key].end("FAILED")
        say(key, f"FAILED: {error}")

    def on_recover(key: str, error: str) -> None:
        children[key].set_tags({"harness.last_retry_error": error[:5000]})
        children[key].set_status("SCHEDULED")
        say(key, f"retrying after: {error}")

    events = raytune.TrialEvents(on_start=on_start, on_recover=on_recover, on_complete=on_complete, on_error=on_error)
    epochs = max(c.pretrain.epochs for c in sweep.configs.values())
    scheduler = cfg.scheduler.model_dump() | {"max_t": epochs + 1}  # +1: the evaluation's report after the last epoch
    started = raytune.init(cfg.address)
    try:
        outcome = raytune.run_trials(
            train_trial, sweep.keys, name=state["tune_name"], storage=root, cpus=cfg.resources.cpus, gpus=cfg.resources.gpus,
            max_concurrent=cfg.max_concurrent, scheduler=scheduler, max_failures=cfg.max_failures, events=events,
            resume=resume, specs=specs,
        )  # fmt: skip
    except Exception as err:  # Tune itself failed: no trial may stay SCHEDULED or RUNNING
        for key in todo:
            if children[key].info()["status"] not in ("FINISHED", "FAILED", "KILLED"):
                children[key].set_tags({"harness.error": f"sweep failed: {err}"[:5000]})
                children[key].end("FAILED")
        parent.set_tags({"harness.error": str(err)[:5000]})
        parent.end("FAILED")
        raise RunFailed(f"sweep {cfg.name!r} failed: {raytune.one_line(err)}") from err
    finally:
        if started:
            raytune.shutdown()

    finished = [k for k in todo if k in outcome.results and outcome.results[k].get(FINISHED_KEY)]
    finished += [k for k in sweep.keys if k not in todo]
    failed = {k: outcome.errors[k] for k in sweep.keys if k in outcome.errors}
    interrupted = [k for k in todo if k not in finished and k not in failed and k not in stopped]
    for key in interrupted:  # never started, or cut off by Ctrl-C: resumable
        if children[key].info()["status"] not in ("FINISHED", "FAILED", "KILLED"):
            children[key].set_tags({"harness.stopped": "sweep interrupted; resume with --resume"})
            children[key].end("KILLED")
    for key, error in failed.items():  # the callback may not have run for a trial whose error surfaced at the end
        on_error(key, error)
    parent.log_metrics({"sweep/trials_finished": len(finished), "sweep/trials_failed": len(failed), "sweep/wall_s": outcome.wall_s})
    parent.end("KILLED" if interrupted else ("FAILED" if failed else "FINISHED"))
    state["complete"] = not interrupted
    _write_json(state_path, state)
    return SweepOutcome(state["parent_run_id"], finished, failed, stopped, interrupted, outcome.wall_s)


def _check_preparable(sweep: Sweep) -> None:
    """Build data and model once per distinct (data, backbone, method) so a missing dataset or an unknown
    backbone is bad input before Ray starts, not a failure in every trial."""
    from harness.run import prepare

    seen: set[str] = set()
    for cfg in sweep.configs.values():
        sig = json.dumps([cfg.data.model_dump(mode="json"), cfg.backbone.model_dump(mode="json"), cfg.method["name"], cfg.pretrain.batch_size])
        if sig not in seen:
            seen.add(sig)
            prepare(cfg)


def _trial_run_dict(cfg: RunConfig) -> dict[str, Any]:
    d = cfg.as_dict()
    if d["data"].get("root"):
        d["data"]["root"] = str(Path(d["data"]["root"]).resolve())
    return d


def _new_state(sweep: Sweep, uri: str, root: Path) -> dict[str, Any]:
    """Open the parent run and one SCHEDULED child per trial; write the state file that ``--resume`` reads."""
    cfg = sweep.cfg
    swept = list(cfg.space)
    parent = create_run(cfg.name, run_name=f"{cfg.name} sweep", uri=uri, tags={TAG_SWEEP: cfg.name, TAG_SWEPT_KEYS: json.dumps(swept), "harness.headline": json.dumps(cfg.headline), "git_commit": git_commit(), "harness.role": "sweep"})
    parent.log_params({"sweep.space": json.dumps({k: v.model_dump(exclude_none=True) for k, v in cfg.space.items()}), "sweep.seeds": cfg.seeds, "sweep.num_samples": cfg.num_samples, "sweep.trials": len(sweep.trials), "sweep.scheduler": cfg.scheduler.name, "sweep.max_concurrent": cfg.max_concurrent, "sweep.resources.cpus": cfg.resources.cpus, "sweep.resources.gpus": cfg.resources.gpus})
    parent.log_text(sweep.text, f"sweep/{sweep.source.name if sweep.source else 'sweep.yaml'}")
    parent.log_text(yaml.safe_dump(sweep.configs[sweep.keys[0]].as_dict(), sort_keys=False), "sweep/first_trial_config.yaml")
    from harness.run import log_run_inputs, run_tags  # noqa: PLC0415 - run imports torch; keep this module light to import

    trials = {}
    for trial in sweep.trials:
        run_cfg = sweep.configs[trial.key]
        tags = run_tags(run_cfg) | {TAG_SWEEP: cfg.name, TAG_TRIAL: trial.key, "harness.point": trial.point_key}
        tags |= {SWEPT_TAG_PREFIX + k: json.dumps(trial.labels.get(k, v)) for k, v in trial.point.items()}
        child = create_run(cfg.name, run_name=trial.key, uri=uri, tags=tags, parent_run_id=parent.run_id)
        log_run_inputs(child, run_cfg)
        child.set_status("SCHEDULED")
        trials[trial.key] = child.run_id
    state = {"sweep": cfg.name, "tune_name": time.strftime("%Y%m%d-%H%M%S"), "parent_run_id": parent.run_id, "uri": uri, "trials": trials, "digest": _digest(sweep), "complete": False}
    _write_json(root / STATE_FILE, state)
    return state


def _load_state(state_path: Path, sweep: Sweep, uri: str) -> dict[str, Any]:
    """The saved state of an interrupted sweep, checked against the sweep as it is now."""
    name = sweep.cfg.name
    if not state_path.is_file():
        raise BadInput(f"--resume: nothing to resume for sweep {name!r}: no saved state at {state_path}")
    state = json.loads(state_path.read_text())
    if state.get("digest") != _digest(sweep):
        raise BadInput(f"--resume: sweep {name!r} changed since it started (its trials or their configs differ); run it without --resume to start again")
    if state["uri"] != uri:
        raise BadInput(f"--resume: sweep {name!r} logged to {state['uri']}, not {uri}; set tracking.uri or MLFLOW_TRACKING_URI to it")
    statuses = {r["run_id"]: r["status"] for r in search_runs(name, uri, f"tags.`mlflow.parentRunId` = '{state['parent_run_id']}'")}
    if statuses and all(statuses.get(run_id) == "FINISHED" for run_id in state["trials"].values()):
        raise BadInput(f"--resume: nothing to resume for sweep {name!r}: all {len(state['trials'])} trials finished; run it without --resume to start again")
    if not raytune.can_restore(state_path.parent / state["tune_name"]):
        raise BadInput(f"--resume: nothing to resume for sweep {name!r}: no Ray Tune state at {state_path.parent / state['tune_name']}")
    return state


def _digest(sweep: Sweep) -> str:
    """What must not change between a sweep and its resumption: the trials and their run configs."""
    ignore = ("pretrain.progress",)
    body = {k: {p: v for p, v in flatten(c.as_dict()).items() if p not in ignore} for k, c in sweep.configs.items()}
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


# ----------------------------------------------------------------------------- the trial (runs in a Ray worker)


def train_trial(config: dict[str, Any], specs: dict[str, dict[str, Any]]) -> None:
    """One Tune trial: exactly what ``harness run`` does, logging into the child run the driver opened.

    Reports ``train/*`` every epoch with the epoch's checkpoint (so a retried or
    resumed trial continues from it) and, after the evaluation, the final metrics
    with :data:`FINISHED_KEY`. When a scheduler stops the trial, the report raises
    ``SystemExit`` and nothing after the training loop runs; the driver marks it.
    """
    import torch

    from harness.run import execute, prepare

    logging.getLogger("ray").setLevel(logging.WARNING)
    key = raytune.trial_key(config)
    spec = specs[key]
    torch.set_num_threads(max(1, int(spec["cpus"])))
    cfg = build_config(spec["run"])
    # Working files live outside the trial folder: Ray syncs that folder to storage in the background.
    work = Path(tempfile.mkdtemp(prefix="harness-trial-"))
    try:
        restored = raytune.restored_checkpoint(work / "restored")
        cfg.pretrain.checkpoint_dir = work / "checkpoint"
        cfg.pretrain.progress = False
        if restored is not None:
            cfg.pretrain.resume = restored / "checkpoint.pt"
        mlrun = open_run(spec["run_id"], spec["uri"])
        mlrun.set_status("RUNNING")
        if restored is not None:
            mlrun.set_tags({"harness.resumed": "from the trial's last checkpoint"})

        last: dict[str, float] = {}

        def on_epoch_end(epoch: int, metrics: dict[str, float], checkpoint: Path | None) -> None:
            last.update(metrics)
            raytune.report({**metrics, "epoch": epoch}, checkpoint_dir=checkpoint.parent if checkpoint else None)

        trial = prepare(cfg)
        metrics = execute(trial, mlrun, on_epoch_end=on_epoch_end)
        # the last epoch's online metrics again, so a scheduler finds its metric in the final report too
        raytune.report({**last, **metrics, "epoch": cfg.pretrain.epochs, FINISHED_KEY: 1})
    finally:
        shutil.rmtree(work, ignore_errors=True)  # Tune keeps its own copy of the last checkpoint


def child_runs(experiment: str, parent_run_id: str, uri: str | None = None) -> list[dict[str, Any]]:
    """The child runs of one sweep invocation."""
    return search_runs(experiment, uri, f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def latest_parent(experiment: str, uri: str | None = None) -> dict[str, Any] | None:
    """The newest sweep parent run of an experiment, or None."""
    runs = search_runs(experiment, uri, "tags.`harness.role` = 'sweep'")
    return runs[0] if runs else None
