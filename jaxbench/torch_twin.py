"""The PyTorch twin: the same two networks and the same training step, for honest comparisons.

Imported only for `--framework torch` and by the benchmark, so JAX-only installs never need torch.
Shared with the JAX path: configs, data loading, the per-epoch index order (`data.epoch_order`),
normalization constants, the learning-rate schedule (optax's, `train.make_schedule`), the
BatchNorm constants (`models.BN_*`), the epoch loop and output files (`loop.fit`, through the
`loop.Trainer` contract). Different: the model and the step. Initialization follows flax's defaults (LeCun-normal weights, zero biases) so both frameworks
start from the same distribution; layouts are PyTorch's NCHW.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import jax
import numpy as np
import torch
import torch.nn.functional as F
from jax.extend.core import Literal
from torch import nn

from jaxbench import data, models
from jaxbench.config import Config
from jaxbench.loop import Diverged
from jaxbench.models import TARGET_BLOCKS
from jaxbench.train import make_schedule

# flax's momentum is the weight of the old running value, torch's the weight of the new one.
BN_MOMENTUM = 1 - models.BN_MOMENTUM
BN_EPSILON = models.BN_EPSILON


def lecun_normal_(module: nn.Module) -> None:
    """flax's default init: truncated normal with variance 1/fan_in, zero bias."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fan_in = m.weight[0].numel()
            # flax truncates at 2 std and rescales so the variance stays 1/fan_in.
            std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


