"""Every key of an experiment TOML is checked for type and range; a bad value is named with its
file, key, value and what is expected (one line, exit 2 from the CLI)."""

import contextlib
import dataclasses
import io

import pytest

from jaxbench import config, run
from jaxbench.perf import Perf
from conftest import REPO

BASE = (REPO / "experiments" / "fmnist_baseline.toml").read_text()

# (key, TOML value, how the message shows it (None: as written), what the message expects)
BAD = [
    ("name", '""', None, "a non-empty string usable as a folder name"),
    ("name", '"runs/a"', None, "usable as a folder name"),
    ("name", "3", None, "a non-empty string"),
    ("description", "5", None, "a string"),
    ("dataset", '"mnist"', None, 'one of "fashion_mnist", "tiny_imagenet"'),
    ("dataset", "3", None, "one of"),
    ("model", '"resnet"', None, 'one of "baseline", "target", "densenet"'),
    ("optimizer", '"rmsprop"', None, 'one of "adam", "sgd"'),
    ("optimizer", "true", None, "one of"),
    ("learning_rate", '"fast"', None, "a number > 0"),
    ("learning_rate", "0", None, "a number > 0"),
    ("learning_rate", "-1e-3", "-0.001", "a number > 0"),
    ("learning_rate", "true", None, "a number > 0"),
    ("learning_rate", "inf", None, "a number > 0"),
    ("learning_rate", "nan", None, "a number > 0"),
    ("batch_size", "0", None, "an integer >= 1"),
    ("batch_size", "true", None, "an integer >= 1"),
    ("batch_size", "32.0", None, "an integer >= 1"),
    ("batch_size", '"32"', None, "an integer >= 1"),
    ("epochs", "0", None, "an integer >= 1"),
    ("epochs", "2.5", None, "an integer >= 1"),
    ("epochs", "false", None, "an integer >= 1"),
    ("seed", "-1", None, "an integer >= 0"),
    ("seed", "true", None, "an integer >= 0"),
    ("seed", "1.5", None, "an integer >= 0"),
    ("schedule", '"linear"', None, 'one of "constant", "cosine"'),
    ("momentum", "1.0", None, "a number in [0, 1)"),
    ("momentum", "-0.1", None, "a number in [0, 1)"),
    ("momentum", '"high"', None, "a number in [0, 1)"),
    ("momentum", "true", None, "a number in [0, 1)"),
    ("image_size", "0", None, "an integer multiple of 16"),
    ("image_size", "60", None, "an integer multiple of 16"),
    ("image_size", "64.0", None, "an integer multiple of 16"),
    ("train_split", '"validation"', None, 'a split of fashion_mnist: "train", "test"'),
    ("train_split", '"train[:10]"', None, "a split of fashion_mnist"),
    ("eval_split", '"valid"', None, 'a split of fashion_mnist: "train", "test"'),
    ("eval_split", "1", None, "a split of fashion_mnist"),
    ("train_limit", "0", None, "an integer >= 1"),
    ("train_limit", "true", None, "an integer >= 1"),
    ("eval_limit", "-5", None, "an integer >= 1"),
    ("eval_limit", '"all"', None, "an integer >= 1"),
    ("perf", "3", None, "a [perf] table"),
    ("perf.dtype", '"float16"', None, 'one of "float32", "bfloat16"'),
    ("perf.dtype", "32", None, "one of"),
    ("perf.steps_per_call", "-1", None, "an integer >= 0 (0: auto)"),
    ("perf.steps_per_call", "true", None, "an integer >= 0"),
    ("perf.steps_per_call", "1.5", None, "an integer >= 0"),
    ("perf.stem_conv", '"fft"', None, 'one of "auto", "xla", "taps"'),
    ("perf.xla_cpu", '"fast"', None, 'one of "auto", "default", "ynn-reduce", "ynn-off"'),
    ("perf.seed_group", '"pmap"', None, 'one of "auto", "vmap", "unroll", "loop"'),
]


