"""A sweep's YAML: its schema, command-line overrides, and its expansion into one run config per trial.

A sweep names a ``base`` run config, ``run`` overrides on top of it, a ``space`` of swept dotted keys and the
``seeds`` every point runs with. Domains: ``grid`` (every value), ``choice``, ``uniform`` and ``loguniform`` (drawn),
``cases`` (a grid whose points set several keys at once, :class:`Domain`); ``num_samples`` draws of the random domains
are crossed with the grids, and every point is repeated for each seed. Everything is validated (every trial's run
config built) here, before Ray starts. Running a sweep is :mod:`harness.sweep.driver`.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationError, field_validator, model_validator

from core.errors import ConfigError, suggest
from core.metrics import HEADLINE_METRIC, ONLINE_LINEAR, ONLINE_METRICS
from harness.config.loading import build_config, first_error, parse_overrides, read_yaml, set_values
from harness.config.schema import NAME_MAX, RunConfig, Section

__all__ = [
    "Domain",
    "Reference",
    "Resources",
    "SchedulerConfig",
    "Sweep",
    "SweepConfig",
    "TableConfig",
    "TrialSpec",
    "apply_sweep_overrides",
    "expand",
    "load_sweep",
]


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
            raise ValueError(
                "expected {grid: [...]}, {choice: [...]}, {uniform: [lo, hi]}, "
                "{loguniform: [lo, hi]} or {cases: [{key: value, ...}, ...]}"
            )
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> Domain:
        given = [k for k in ("grid", "choice", "uniform", "loguniform", "cases") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of grid, choice, uniform, loguniform, cases (got {', '.join(given) or 'none'})"
            )
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
    """What one trial gets: ``workers`` processes (data-parallel, a Ray Train job inside the Tune trial when more than
    one), each with ``cpus`` CPUs (also its torch threads) and ``gpus`` GPUs (fractions share one GPU)."""

    workers: int = Field(1, ge=1)
    """Data-parallel workers per trial; the trials' ``pretrain.batch_size`` (the global batch) must be divisible by
    it."""
    cpus: float = Field(1.0, gt=0)
    """Per worker."""
    gpus: float = Field(0.0, ge=0)
    """Per worker."""


class SchedulerConfig(Section):
    """FIFO runs every trial to the end; ASHA stops poor trials early on an online metric."""

    name: Literal["fifo", "asha"] = "fifo"
    metric: str | None = None
    """A metric the trials report during training (:data:`EPOCH_METRICS`), e.g. ``online/knn_top1`` (mode max)."""
    mode: Literal["min", "max"] = "min"
    grace_period: int = Field(1, ge=1)
    """Epochs every trial runs before it may be stopped."""
    reduction_factor: float = Field(2.0, gt=1)

    @model_validator(mode="after")
    def _asha_needs_metric(self) -> SchedulerConfig:
        if self.name == "asha" and not self.metric:
            raise ValueError("asha needs a metric reported during training, e.g. metric: online/knn_top1, mode: max")
        return self


class TableConfig(Section):
    """What ``results/<sweep>/table.md`` and ``table.tex`` show after the swept keys and the taxonomy
    (``table.csv`` keeps every metric). Whether each metric was logged is checked when the table is built."""

    columns: list[str] | None = Field(None, min_length=1)
    """Metric names, in order, e.g. ``[eval/knn/top1, time/pretrain_s]``; default (None): kNN, linear, 1% and 10%
    top-1, Recall@1, RankMe, pretraining time and peak memory, those the runs logged
    (``harness.tables.DEFAULT_COLUMNS``)."""

    @field_validator("columns")
    @classmethod
    def _metric_names(cls, v: list[str] | None) -> list[str] | None:
        for name in v or []:
            if not name or name != name.strip() or not all(ch.isalnum() or ch in "_-./ " for ch in name):
                raise ValueError(f"expected metric names such as eval/knn/top1 (got {name!r})")
        if v is not None and len(set(v)) != len(v):
            raise ValueError(f"columns must be distinct (got {v})")
        return v


class Reference(Section):
    """A published number printed under a sweep's table as a reference row (never bolded, never a result)."""

    name: str = Field(min_length=1)
    """What it is, e.g. ``raw pixels, kNN k=5 (Euclidean)``."""
    metric: str = Field(min_length=1)
    """The column it belongs in, e.g. ``eval/knn/top1``."""
    value: float
    """In the metric's units (a fraction for accuracies)."""
    source: str = Field(min_length=1)
    """Where it is published, e.g. ``Xiao et al. 2017, arXiv:1708.07747, Table 3``."""


