"""The config schema: defaults, overrides, and one-line errors that name the dotted key."""

import pytest

from core.errors import ConfigError
from harness.config.loading import build_config, flatten, load_config
from harness.config.schema import RunConfig


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_defaults_fill_method_params_from_the_method():
    cfg = build_config({})
    assert cfg.method == {"name": "simclr", "temperature": 0.5, "proj_hidden_dim": 2048, "proj_dim": 128, "proj_layers": 2, "gather": True}
    assert cfg.data.name == "shapes" and cfg.pretrain.optimizer == "sgd"


def test_shipped_default_config_is_valid():
    cfg = load_config("configs/simclr_shapes.yaml")
    assert cfg.method["name"] == "simclr" and cfg.data.name == "shapes"


def test_overrides_parse_yaml_scalars_and_nest(tmp_path):
    path = write(tmp_path, "pretrain: {epochs: 3}\nmethod: {name: simclr}\n")
    cfg = load_config(path, ["pretrain.epochs=7", "method.temperature=0.2", "augment.crop_scale=[0.3, 0.9]", "tracking.uri=sqlite:///x.db", "backbone.kwargs.drop_rate=0.1"])
    assert cfg.pretrain.epochs == 7
    assert cfg.method["temperature"] == 0.2
    assert cfg.augment.crop_scale == (0.3, 0.9)
    assert cfg.tracking.uri == "sqlite:///x.db"
    assert cfg.backbone.kwargs == {"drop_rate": 0.1}


def test_flatten_gives_dotted_keys():
    flat = flatten(build_config({}).as_dict())
    assert flat["pretrain.batch_size"] == 256 and flat["method.temperature"] == 0.5 and flat["backbone.kwargs"] == {}


@pytest.mark.parametrize(
    "raw,match",
    [
        ({"pretrain": {"epoch": 3}}, r"^pretrain.epoch: unknown key \(did you mean 'pretrain.epochs'\?\)"),
        ({"pretrain": {"batch_size": "many"}}, r"^pretrain.batch_size: .*integer.*'many'"),
        ({"method": {"name": "simclr", "temperature": 0}}, r"^method.temperature: .*greater than 0"),
        ({"method": {"name": "simclr", "temperature": -1}}, r"^method.temperature: "),
        ({"method": {"name": "simclr", "temprature": 0.1}}, r"^method.temprature: unknown key \(did you mean 'method.temperature'\?\)"),
        ({"method": {"name": "simclear"}}, r"^method.name: unknown method 'simclear' \(did you mean 'simclr'"),
        ({"pretrain": {"optimizer": "rmsprop"}}, r"^pretrain.optimizer: .*'sgd', 'lars' or 'adamw'"),
        ({"eval": {"knn": {"temperature": 0}}}, r"^eval.knn.temperature: "),
        ({"augment": {"crop_scale": [0.9, 0.2]}}, r"^augment.crop_scale: .*low <= high"),
        ({"device": "tpu"}, r"^device: unknown device 'tpu'"),
        ({"pretrain": {"epochs": 2, "warmup_epochs": 5}}, r"^pretrain: warmup_epochs"),
        ({"daata": {}}, r"^daata: unknown key \(did you mean 'data'\?\)"),
    ],
)
def test_bad_values_name_the_dotted_key(raw, match):
    with pytest.raises(ConfigError, match=match) as info:
        build_config(raw)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "override,match",
    [
        ("pretrain.epoch=3", r"unknown key 'pretrain.epoch' \(did you mean 'pretrain.epochs'\?\)"),
        ("nope=1", r"unknown key 'nope'"),
        ("method.temprature=0.1", r"unknown key 'method.temprature' for method 'simclr'"),
        ("pretrain.epochs", r"expected key=value"),
        ("pretrain.epochs=abc", r"^pretrain.epochs: .*integer"),
    ],
)
def test_bad_overrides_are_refused(override, match):
    with pytest.raises(ConfigError, match=match):
        build_config({}, [override])


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "pretrain:\n  epochs: [1, 2\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml: line \d+, column \d+: malformed YAML"):
        load_config(path)


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))


def test_method_may_be_given_as_a_bare_name():
    assert RunConfig(method="simclr").method["temperature"] == 0.5


def test_compile_without_a_compiler_is_one_line_naming_why(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++, c++ or clang++
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError, match=r"^pretrain.compile: true, but torch.compile needs a C\+\+ compiler on the CPU .*set pretrain.compile=false$") as info:
        build_config({"device": "cpu", "pretrain": {"compile": True}})
    assert "\n" not in str(info.value)
    build_config({"device": "cpu", "pretrain": {"compile": False}})  # off: nothing is checked


@pytest.mark.parametrize(
    "key", ["pretrain.base_lr", "method.temperature", "eval.knn.temperature", "augment.brightness", "data.memory_budget_gb"]
)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_every_float_is_finite(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}: .*finite") as info:
        build_config({}, [f"{key}={value}"])
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "override,match",
    [
        ("tracking.experiment=/abs/x", r"^tracking.experiment: must be one folder name"),
        ("tracking.experiment=a/b", r"^tracking.experiment: must be one folder name"),
        ("tracking.experiment=..", r"^tracking.experiment: must be one folder name"),
        ("tracking.experiment=''", r"^tracking.experiment: .*at least 1 character"),
        ("tracking.experiment=" + "e" * 300, r"^tracking.experiment: .*at most 200 characters \(got 'eee.*\.\.\. \(302 characters\)\)$"),
        ("tracking.run_name=" + "r" * 6000, r"^tracking.run_name: .*at most 5000 characters"),
        ('tracking.run_name="a\\nb"', r"^tracking.run_name: must be printable"),
    ],
)
def test_experiment_and_run_names_are_one_short_folder_name(override, match):
    with pytest.raises(ConfigError, match=match) as info:
        build_config({}, [override])
    assert "\n" not in str(info.value) and len(str(info.value)) < 300
    assert build_config({}, ["tracking.experiment=my-exp_1.2"]).tracking.experiment == "my-exp_1.2"


def test_a_yaml_bomb_is_refused_quickly(tmp_path):
    import time

    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 9)]
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"cfg.yaml: expands to more than 100,000 values"):
        load_config(write(tmp_path, "\n".join(lines) + "\n"))
    assert time.perf_counter() - start < 2.0


def test_a_new_method_name_starts_from_that_methods_defaults(caplog):
    import logging

    from methods.barlow_twins import BarlowTwinsParams

    yaml_method = {"method": {"name": "simclr", "temperature": 0.2, "proj_dim": 64}}
    with caplog.at_level(logging.INFO, logger="harness.config"):
        cfg = build_config(yaml_method, ["method.name=barlow_twins"])
    assert cfg.method == {"name": "barlow_twins", **BarlowTwinsParams().model_dump()}
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == "override method.name=barlow_twins: simclr's settings dropped (method.proj_dim, method.temperature); barlow_twins starts from its own defaults"
    # the new method's own keys may come before or after its name; the same name again keeps the YAML's keys
    assert build_config(yaml_method, ["method.lambd=0.01", "method.name=barlow_twins"]).method["lambd"] == 0.01
    assert build_config(yaml_method, ["method.name=simclr"]).method["temperature"] == 0.2
