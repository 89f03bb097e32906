"""The probe: one subprocess, before any training, that checks the data (prepared, opened),
names the device and times a short warm-up of each model for the plan's estimates.

A subprocess, so the suite itself never holds a GPU; its result file is rewritten after each
step, so a crash still leaves what was found before it.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from jaxbench import config as config_lib
from jaxbench.children import die_with_parent
from jaxbench.config import ConfigError
from jaxbench.plan import SIZES, auto_grouping


def probe() -> None:
    """Entry of the probe subprocess: argv = request.json result.json. Writes the result as it goes."""
    die_with_parent()
    request = json.loads(Path(sys.argv[1]).read_text())
    result_path = Path(sys.argv[2])
    result: dict[str, Any] = {"data": {}, "timing": {}, "errors": {}}

    def save():
        tmp = result_path.with_name(result_path.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, result_path)

    from jaxbench.cli import enable_compile_cache

    enable_compile_cache()
    import jax

    from jaxbench import outputs

    result |= outputs.environment_info()
    result["backend"] = jax.default_backend()
    save()
    for dataset, spec in request["data"].items():
        print(f"data: checking {dataset} (prepared once by tfds if it is not yet; this can take "
              "minutes the first time)", flush=True)
        result["data"][dataset] = check_dataset(dataset, spec)
        save()
    if any("error" in v for v in result["data"].values()):
        return
    for item in request["warmup"]:
        try:
            result["timing"][item["name"]] = warm_up(item, request["budget_s"])
        except Exception as err:  # noqa: BLE001  an estimate is never worth failing the suite
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            result["errors"][item["name"]] = f"{type(err).__name__}: {first}"
        save()


def check_dataset(dataset: str, spec: dict) -> dict:
    """Prepare (or open) one dataset the way the runs will, and read one example of each split."""
    from jaxbench import data

    try:
        cfg = config_lib.load(spec["exp"]).replace(train_limit=1, eval_limit=1)
        if spec.get("arrays"):
            import numpy as np

            data.load_arrays(spec["arrays"], cfg)
            with np.load(spec["arrays"]) as z:
                sizes = [len(z["train_labels"]), len(z["eval_labels"])]
            return {"sizes": sizes, "source": f"arrays {spec['arrays']}"}
        if data.have_tfds():
            b = data.prepare(dataset, spec.get("data_dir"), spec.get("manual_dir"))
            data.load_split(b, cfg.train_split, 1)
            data.load_split(b, cfg.eval_split, 1)
            sizes = [b.info.splits[s].num_examples for s in (cfg.train_split, cfg.eval_split)]
            return {"sizes": sizes, "source": f"tfds in {b.data_dir}"}
        data.load_files(cfg, spec.get("data_dir"), spec.get("manual_dir"))
        return {"sizes": list(SIZES[dataset]), "source": f"official files in {spec.get('manual_dir')}"}
    except (data.DataError, ConfigError) as err:
        return {"error": str(err)}
    except Exception as err:  # noqa: BLE001  anything else that stops the data: say what
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:400]
        return {"error": f"{type(err).__name__}: {first}"}


def warm_up(item: dict, budget_s: float) -> dict:
    """Time the real Trainer on random images of the dataset's shape: setup (speed self-check,
    compile), then train steps after one warm call until `budget_s` passes, then eval batches.
    Only seconds matter here: the images' content does not change a step's time."""
    import jax
    import numpy as np

    from jaxbench import data
    from jaxbench.trainer import Trainer

    cfg = config_lib.load(item["exp"]).replace(**item["overrides"])
    cpu = jax.default_backend() == "cpu"
    rng = np.random.default_rng(0)
    shape = tuple(item["shape"])

    def split(n):
        return data.Split(rng.integers(0, 256, (n, *shape), dtype=np.uint8),
                          rng.integers(0, cfg.num_classes, n).astype(np.int32))

    # CPU: one step per call, the budget stops it; elsewhere a few 50-step calls.
    train = split(cfg.batch_size * (64 if cpu else 512))
    test = split(cfg.batch_size * (4 if cpu else 64))
    auto = {"group": "group", "sequential": "single"}[auto_grouping(jax.default_backend())["mode"]]
    modes = sorted({auto if m == "auto" else m for m in item["modes"]}, reverse=True)  # single first
    out, record = {}, None
    for mode in modes:
        seeds = tuple(item["seeds"]) if mode == "group" else None
        t0 = time.perf_counter()
        trainer = Trainer(cfg, train, test, seeds=seeds, perf_record=record)
        init_s = time.perf_counter() - t0
        state = trainer.init_state()
        compile_s = trainer.compile(state)
        def calls(n):  # a `stop` that lets n calls run: it is asked once before each call
            asked = [0]

            def stop():
                asked[0] += 1
                return asked[0] > n
            return stop

        # One call per train_epoch: it returns after the device is done (its NaN check reads
        # the sums), so each call is timed exactly. The first call warms up; the median of the
        # next (at least 3, until the budget is spent, unless one call takes many budgets)
        # shrugs off a spike of a busy machine.
        state, sums, _ = trainer.train_epoch(state, 1, stop=calls(1))
        times, done, t1 = [], 0, time.perf_counter()
        while len(times) < 200:
            elapsed = time.perf_counter() - t1
            if times and (elapsed > 10 * budget_s or (len(times) >= 3 and elapsed > budget_s)):
                break
            t = time.perf_counter()
            state, sums, n = trainer.train_epoch(state, 2 + len(times), stop=calls(1))
            times.append((time.perf_counter() - t) / n)
            done += n
        step_s = statistics.median(times)
        trainer.evaluate(state)  # warm
        t2 = time.perf_counter()
        trainer.evaluate(state)
        eval_batch_s = (time.perf_counter() - t2) / len(trainer.eval_idx)
        setup_s = init_s + compile_s + (out["single"]["init_s"] if record is not None else 0.0)
        out[mode] = {"seeds": len(trainer.seeds), "init_s": init_s, "compile_s": compile_s,
                     "setup_s": setup_s, "step_s": step_s, "steps_timed": done,
                     "eval_batch_s": eval_batch_s, "perf": trainer.perf.line()}
        print(f"warm-up: {cfg.name}, {'group of ' + str(len(trainer.seeds)) if seeds else 'one seed'}:"
              f" {step_s * 1000:.1f} ms per train step (median of {len(times)} calls, {done} steps),"
              f" {eval_batch_s * 1000:.1f} ms per eval batch, setup {setup_s:.1f} s", flush=True)
        record = trainer.perf.to_dict() if mode == "single" else record
        del trainer, state, sums
    return out
