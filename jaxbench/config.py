"""Experiments are declarative TOML files; this module turns one into a typed, frozen `Config`.

Every hyperparameter of a run lives in `experiments/<name>.toml`, so a result is reproducible from
its name plus the command-line overrides, which `summary.json` records with the resolved config.
Every key, the [perf] table's included, is checked for type and range (`KEYS`, `PERF_KEYS`): a
bad value is a `ConfigError` naming the file, the key, the value and what is expected.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
from pathlib import Path
from typing import Any, Callable

from jaxbench import perf as perf_lib
from jaxbench.perf import Perf

DATASETS = {"fashion_mnist": 10, "tiny_imagenet": 200}
MODELS = ("baseline", "target", "densenet")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine")


class ConfigError(ValueError):
    """A user-facing configuration problem: the CLI prints it and exits 2."""


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    description: str
    dataset: str
    model: str
    optimizer: str
    learning_rate: float
    batch_size: int
    epochs: int
    seed: int
    schedule: str = "constant"
    momentum: float = 0.9
    image_size: int = 64
    train_split: str = "train"
    eval_split: str = "test"
    train_limit: int | None = None
    eval_limit: int | None = None
    perf: Perf = Perf()  # speed choices: the experiment's [perf] table (see jaxbench/perf.py)

    @property
    def num_classes(self) -> int:
        return DATASETS[self.dataset]

    @property
    def dtype(self) -> str:
        return self.perf.dtype

    def replace(self, **changes) -> "Config":
        """Apply CLI overrides; `None` means 'keep the experiment's value'.

        Keys of `Perf` (dtype, steps_per_call, stem_conv, xla_cpu, seed_group) go into [perf].
        """
        changes = {k: v for k, v in changes.items() if v is not None}
        perf_keys = {f.name for f in dataclasses.fields(Perf)}
        perf = {k: changes.pop(k) for k in list(changes) if k in perf_keys}
        if perf:
            changes["perf"] = dataclasses.replace(self.perf, **perf)
        return validate(dataclasses.replace(self, **changes))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"num_classes": self.num_classes}


def experiments_dir() -> Path:
    """`experiments/` beside the package (an editable install or a checkout); overridable by env."""
    env = os.environ.get("JAXBENCH_EXPERIMENTS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "experiments"


def available() -> dict[str, Path]:
    folder = experiments_dir()
    return {p.stem: p for p in sorted(folder.glob("*.toml"))} if folder.is_dir() else {}


def load(name_or_path: str) -> Config:
    """Load an experiment by name (`fmnist_baseline`) or by path to a TOML file.

    Every key is checked for type and range before a `Config` exists (`KEYS`, `PERF_KEYS`); a
    problem raises `ConfigError` naming the file, the key, the value and what is expected.
    """
    path = Path(name_or_path)
    if path.suffix == ".toml" and not path.is_file():
        raise ConfigError(f"--exp {name_or_path}: no such experiment file"
                          f"{' (it is a folder)' if path.is_dir() else ''}; pass a path to a "
                          ".toml file, or an experiment's name (`python -m jaxbench.run --list`).")
    if path.suffix != ".toml":
        known = available()
        if name_or_path not in known:
            names = ", ".join(known) or f"none found in {experiments_dir()}"
            raise ConfigError(
                f"unknown experiment {name_or_path!r} (--exp). Valid names: {names}. "
                "Run `python -m jaxbench.run --list` to see them with descriptions, or pass a path "
                "to a .toml file."
            )
        path = known[name_or_path]
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err}); fix the file.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the experiment file ({err}).") from None
    fields = {f.name for f in dataclasses.fields(Config)}
    unknown = set(raw) - fields
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; valid keys are {sorted(fields)}.")
    missing = [k for k in REQUIRED if k not in raw]
    if missing:
        raise ConfigError(f"{path}: missing keys {missing}; every experiment sets "
                          f"{list(REQUIRED)} (see experiments/fmnist_baseline.toml).")
    raw.setdefault("name", path.stem)
    perf = raw.get("perf", {})
    perf_keys = {f.name for f in dataclasses.fields(Perf)}
    if not isinstance(perf, dict):
        raise ConfigError(f"{path}: perf = {show(perf)}: expected a [perf] table with keys among "
                          f"{sorted(perf_keys)}.")
    if set(perf) - perf_keys:
        raise ConfigError(f"{path}: [perf] may hold only {sorted(perf_keys)}, got "
                          f"{sorted(perf)}.")
    problems = check_values(raw)
    if problems:
        raise ConfigError(f"{path}: " + "; ".join(problems) + ". Fix the file.")
    for key in FLOAT_KEYS:  # `learning_rate = 1` is a number too; record it as a float
        if key in raw:
            raw[key] = float(raw[key])
    raw["perf"] = Perf(**perf)
    try:
        cfg = Config(**raw)
    except TypeError as err:
        raise ConfigError(f"{path}: {err}; every experiment must set these keys.") from None
    return validate(cfg, where=str(path))


def validate(cfg: Config, where: str = "config") -> Config:
    """Check a Config (an experiment with its overrides): `KEYS`, and `Perf.check` for [perf]."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(Config) if f.name != "perf"}
    problems = cfg.perf.check() + check_values(values)  # [perf] in perf.py's own words
    if problems:
        raise ConfigError(f"{where}: " + "; ".join(problems) + ".")
    return cfg


