"""Speed choices: explicit, typed settings, decided once per run and recorded in summary.json.

An experiment's `[perf]` table (or the CLI) asks for each choice; `resolve` turns "auto" into a
concrete choice for this backend and says why. Model code never looks at the backend: it is handed
the convolution to use (`models.build(..., stem_conv=...)`).

The XLA:CPU compile is the one choice that can change numbers: on some CPUs (an Intel Xeon with
AMX / AVX-512 BF16) keeping YNNPACK for reductions moved TargetCNN's gradients by ~1% while it ran
1.7x faster than XLA's default compile, on others (AMD EPYC) it changed nothing but summation
order. So "auto" is not a CPU-feature rule: it compiles the model's loss-and-gradient under the
candidate option sets, in the order measured fastest (`ynn-reduce` ran fastest on both CPUs
measured, results/speed/), and takes the first whose gradients agree with XLA's default compile to
float32 accuracy (`AGREEMENT`), else XLA's default. Not the fastest by a timing at start: that
would let two runs of one command on one machine compile different programs. The check and its
errors go into summary.json; a resumed run reuses its decision.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable

import numpy as np

DTYPES = ("float32", "bfloat16")  # compute dtype; parameters and optimizer state stay float32
STEM_CONVS = ("auto", "xla", "taps", "patches")  # models.STEM_CONVS
# How a seed group (`--seeds`) runs its seeds: `vmap` batches them in one jitted call (every
# kernel does all seeds' work), `unroll` traces the single-seed step once per seed, one after
# another in the same program; `loop` calls the single-seed compiled step once per seed, each
# seed's state its own arrays (each seed computes exactly what it computes alone).
SEED_GROUPS = ("auto", "vmap", "unroll", "loop")
# Option sets for XLA:CPU's compile (`lowered.compile(compiler_options=...)`). YNNPACK is the
# library XLA:CPU hands convolutions, dots and reductions to by default.
XLA_CPU_OPTIONS: dict[str, dict[str, str]] = {
    "default": {},
    "ynn-reduce": {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_REDUCE"},
    "ynn-off": {"xla_cpu_experimental_ynn_fusion_type": ""},
}
XLA_CPU = ("auto", *XLA_CPU_OPTIONS)
# Largest relative norm difference, per gradient tensor, from XLA's default compile that still
# counts as the same float32 computation. Measured on TargetCNN at batch 8-32: summation order
# alone gives ~2e-6 to 1e-5; the reduced-precision reductions seen on an AMX Xeon gave 4e-3 to
# 1.25e-2. 1e-4 sits a decade from each.
AGREEMENT = 1e-4


@dataclasses.dataclass(frozen=True)
class Perf:
    """What an experiment asks for; "auto" / 0 are decided by `resolve` for the backend at hand."""

    dtype: str = "float32"
    steps_per_call: int = 0  # train steps fused into one jitted call; 0: auto (1 on CPU, 50 else)
    # The first convolution (BaselineCNN, TargetCNN): XLA's, `models.tap_conv` or `patch_conv`
    stem_conv: str = "auto"
    xla_cpu: str = "auto"  # XLA:CPU compile options (a name in XLA_CPU_OPTIONS); ignored off CPU
    seed_group: str = "auto"  # a seed group's program: a name in SEED_GROUPS

    def check(self) -> list[str]:
        """Problems as 'key: message' lines (empty when valid)."""
        bad = []
        for key, allowed in (("dtype", DTYPES), ("stem_conv", STEM_CONVS), ("xla_cpu", XLA_CPU),
                             ("seed_group", SEED_GROUPS)):
            if getattr(self, key) not in allowed:
                bad.append(f"perf.{key} must be one of {allowed}, got {getattr(self, key)!r}")
        steps = self.steps_per_call
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            bad.append(f"perf.steps_per_call must be an integer >= 0 (0: auto), got {steps!r}")
        return bad


@dataclasses.dataclass(frozen=True)
class Resolved:
    """The concrete speed settings a run uses, with the reason for each."""

    dtype: str
    steps_per_call: int
    stem_conv: str
    xla_cpu: str
    reasons: dict[str, str]
    xla_cpu_check: dict | None = None  # the self-check's errors and timings, when one ran
    seed_group: str = "vmap"  # runs recorded before this setting existed vmapped their groups

    @property
    def compiler_options(self) -> dict[str, str]:
        return dict(XLA_CPU_OPTIONS[self.xla_cpu])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"compiler_options": self.compiler_options}

    def line(self) -> str:
        return (f"perf: dtype {self.dtype}, {self.steps_per_call} step(s) per call, stem conv "
                f"{self.stem_conv}, XLA:CPU compile {self.xla_cpu} ({self.reasons['xla_cpu']}), "
                f"seed groups {self.seed_group}")


def resolve(perf: Perf, backend: str, model: str, num_classes: int, batch_size: int,
            image_size: int, previous: dict | None = None,
            choose: Callable[..., tuple[str, dict]] | None = None) -> Resolved:
    """Decide every "auto"; `previous` (a resumed run's record) is reused as it was."""
    if previous is not None:
        return Resolved(**{k: v for k, v in previous.items() if k != "compiler_options"})
    cpu = backend == "cpu"
    reasons = {}
    steps = perf.steps_per_call or (1 if cpu else 50)
    reasons["steps_per_call"] = ("set" if perf.steps_per_call else
                                 "auto: XLA:CPU runs a step slower inside a loop body" if cpu else
                                 "auto: amortizes per-call dispatch on accelerators")
    stem = perf.stem_conv
    if model == "densenet":  # models.build hands DenseNet-BC no stem
        stem, reasons["stem_conv"] = "xla", "DenseNet-BC: XLA's convolutions throughout"
    elif stem == "auto":
        stem = "taps" if cpu and model == "baseline" else "xla"
        reasons["stem_conv"] = ("auto: XLA:CPU's convolution packs a 27-deep GEMM for 3 channels"
                                if stem == "taps" else "auto: XLA's convolution")
    else:
        reasons["stem_conv"] = "set"
    check = None
    xla_cpu = perf.xla_cpu
    if not cpu:
        xla_cpu, reasons["xla_cpu"] = "default", f"not XLA:CPU ({backend})"
    elif xla_cpu == "auto":
        xla_cpu, check = (choose or choose_xla_cpu)(model, num_classes, stem, batch_size,
                                                    image_size)
        reasons["xla_cpu"] = ("auto: the first of the measured-fastest compiles whose gradients "
                              f"agree with XLA's default within {AGREEMENT:g}")
    else:
        reasons["xla_cpu"] = "set"
    group = perf.seed_group
    if group == "auto":
        group = "loop" if cpu else "vmap"
        reasons["seed_group"] = ("auto: on XLA:CPU a group of 3 took 21.7x one seed's time "
                                 "vmapped, 4.9x unrolled, 2.70x looped (results/speed/)" if cpu else
                                 "auto: one seed's step leaves an accelerator mostly idle")
    else:
        reasons["seed_group"] = "set"
    return Resolved(perf.dtype, steps, stem, xla_cpu, reasons, check, group)


def compile_lowered(lowered: Any, options: dict[str, str]) -> tuple[Any, dict[str, str]]:
    """Compile with `options`; returns the executable and the options it really used.

    The options are experimental in XLA: a jaxlib that rejects them gets XLA's defaults, with a
    warning, rather than a failed run.
    """
    if not options:
        return lowered.compile(), {}
    import jax

    try:
        return lowered.compile(compiler_options=options), dict(options)
    except jax.errors.JaxRuntimeError as err:
        warnings.warn(f"XLA rejected {options} ({str(err).splitlines()[0]}); compiling with "
                      "XLA's defaults.", stacklevel=2)
        return lowered.compile(), {}


def gradient_program(model: Any, batch_size: int, image_size: int, num_classes: int,
                     dtype: Any = np.float32, variables: Any = None):
    """The lowered loss-and-gradient of `model` on a fixed random batch (BatchNorm in train mode).

    Returns it with the parameters to call it on; `dtype` float64 (under `jax.enable_x64`) gives
    the float64 reference of the same numbers: same batch, same initial parameters (pass the
    float32 call's `variables`, from `init_variables(model, key(0), ...)`, to skip compiling the
    initializers a second time under x64).
    """
    import jax
    import optax

    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch_size, image_size, image_size, 3)).astype(dtype)
    y = rng.integers(0, num_classes, batch_size)
    if variables is None:
        from jaxbench.train import init_variables

        variables = init_variables(model, jax.random.key(0), x[:1].astype(np.float32))
    variables = jax.tree.map(lambda a: np.asarray(a).astype(dtype), variables)

    def loss(params):
        logits, _ = model.apply({**variables, "params": params}, x, train=True,
                                mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return jax.jit(jax.value_and_grad(loss)).lower(variables["params"]), variables["params"]


def float32_and_float64_steps(name: str, batch_size: int, num_classes: int = 10,
                              image_size: int = 64) -> tuple[Any, Any, Any]:
    """The float32 loss-and-gradient of model `name` (lowered, with its parameters) and the values
    of the same step in float64, from one init, as the yardstick of what float32 can reach.

    BaselineCNN gets its CPU stem (taps), TargetCNN XLA's convolution; the float64 build always
    uses XLA's. Compile the lowered program under each option set and hand both results to
    `relative_errors`.
    """
    import jax

    from jaxbench import models
    from jaxbench.train import init_variables

    model = models.build(name, num_classes, stem_conv="taps" if name == "baseline" else "xla")
    # One init for both programs: the float64 reference gets these values cast, instead of
    # compiling the initializers again under x64.
    variables = init_variables(model, jax.random.key(0),
                               np.zeros((1, image_size, image_size, 3), np.float32))
    lowered, params = gradient_program(model, batch_size, image_size, num_classes,
                                       variables=variables)
    exact_model = models.build(name, num_classes, "float64", stem_conv="xla")
    with jax.enable_x64(True):
        exact_lowered, exact_params = gradient_program(exact_model, batch_size, image_size,
                                                       num_classes, np.float64, variables)
        exact = jax.tree.map(np.asarray, exact_lowered.compile()(exact_params))
    return lowered, params, exact


def relative_errors(result: Any, reference: Any) -> list[float]:
    """Loss error, then each gradient tensor's relative norm difference from `reference`."""
    import jax

    (loss, grads), (ref_loss, ref_grads) = result, reference
    errors = [abs(float(loss) - float(ref_loss)) / max(abs(float(ref_loss)), 1e-30)]
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        g, r = np.asarray(g, np.float64), np.asarray(r, np.float64)
        errors.append(float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30)))
    return errors


