"""A suite and its folder: the suite file, which experiments a command picks, and where each
run's files and checkpoints go under `--out`.

Everything `jaxbench.reproduce` knows about a run's progress is read back from that folder
(`seed_state`), never kept elsewhere: an interrupted suite resumes from what its runs wrote.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path
from typing import Any, Sequence

from jaxbench import config as config_lib
from jaxbench.config import Config, ConfigError


class SuiteError(ConfigError):
    """A bad suite file, filter or output folder: one message, exit 2."""


# --- The suite file --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Suite:
    path: Path
    description: str
    experiments: tuple[str, ...]  # experiment names, or absolute paths of .toml files
    seeds: tuple[int, ...]
    optional: dict[str, tuple[str, ...]]  # group -> experiments, added by --include-<group>


def suites_dir() -> Path:
    """`experiments/suites/`: beside the experiments but out of their `*.toml` glob."""
    return config_lib.experiments_dir() / "suites"


def load_suite(name_or_path: str) -> Suite:
    path = Path(name_or_path)
    if path.suffix != ".toml" or not path.is_file():
        path = suites_dir() / f"{name_or_path}.toml"
        if not path.is_file():
            known = sorted(p.stem for p in suites_dir().glob("*.toml")) if suites_dir().is_dir() else []
            raise SuiteError(f"unknown suite {name_or_path!r} (--suite): pass one of "
                             f"{', '.join(known) or 'none found in ' + str(suites_dir())} or a "
                             "path to a suite .toml file.")
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise SuiteError(f"{path}: not a readable TOML suite file ({err}).") from None
    unknown = set(raw) - {"description", "experiments", "seeds", "optional"}
    if unknown:
        raise SuiteError(f"{path}: unknown keys {sorted(unknown)}; a suite has description, "
                         "experiments, seeds and an optional [optional] table.")

    def entries(value, key: str) -> tuple[str, ...]:
        if (not isinstance(value, list) or not value
                or not all(isinstance(v, str) and v.strip() for v in value)):
            raise SuiteError(f"{path}: {key} must be a non-empty list of experiment names or "
                             f".toml paths, got {value!r}.")
        # A path is relative to the suite file; a name is looked up in experiments/.
        return tuple(str((path.parent / v).resolve()) if v.endswith(".toml") else v
                     for v in value)

    seeds = raw.get("seeds")
    if (not isinstance(seeds, list) or not seeds or len(set(map(str, seeds))) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise SuiteError(f"{path}: seeds must be a non-empty list of distinct integers >= 0, "
                         f"got {seeds!r}.")
    optional = raw.get("optional", {})
    if not isinstance(optional, dict):
        raise SuiteError(f"{path}: [optional] must be a table of experiment lists.")
    return Suite(path, str(raw.get("description", "")), entries(raw.get("experiments"), "experiments"),
                 tuple(seeds), {k: entries(v, f"optional.{k}") for k, v in optional.items()})



def select(suite: Suite, names: dict[str, str], only: list[str], skip: list[str],
           include: list[str]) -> list[str]:
    """The suite's experiments (entries) to run, in suite order, after the filters.

    `names` maps each entry to its experiment name. `--only` may name an optional experiment
    directly; `--include-<group>` adds the whole group.
    """
    every = list(suite.experiments) + [e for group in suite.optional.values() for e in group]
    valid = [names[e] for e in every]
    for flag, given in (("--only", only), ("--skip", skip)):
        bad = [n for n in given if n not in valid]
        if bad:
            raise SuiteError(f"{flag}: {', '.join(bad)} not in the suite {suite.path.name}; its "
                             f"experiments are {', '.join(valid)}.")
    for group in include:
        if group not in suite.optional:
            raise SuiteError(f"--include-{group}: the suite {suite.path.name} has no optional "
                             f"group {group!r}.")
    if only:
        chosen = [e for e in every if names[e] in only]
    else:
        chosen = list(suite.experiments) + [e for g in include for e in suite.optional[g]]
    chosen = [e for e in dict.fromkeys(chosen) if names[e] not in skip]
    if not chosen:
        raise SuiteError("--only/--skip left no experiment to run.")
    return chosen


# --- Where things go -------------------------------------------------------------------------------

def seed_folder(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / name / f"seed{seed}"


def checkpoint_dir(out: Path, name: str, seeds: Sequence[int], mode: str) -> Path:
    """One folder per group (`seeds-0-1-2`) or per one-seed run (`seed-0`)."""
    tag = f"seeds-{'-'.join(map(str, seeds))}" if mode == "group" else f"seed-{seeds[0]}"
    return out / "checkpoints" / name / tag


def has_checkpoint(folder: Path) -> bool:
    """Whether orbax committed a step there (its step folders are named by the step number)."""
    return folder.is_dir() and any(p.is_dir() and p.name.isdigit() for p in folder.iterdir())


def checkpointed_groups(out: Path, name: str) -> list[tuple[str, tuple[int, ...]]]:
    """(mode, seeds) of every run of `name` that left a checkpoint, oldest folder name first."""
    found = []
    folder = out / "checkpoints" / name
    for sub in sorted(folder.iterdir()) if folder.is_dir() else []:
        kind, _, rest = sub.name.partition("-")
        try:
            seeds = tuple(int(s) for s in rest.split("-"))
        except ValueError:
            continue
        if kind in ("seeds", "seed") and has_checkpoint(sub):
            found.append(("group" if kind == "seeds" else "single", seeds))
    return found


def read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _normal(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


@dataclasses.dataclass
class SeedState:
    seed: int
    epochs_done: int = 0
    finished: bool = False


def seed_state(out: Path, cfg: Config, seed: int) -> SeedState:
    """How far a seed's run is, from its summary.json; SuiteError if it used other settings."""
    folder = seed_folder(out, cfg.name, seed)
    summary = read_json(folder / "summary.json")
    if summary is None:
        return SeedState(seed)
    want = _normal(cfg.replace(seed=seed).to_dict())
    have = summary.get("config") if isinstance(summary.get("config"), dict) else {}
    if have != want:
        keys = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))
        shown = ", ".join(f"{k} {have.get(k)!r} there, {want.get(k)!r} here" for k in keys)
        raise SuiteError(f"{folder} holds a run made with other settings ({shown}). One --out "
                         "folder holds one protocol: pass another --out, or delete that folder "
                         "to redo it.")
    done = int(summary.get("epochs_completed") or 0)
    return SeedState(seed, done, done >= cfg.epochs and "params_sha256" in summary)