def experiment(key: str, value: str, **more: str) -> str:
    """fmnist_baseline's TOML with `key` set to `value` (a [perf] key goes into a [perf] table),
    and each of `more` likewise."""
    values = {key: value, **more}
    top = {k: v for k, v in values.items() if not k.startswith("perf.")}
    lines = [line for line in BASE.splitlines() if line.split(" =")[0] not in top]
    text = "".join(f"{k} = {v}\n" for k, v in top.items()) + "\n".join(lines) + "\n"
    perf = {k[5:]: v for k, v in values.items() if k.startswith("perf.")}
    if perf:
        text += "\n[perf]\n" + "".join(f"{k} = {v}\n" for k, v in perf.items())
    return text


def test_every_key_has_a_bad_value_in_the_table():
    keys = {f.name for f in dataclasses.fields(config.Config)}
    keys |= {f"perf.{f.name}" for f in dataclasses.fields(Perf)}
    assert {case[0] for case in BAD} == keys
    # and the validator knows every key: a new field without a check fails here
    assert set(config.KEYS) | {"perf"} == {f.name for f in dataclasses.fields(config.Config)}
    assert set(config.PERF_KEYS) == {f.name for f in dataclasses.fields(Perf)}


@pytest.mark.parametrize("key, value, shown, expect", BAD,
                         ids=[f"{c[0]}={c[1]}" for c in BAD])
def test_a_bad_value_names_file_key_value_and_expectation(tmp_path, key, value, shown, expect):
    path = tmp_path / "exp.toml"
    path.write_text(experiment(key, value))
    with pytest.raises(config.ConfigError) as err:
        config.load(str(path))
    message = str(err.value)
    assert message.startswith(f"{path}: ")
    assert f"{key} = {shown or value}: expected " in message
    assert expect in message
    assert "\n" not in message


def test_good_values_load(tmp_path):
    for name in config.available():
        config.load(name)
    path = tmp_path / "exp.toml"
    path.write_text(experiment("learning_rate", "1", momentum="0", image_size="32",
                               **{"perf.steps_per_call": "0", "perf.dtype": '"bfloat16"'}))
    cfg = config.load(str(path))
    assert cfg.learning_rate == 1.0 and isinstance(cfg.learning_rate, float)
    assert cfg.momentum == 0.0 and isinstance(cfg.momentum, float)
    assert cfg.image_size == 32 and cfg.perf == Perf(dtype="bfloat16", steps_per_call=0)


def test_every_problem_of_a_file_is_named_at_once(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text(experiment("learning_rate", '"fast"', epochs="0"))
    message = str(pytest.raises(config.ConfigError, config.load, str(path)).value)
    assert 'learning_rate = "fast"' in message and "epochs = 0" in message


@pytest.mark.parametrize("text, expect", [
    (BASE.replace('dataset = "fashion_mnist"\n', ""), "missing keys ['dataset']"),
    (BASE + "learning_rte = 0.1\n", "unknown keys ['learning_rte']"),
    (BASE + "[perf]\nsteps = 1\n", "[perf] may hold only"),
    (BASE + "epochs = [", "not valid TOML"),
])
def test_missing_unknown_and_unparsable(tmp_path, text, expect):
    path = tmp_path / "exp.toml"
    path.write_text(text)
    message = str(pytest.raises(config.ConfigError, config.load, str(path)).value)
    assert message.startswith(str(path)) and expect in message


def test_overrides_are_checked_too():
    with pytest.raises(config.ConfigError, match=r"batch_size = 0: expected an integer >= 1"):
        config.load("fmnist_baseline").replace(batch_size=0)


def test_the_cli_ends_cleanly_on_a_mistyped_value(tmp_path, monkeypatch):
    """The reported case: every key but `learning_rate = "fast"` -> exit 2, one line, no trace."""
    monkeypatch.setenv("JAXBENCH_COMPILE_CACHE", "")
    path = tmp_path / "fast.toml"
    path.write_text(BASE.replace("learning_rate = 1e-3", 'learning_rate = "fast"'))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = run.main(["--exp", str(path), "--out", str(tmp_path / "out")])
    assert rc == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err.getvalue()
    assert lines[0] == (f'error: {path}: learning_rate = "fast": expected a number > 0 '
                        "(e.g. 1e-3). Fix the file.")
    assert not (tmp_path / "out").exists()


def test_split_names_are_the_readers():
    from jaxbench.datasets import files

    assert config.SPLITS == {k: tuple(v) for k, v in files.SPLITS.items()}
