"""Experiments are declarative TOML files; this module turns one into a typed, frozen `Config`.

Every hyperparameter of a run lives in `experiments/<name>.toml`, so a result is reproducible from
its name plus the command-line overrides, which `summary.json` records with the resolved config.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path

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

        Keys of `Perf` (dtype, steps_per_call, stem_conv, xla_cpu) go into the perf table.
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
    """Load an experiment by name (`fmnist_baseline`) or by path to a TOML file."""
    path = Path(name_or_path)
    if path.suffix != ".toml" or not path.is_file():
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
    fields = {f.name for f in dataclasses.fields(Config)}
    unknown = set(raw) - fields
    if unknown:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}; valid keys are {sorted(fields)}.")
    raw.setdefault("name", path.stem)
    perf = raw.get("perf", {})
    perf_keys = {f.name for f in dataclasses.fields(Perf)}
    if not isinstance(perf, dict) or set(perf) - perf_keys:
        raise ConfigError(f"{path}: [perf] may hold only {sorted(perf_keys)}, got "
                          f"{sorted(perf) if isinstance(perf, dict) else perf!r}.")
    raw["perf"] = Perf(**perf)
    try:
        cfg = Config(**raw)
    except TypeError as err:
        raise ConfigError(f"{path}: {err}; every experiment must set these keys.") from None
    return validate(cfg, where=str(path))


def validate(cfg: Config, where: str = "config") -> Config:
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise ConfigError(f"{where}: {message}")

    need(cfg.dataset in DATASETS, f"dataset must be one of {sorted(DATASETS)}, got {cfg.dataset!r}.")
    need(cfg.model in MODELS, f"model must be one of {MODELS}, got {cfg.model!r}.")
    need(cfg.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}.")
    need(cfg.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {cfg.schedule!r}.")
    for problem in cfg.perf.check():
        need(False, problem + ".")
    for key in ("batch_size", "epochs", "image_size"):
        value = getattr(cfg, key)
        need(isinstance(value, int) and value > 0, f"{key} must be a positive integer, got {value!r}.")
    for key in ("train_limit", "eval_limit"):
        value = getattr(cfg, key)
        need(value is None or (isinstance(value, int) and value > 0),
             f"{key} must be a positive integer, got {value!r}.")
    need(isinstance(cfg.seed, int) and cfg.seed >= 0, f"seed must be an integer >= 0, got {cfg.seed!r}.")
    need(cfg.learning_rate > 0, f"learning_rate must be > 0, got {cfg.learning_rate!r}.")
    return cfg