class SweepConfig(Section):
    """One ablation: a base run config, a search space, seeds, and how to schedule the trials."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=NAME_MAX)
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
    headline: list[str] = Field(default_factory=lambda: [HEADLINE_METRIC], min_length=1)
    """Metrics plotted against each numeric swept key."""
    table: TableConfig = Field(default_factory=TableConfig)
    """The metric columns of the headline table."""
    references: list[Reference] = Field(default_factory=list)
    """Published numbers the tables print as reference rows below the results."""

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
            raise ValueError(
                f"num_samples: {self.num_samples} draws need a choice, uniform "
                "or loguniform domain in space (seeds repeat grid points)"
            )
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


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Sweep:
    """Read, override and validate a sweep YAML, expand it and build every trial's run config (ConfigError on anything
    wrong)."""
    path = Path(path)
    raw = read_yaml(path)
    raw = apply_sweep_overrides(raw, overrides)
    try:
        cfg = SweepConfig(**raw)
    except ValidationError as err:
        raise ConfigError(first_error(err, SweepConfig)) from None
    run_raw = _merge(_read_base(cfg.base, path) if cfg.base else {}, cfg.run)
    run_raw = set_values(run_raw, {"tracking.experiment": cfg.name}, RunConfig)
    run_raw = _workers_from_resources(run_raw, cfg.resources)
    if (run_raw.get("eval") or {}).get("baselines_cache") is None:  # trials sharing data, seed and backbone share them
        run_raw = set_values(
            run_raw, {"eval.baselines_cache": str(cfg.storage.resolve() / cfg.name / "baselines")}, RunConfig
        )
    _check_trial_count(cfg)
    sweep = Sweep(cfg, path, path.read_text(), expand(cfg))
    for key, domain in cfg.space.items():  # every value (or both ends of a range) must make a valid run config
        for value in domain.bounds():
            _build(run_raw, domain.run_values(key, value), f"space.{key}")
    for trial in sweep.trials:
        values = {k: v for key, value in trial.point.items() for k, v in cfg.space[key].run_values(key, value).items()}
        sweep.configs[trial.key] = _build(
            run_raw, {**values, "seed": trial.seed, "tracking.run_name": trial.key}, "space"
        )
    _check_scheduler_metric(cfg.scheduler, list(sweep.configs.values()))
    return sweep


MAX_TRIALS = 10_000
"""Most trials one sweep may expand to (grid points x draws x seeds): a larger sweep is refused before it expands."""


def _check_trial_count(cfg: SweepConfig) -> None:
    sizes = [len(d.points()) for d in cfg.space.values() if not d.random]
    count = math.prod(sizes) * cfg.num_samples * len(cfg.seeds)
    if count > MAX_TRIALS:
        plural = lambda n, what: f"{n} {what}{'s' if n != 1 else ''}"  # noqa: E731
        parts = [*(str(n) for n in sizes), plural(cfg.num_samples, "draw"), plural(len(cfg.seeds), "seed")]
        raise ConfigError(
            f"space: {count:,} trials ({' x '.join(parts)}); a sweep holds at most {MAX_TRIALS:,} "
            "(split it into several sweeps, or sample the space with choice/uniform and num_samples)"
        )


def _read_base(base: Path, sweep_file: Path) -> dict[str, Any]:
    """The run config a sweep starts from; the sweep file itself, or another sweep file, is refused."""
    path = _relative(base, sweep_file)
    if path.is_file() and path.resolve() == sweep_file.resolve():
        raise ConfigError(f"base: {base} is this sweep file itself; give a run config, e.g. configs/simclr_shapes.yaml")
    raw = read_yaml(path)
    if "space" in raw and "name" in raw:
        raise ConfigError(
            f"base: {base} is a sweep file (it has name and space), not a run config; give a run config, "
            "e.g. configs/simclr_shapes.yaml"
        )
    return raw


def _workers_from_resources(run_raw: dict[str, Any], resources: Resources) -> dict[str, Any]:
    """A sweep's trials take their worker count and per-worker CPUs from ``resources``; a run config asking for
    another worker count is refused (it would be silently ignored)."""
    asked = (run_raw.get("distributed") or {}).get("workers")
    if resources.workers > 1 and (run_raw.get("distributed") or {}).get("backend") == "nccl" and not resources.gpus:
        raise ConfigError(
            "run.distributed.backend: nccl needs GPUs, and resources.gpus is 0; give "
            "resources.gpus (per worker) or use distributed.backend=gloo or auto"
        )
    if asked not in (None, 1, resources.workers):
        raise ConfigError(
            f"run.distributed.workers: {asked}, but resources.workers is "
            f"{resources.workers}; a sweep's trials take their workers from resources.workers"
        )
    try:
        return set_values(
            run_raw, {"distributed.workers": resources.workers, "distributed.cpus": resources.cpus}, RunConfig
        )
    except ConfigError as err:
        raise ConfigError(f"resources.workers: {err}") from None


EPOCH_METRICS = ("train/loss", "train/lr", "train/images_per_s", "epoch")
"""What every trial reports after each epoch, with ``train/<key>`` for each key its method logs (unknown before it
runs) and, when ``eval.online.enabled``, the online monitor's :data:`core.metrics.ONLINE_METRICS` at its epochs."""