# --- What every key may hold --------------------------------------------------------------------
# A key's check sees its value and all the experiment's values (with the defaults filled in), so a
# split is checked against the experiment's dataset. Booleans are not integers here (TOML's
# `true` is no batch size), and a float key takes an integer (`learning_rate = 1`).

SPLITS = {"fashion_mnist": ("train", "test"), "tiny_imagenet": ("train", "validation")}
REQUIRED = ("description", "dataset", "model", "optimizer", "learning_rate", "batch_size",
            "epochs", "seed")
FLOAT_KEYS = ("learning_rate", "momentum")
# Each model halves the image with 2x2 pools (BaselineCNN 2 times, TargetCNN 3, DenseNet-BC 4 with
# its transitions): a multiple of 16 keeps every pool exact for all three.
IMAGE_MULTIPLE = 16


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def show(v: Any) -> str:
    """A value as it would be written in TOML: "fast", true, 0.5, [1, 2]."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (str, list)):
        try:
            return json.dumps(v)
        except TypeError:
            return repr(v)
    if isinstance(v, dict):
        return "a table {" + ", ".join(f"{k} = {show(x)}" for k, x in v.items()) + "}"
    return repr(v)


def one_of(names) -> tuple[str, Callable[[Any, dict], bool]]:
    names = tuple(names)
    return ("one of " + ", ".join(json.dumps(n) for n in names),
            lambda v, _: isinstance(v, str) and v in names)


def _split(v: Any, values: dict) -> bool:
    dataset = values.get("dataset")
    if dataset not in SPLITS:  # the dataset's own message says what is wrong
        return isinstance(v, str)
    return isinstance(v, str) and v in SPLITS[dataset]


def _split_expect(values: dict) -> str:
    dataset = values.get("dataset")
    if dataset not in SPLITS:
        return "a split name"
    return f"a split of {dataset}: " + ", ".join(json.dumps(s) for s in SPLITS[dataset])


def _folder_name(v: Any, _) -> bool:
    return (isinstance(v, str) and v.strip() == v and v not in ("", ".", "..")
            and "/" not in v and "\\" not in v and "\0" not in v)


# key: (what is expected, in words; or a function of all values giving it) and the check
KEYS: dict[str, tuple[Any, Callable[[Any, dict], bool]]] = {
    "name": ("a non-empty string usable as a folder name (no '/', not '.' or '..')", _folder_name),
    "description": ("a string", lambda v, _: isinstance(v, str)),
    "dataset": one_of(DATASETS),
    "model": one_of(MODELS),
    "optimizer": one_of(OPTIMIZERS),
    "learning_rate": ("a number > 0 (e.g. 1e-3)", lambda v, _: is_number(v) and v > 0),
    "batch_size": ("an integer >= 1", lambda v, _: is_int(v) and v >= 1),
    "epochs": ("an integer >= 1", lambda v, _: is_int(v) and v >= 1),
    "seed": ("an integer >= 0", lambda v, _: is_int(v) and v >= 0),
    "schedule": one_of(SCHEDULES),
    "momentum": ("a number in [0, 1) (SGD's momentum, e.g. 0.9)",
                 lambda v, _: is_number(v) and 0 <= v < 1),
    "image_size": (f"an integer multiple of {IMAGE_MULTIPLE}, at least {IMAGE_MULTIPLE} (the "
                   "models halve it up to 4 times; the paper's is 64)",
                   lambda v, _: is_int(v) and v >= IMAGE_MULTIPLE and v % IMAGE_MULTIPLE == 0),
    "train_split": (_split_expect, _split),
    "eval_split": (_split_expect, _split),
    "train_limit": ("an integer >= 1 (leave the key out for the whole split)",
                    lambda v, _: v is None or (is_int(v) and v >= 1)),
    "eval_limit": ("an integer >= 1 (leave the key out for the whole split)",
                   lambda v, _: v is None or (is_int(v) and v >= 1)),
}
PERF_KEYS: dict[str, tuple[Any, Callable[[Any, dict], bool]]] = {
    "dtype": one_of(perf_lib.DTYPES),
    "steps_per_call": ("an integer >= 0 (0: auto)", lambda v, _: is_int(v) and v >= 0),
    "stem_conv": one_of(perf_lib.STEM_CONVS),
    "xla_cpu": one_of(perf_lib.XLA_CPU),
    "seed_group": one_of(perf_lib.SEED_GROUPS),
}


def check_values(values: dict) -> list[str]:
    """Problems of an experiment's values as 'key = value: expected ...' (empty when valid)."""
    full = {f.name: f.default for f in dataclasses.fields(Config)
            if f.default is not dataclasses.MISSING} | values
    problems = []
    for prefix, table, keys in (("", full, KEYS),
                                ("perf.", full.get("perf") if isinstance(full.get("perf"), dict)
                                 else {}, PERF_KEYS)):
        for key, (expect, ok) in keys.items():
            if key not in table or (prefix and table is None):
                continue
            value = table[key]
            if not ok(value, full):
                want = expect(full) if callable(expect) else expect
                problems.append(f"{prefix}{key} = {show(value)}: expected {want}")
    return problems
