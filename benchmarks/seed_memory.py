"""Peak host memory (RSS) of a seed group vs one seed, each in a fresh process.

    python benchmarks/seed_memory.py --exp fmnist_target --seeds 3 --steps 3 [--seed-group vmap]

On CPU the device is the host, so RSS is the device memory too. Each measurement runs in its own
subprocess: build the Trainer on random data of the experiment's shape (the full train set size),
compile, train `--steps` steps, print the process's peak RSS. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys
import numpy as np
from jaxbench import config, data
from jaxbench.trainer import Trainer
exp, seeds, steps, n_train = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cfg = config.load(exp).replace(epochs=1, xla_cpu="default", seed_group=sys.argv[5])
shape = (28, 28, 1) if cfg.dataset == "fashion_mnist" else (64, 64, 3)
rng = np.random.default_rng(0)
split = lambda n: data.Split(rng.integers(0, 256, (n, *shape), dtype=np.uint8),
                             rng.integers(0, cfg.num_classes, n).astype(np.int32))
trainer = Trainer(cfg, split(n_train), split(cfg.batch_size),
                  seeds=tuple(range(seeds)) if seeds > 1 else None)
state = trainer.init_state()
trainer.compile(state)
stop = iter(range(steps, -1, -1))
state, _, done = trainer.train_epoch(state, 1, stop=lambda: next(stop) == 0)
print(json.dumps({"seeds": seeds, "steps": done,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--exp", default="fmnist_target")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--train-size", type=int, default=60_000)
    p.add_argument("--seed-group", default="auto", help="perf.seed_group of the group (auto, vmap, "
                   "unroll, loop)")
    args = p.parse_args()
    rows = []
    for seeds in (1, args.seeds):
        out = subprocess.run([sys.executable, "-c", CHILD, args.exp, str(seeds), str(args.steps),
                              str(args.train_size), args.seed_group], capture_output=True,
                             text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{args.exp}, batch 32, {args.train_size:,} uint8 train images resident, "
          f"{args.steps} train steps, seed_group {args.seed_group}\n")
    print("| seeds | peak RSS (MB) |\n|---:|---:|")
    for row in rows:
        print(f"| {row['seeds']} | {row['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