_FINAL_ONLY = ("train/final_loss", "train/images_per_s_mean")
"""``train/`` metrics a trial reports only at its end."""


def _check_scheduler_metric(scheduler: SchedulerConfig, configs: list[RunConfig]) -> None:
    """ASHA's metric must be one the trials report during training: refused (naming it and the accepted ones)
    otherwise."""
    metric = scheduler.metric
    if scheduler.name != "asha" or metric is None:
        return
    online = all(c.eval.online.enabled for c in configs)
    linear = online and all(c.eval.online.linear for c in configs)
    if (
        metric in EPOCH_METRICS
        or (metric in ONLINE_METRICS and online)
        or (metric == ONLINE_LINEAR and linear)
        or (metric.startswith("train/") and metric != "train/" and metric not in _FINAL_ONLY)
    ):
        return
    if metric == ONLINE_LINEAR:
        raise ConfigError(
            f"scheduler.metric: {metric!r} is reported only by trials with eval.online.enabled=true and "
            "eval.online.linear=true, and some of these trials disable one of them"
        )
    if metric in ONLINE_METRICS:
        raise ConfigError(
            f"scheduler.metric: {metric!r} is reported only by trials with "
            "eval.online.enabled=true, and some of these trials disable it"
        )
    accepted = [
        *EPOCH_METRICS[:-1],
        "train/<a key the method logs>",
        *(ONLINE_METRICS if online else ()),
        *((ONLINE_LINEAR,) if linear else ()),
        EPOCH_METRICS[-1],
    ]
    why = (
        "reported only at the end of a trial"
        if metric.startswith(("eval/", "baseline/", "time/", "memory/")) or metric in _FINAL_ONLY
        else "not reported by the trials"
    )
    hint = suggest(metric, [m for m in accepted if "<" not in m], n=1)
    raise ConfigError(
        f"scheduler.metric: {metric!r} is {why}{hint}; ASHA can stop trials "
        f"on a metric reported during training: {', '.join(accepted)}"
    )


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
        elif key in SweepConfig.model_fields or head in ("resources", "scheduler", "table"):
            raw = set_values(raw, {key: value}, SweepConfig)
        else:
            known = list(SweepConfig.model_fields) + list(RunConfig.model_fields)
            raise ConfigError(f"override {key}: unknown key {key!r}{suggest(key, known, n=1)}")
    return raw


def expand(cfg: SweepConfig) -> list[TrialSpec]:
    """Every (point, seed): the grids' product crossed with ``num_samples`` draws of the random domains, times the
    seeds."""
    grid_keys = [k for k, d in cfg.space.items() if not d.random]
    random_keys = [k for k, d in cfg.space.items() if d.random]
    rng = np.random.default_rng(cfg.sample_seed)
    draws = [{k: cfg.space[k].draw(rng) for k in random_keys} for _ in range(cfg.num_samples)]
    combos = [
        dict(zip(grid_keys, values, strict=True))
        for values in itertools.product(*(cfg.space[k].points() for k in grid_keys))
    ]
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