@functools.lru_cache(maxsize=None)
def choose_xla_cpu(model_name: str, num_classes: int, stem_conv: str, batch_size: int,
                   image_size: int, candidates: tuple[str, ...] = ("ynn-reduce",),
                   compile_fn: Callable = compile_lowered) -> tuple[str, dict]:
    """The first of `candidates` whose gradients agree with XLA's default compile; the record.

    Checked on the float32 build of the model (the option sets change kernels, not dtypes); one
    decision per process and shape (a cache), since it costs a few compiles.
    """
    from jaxbench import models

    model = models.build(model_name, num_classes, "float32", stem_conv=stem_conv)
    lowered, params = gradient_program(model, batch_size, image_size, num_classes)
    reference_fn, _ = compile_fn(lowered, {})
    reference = reference_fn(params)
    record = {"agreement": AGREEMENT, "batch_size": batch_size,
              "candidates": {"default": {"max_error": 0.0, "agrees": True}}}
    for name in candidates:
        fn, used = compile_fn(lowered, XLA_CPU_OPTIONS[name])
        if used != XLA_CPU_OPTIONS[name]:
            record["candidates"][name] = {"rejected_by_xla": True, "agrees": False}
            continue
        error = max(relative_errors(fn(params), reference))
        record["candidates"][name] = {"max_error": error, "agrees": error <= AGREEMENT}
        if error <= AGREEMENT:
            return name, record
    return "default", record