class BaselineCNN(nn.Module):
    def __init__(self, num_classes: int, widths=(16, 32), hidden: int = 128, size: int = 64):
        super().__init__()
        layers, c = [], 3
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        side = size // 2 ** len(widths)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * side * side, hidden), nn.ReLU(),
                                  nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class TargetCNN(nn.Module):
    def __init__(self, num_classes: int, blocks=TARGET_BLOCKS, hidden: int = 256):
        super().__init__()
        layers, c = [], 3
        for i, block in enumerate(blocks):
            for w in block:
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False),
                           nn.BatchNorm2d(w, momentum=BN_MOMENTUM, eps=BN_EPSILON), nn.ReLU()]
                c = w
            if i < len(blocks) - 1:
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Linear(c, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def _bn(c: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(c, momentum=BN_MOMENTUM, eps=BN_EPSILON)


class DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int, bottleneck: int = 4):
        super().__init__()
        self.body = nn.Sequential(
            _bn(cin), nn.ReLU(), nn.Conv2d(cin, bottleneck * growth, 1, bias=False),
            _bn(bottleneck * growth), nn.ReLU(),
            nn.Conv2d(bottleneck * growth, growth, 3, padding=1, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.body(x)], dim=1)


class DenseNetBC(nn.Module):
    """The twin of `models.DenseNetBC` (same stem, blocks, transitions and widths)."""

    def __init__(self, num_classes: int, growth: int = 24, blocks=(6, 12, 18, 8),
                 compression: float = 0.5):
        super().__init__()
        c = 2 * growth
        layers = [nn.Conv2d(3, c, 3, padding=1, bias=False), _bn(c), nn.ReLU(), nn.MaxPool2d(2)]
        for i, n in enumerate(blocks):
            for _ in range(n):
                layers.append(DenseLayer(c, growth))
                c += growth
            if i < len(blocks) - 1:
                out = int(c * compression)
                layers += [_bn(c), nn.ReLU(), nn.Conv2d(c, out, 1, bias=False), nn.AvgPool2d(2)]
                c = out
        layers += [_bn(c), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def build(name: str, num_classes: int, image_size: int = 64) -> nn.Module:
    """The twin of `models.build(name, ...)`; `image_size` sizes BaselineCNN's flattened Dense input
    (flax infers it from the first call; PyTorch's Linear must be told)."""
    model = ({"target": TargetCNN, "densenet": DenseNetBC}[name](num_classes) if name != "baseline"
             else BaselineCNN(num_classes, size=image_size))
    lecun_normal_(model)
    return model


def layer_counts(model: nn.Module) -> list[tuple[str, int]]:
    """(kind, parameter count) per parameterized layer, in call order (for parity with flax)."""
    kinds = {nn.Conv2d: "Conv", nn.BatchNorm2d: "BatchNorm", nn.Linear: "Dense"}
    return [(kinds[type(m)], sum(p.numel() for p in m.parameters()))
            for m in model.modules() if type(m) in kinds]


def preprocess(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, size: int = 64
               ) -> torch.Tensor:
    """The twin of `data.preprocess`: uint8 NHWC -> float32 NCHW, resized, normalized, 3 channels."""
    x = images.permute(0, 3, 1, 2).float() * (1.0 / 255.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


_NUMPY_OPS = {jax.lax.add_p: np.add, jax.lax.sub_p: np.subtract, jax.lax.mul_p: np.multiply,
              jax.lax.div_p: np.divide, jax.lax.min_p: np.minimum, jax.lax.max_p: np.maximum,
              jax.lax.neg_p: np.negative}


def schedule_table(schedule: Callable, n: int) -> np.ndarray:
    """`[float(schedule(s)) for s in range(n)]` evaluated on the CPU, bit for bit, in milliseconds.

    Per-step evaluation costs a JAX dispatch per op (~0.4 ms a step on a CPU, a GPU round trip
    on a GPU machine), too slow for 80,000 steps; plain vectorized evaluation is fast but not
    exact: XLA's vectorized float32 division on the CPU is off by an ulp for some inputs (and
    the cosine's 1 + cos(x) magnifies that near the end of the run). So this runs the
    schedule's jaxpr one primitive at a time over all steps at once: IEEE arithmetic in NumPy
    (what XLA computes for one scalar), other primitives (cos, pow) in JAX on the CPU, whose
    vectorized results equal its scalar ones. tests/test_torch_twin.py checks the equality.
    """
    closed = jax.make_jaxpr(schedule)(0)
    jaxpr = closed.jaxpr
    env = dict(zip(jaxpr.constvars, closed.consts))
    read = lambda v: v.val if isinstance(v, Literal) else env[v]
    env[jaxpr.invars[0]] = np.arange(n, dtype=np.int32)
    with jax.default_device(jax.devices("cpu")[0]):
        for eqn in jaxpr.eqns:
            if eqn.primitive.multiple_results or any(
                    isinstance(v, (jax.extend.core.Jaxpr, jax.extend.core.ClosedJaxpr))
                    for v in eqn.params.values()):
                raise ValueError(f"schedule_table: {eqn.primitive} (a nested or multi-output "
                                 "operation) is not evaluated here; tabulate per step instead")
            args = [np.asarray(read(v), v.aval.dtype) for v in eqn.invars]
            if eqn.primitive in _NUMPY_OPS:
                out = _NUMPY_OPS[eqn.primitive](*args)
            elif eqn.primitive is jax.lax.convert_element_type_p:
                out = args[0].astype(eqn.params["new_dtype"])
            else:
                shape = np.broadcast_shapes(*(a.shape for a in args))
                out = eqn.primitive.bind(*(np.broadcast_to(a, shape) for a in args), **eqn.params)
            env[eqn.outvars[0]] = np.asarray(out, eqn.outvars[0].aval.dtype)
    # float64: a constant schedule returns its Python float, which float32 would round.
    return np.broadcast_to(np.asarray(read(jaxpr.outvars[0]), np.float64), (n,)).copy()


@dataclasses.dataclass
class State:
    model: nn.Module
    step_model: Callable  # eager module or its torch.compile'd version
    optimizer: torch.optim.Optimizer
    step: int = 0


@dataclasses.dataclass
class Trainer:
    """The torch counterpart of `trainer.Trainer` (the `loop.Trainer` contract)."""

    cfg: Config
    train: data.Split
    test: data.Split
    compile_mode: str | None = None  # None: eager; "default" or "reduce-overhead": torch.compile
    device: str | None = None

    grouped = False  # `--seeds` runs the twin's seeds one after another, one Trainer each

    def __post_init__(self):
        self.seeds = (self.cfg.seed,)
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        # cfg.dtype bfloat16: autocast, PyTorch's counterpart of flax's compute dtype (float32
        # parameters and optimizer state; autocast keeps BatchNorm and the loss in float32).
        self.autocast = functools.partial(torch.autocast, self.device, dtype=torch.bfloat16,
                                          enabled=self.cfg.dtype == "bfloat16")
        self.mean, self.std = data.channel_stats(self.train.images)
        self.train_size, self.eval_size = len(self.train), len(self.test)
        self.steps_per_epoch = data.steps_per_epoch(self.train_size, self.cfg.batch_size)
        # optax's schedule (one formula for both), tabulated once: evaluating it per step ran JAX
        # ops on JAX's default device (the GPU) and waited for them, ~1.8 ms of host overhead per
        # step on an H200, which made every PyTorch variant look slow on the cosine-schedule
        # (Tiny ImageNet) experiments. Steps past the end clamp, as optax's schedules do.
        table = schedule_table(make_schedule(self.cfg, self.steps_per_epoch),
                               self.cfg.epochs * self.steps_per_epoch + 1)
        self.schedule = lambda step: float(table[min(step, len(table) - 1)])
        put = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
        self.dev = {"train": (put(self.train.images), put(self.train.labels).long()),
                    "test": (put(self.test.images), put(self.test.labels).long())}
        self._mean, self._std = put(self.mean), put(self.std)
        self.eval_idx, self.eval_mask = data.eval_order(self.eval_size, self.cfg.batch_size)
        self.compile_time_s = 0.0

    def init_state(self) -> State:
        torch.manual_seed(self.cfg.seed)
        model = build(self.cfg.model, self.cfg.num_classes, self.cfg.image_size).to(self.device)
        if self.cfg.optimizer == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=self.cfg.learning_rate)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=self.cfg.learning_rate,
                                  momentum=self.cfg.momentum)
        step_model = model
        if self.compile_mode:
            step_model = torch.compile(model, mode=self.compile_mode)
        return State(model, step_model, opt)

    def param_count(self, state: State) -> int:
        return sum(p.numel() for p in state.model.parameters())

    def _batch(self, split: str, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = self.dev[split]
        i = torch.from_numpy(idx).to(self.device)
        return preprocess(images[i], self._mean, self._std, self.cfg.image_size), labels[i]

    def _train_step(self, state: State, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._batch("train", idx)
        for group in state.optimizer.param_groups:
            group["lr"] = self.schedule(state.step)
        with self.autocast():
            logits = state.step_model(x).float()
        loss = F.cross_entropy(logits, y, reduction="sum")
        state.optimizer.zero_grad(set_to_none=True)
        (loss / len(y)).backward()
        state.optimizer.step()
        state.step += 1
        return loss.detach(), (logits.argmax(1) == y).sum()

    def compile(self, state: State) -> float:
        """torch.compile compiles lazily on the first call; eager has nothing to compile.

        Warm-up steps would change the state, so for compiled modes the first epoch carries the
        compile time; `mean_epoch_time_s` excludes that epoch when there are more.
        """
        return 0.0

    checkpointable = False  # resume is a feature of the JAX path

    def zero_sums(self) -> dict:
        return {"loss": torch.zeros((), device=self.device),
                "correct": torch.zeros((), dtype=torch.long, device=self.device), "count": 0}

    def summarize(self, sums: dict) -> list[dict]:
        n = max(sums["count"], 1)
        return [{"loss": sums["loss"].item() / n, "acc": sums["correct"].item() / n,
                 "count": sums["count"]}]

    def train_epoch(self, state: State, epoch: int, sums: dict | None = None, start: int = 0,
                    progress: Callable[[int], None] = lambda n: None,
                    stop: Callable[[], bool] = lambda: False) -> tuple[State, dict, int]:
        """Same contract as `trainer.Trainer.train_epoch`. The NaN check runs every 100 steps (a
        host sync), so a divergence is reported at the first check after it."""
        state.model.train()
        order = self._epoch_indices(
            data.epoch_order(self.cfg.seed, epoch, self.train_size, self.cfg.batch_size))
        sums = self.zero_sums() if sums is None else sums
        done = start
        for done, idx in enumerate(order[start:], start + 1):
            if stop():
                done -= 1
                break
            loss, right = self._train_step(state, idx)
            sums["loss"] += loss
            sums["correct"] += right
            sums["count"] += len(idx)
            if (done % 100 == 0 or done == len(order)) and not torch.isfinite(sums["loss"]):
                raise Diverged(epoch, done)
            progress(len(idx))
        return state, sums, done

    def _epoch_indices(self, order: np.ndarray):
        """The epoch's (steps, batch) indices as `_train_step` takes them: host rows here."""
        return order

    @torch.no_grad()
    def evaluate(self, state: State) -> list[dict]:
        state.model.eval()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        for idx, mask in zip(self.eval_idx, self.eval_mask):
            x, y = self._batch("test", idx)
            with self.autocast():
                logits = state.model(x).float()
            m = torch.from_numpy(mask).to(self.device)
            loss_sum += (F.cross_entropy(logits, y, reduction="none") * m).sum()
            correct += ((logits.argmax(1) == y) & m).sum()
        n = int(self.eval_mask.sum())
        return [{"loss": loss_sum.item() / n, "acc": correct.item() / n, "count": n}]

    def global_step(self, state: State) -> int:
        return state.step

    def param_leaves(self, state: State, member: int = 0) -> list[np.ndarray]:
        return [p.detach().cpu().numpy() for p in state.model.parameters()]

    def lr(self, state: State) -> float:
        return self.schedule(max(state.step - 1, 0))

    def record(self) -> dict:
        return {"torch_compile": self.compile_mode or "none", "torch_device": self.device}

    def adopt(self, progress: dict) -> None:
        """Nothing to adopt: the twin keeps no checkpoints."""
