"""`torch-best`: the twin as a PyTorch expert would tune it, so JAX-vs-PyTorch compares best with best.

Same model, initialization, data order, schedule and outputs as `torch_twin.Trainer` (its
numerics: tests/test_torch_twin.py checks the trajectories agree); different only in how the
step runs:
- channels_last memory format for the model and its inputs (cuDNN's fast NHWC kernels);
- on CUDA: `cudnn.benchmark` (autotuned convolution algorithms) and TF32 for float32
  convolutions and matmuls, which is what XLA does on the same GPUs by default (its "DEFAULT"
  precision), so both sides run the same precision; on CPU everything is float32, as for JAX;
- fused Adam / SGD with the learning rate a device tensor updated in place, so the schedule
  neither syncs with the host nor triggers a recompile;
- gather, preprocessing, forward and loss compiled as one graph with `torch.compile`
  (`max-autotune` on CUDA, whose CUDA graphs also remove the per-kernel launch cost; the default
  mode on CPU, where max-autotune only lengthens the compile); the backward pass is compiled by
  the same call (AOTAutograd). Its autotuning picks matmul kernels among cuBLAS and Triton and
  convolutions among cuDNN's algorithms (`cudnn.benchmark`), not Triton's convolution templates:
  on an H200 those ran 3-7x slower than cuDNN on every convolution of these models and lost
  every time, after 115-150+ s of autotuning per experiment
  (results/speed/2026-11-27-907150c-nvidia-h200/);
- the epoch's index array uploaded once per epoch, not once per step.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from jaxbench.torch_twin import State, Trainer, build, preprocess

# max-autotune's candidates for convolutions: ATen's (cuDNN's, which cudnn.benchmark tunes) only.
CONV_BACKENDS = "ATEN"


class BestTrainer(Trainer):
    """`torch_twin.Trainer` with the step tuned as the module docstring lists."""

    def __post_init__(self):
        super().__post_init__()
        self.cuda = self.device.startswith("cuda")
        self.compile_mode = "best"
        self.inductor_mode = "max-autotune" if self.cuda else "default"

    def init_state(self) -> State:
        torch.manual_seed(self.cfg.seed)
        model = build(self.cfg.model, self.cfg.num_classes, self.cfg.image_size).to(self.device)
        model = model.to(memory_format=torch.channels_last)
        lr = torch.tensor(self.schedule(0), dtype=torch.float32, device=self.device)
        if self.cfg.optimizer == "adam":
            opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=self.cfg.momentum,
                                  fused=True)
        images, labels = self.dev["train"]
        size, mean, std = self.cfg.image_size, self._mean, self._std

        def forward(idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = preprocess(images[idx], mean, std, size).contiguous(
                memory_format=torch.channels_last)
            y = labels[idx]
            with self.autocast():
                logits = model(x).float()
            return F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum()

        step_fn = torch.compile(forward, mode=self.inductor_mode, dynamic=False)
        return State(model, step_fn, opt)

    @contextlib.contextmanager
    def _backend_flags(self) -> Iterator[None]:
        """cudnn.benchmark, TF32 and the convolution autotuning choice while this trainer runs,
        restored after: they are global in PyTorch, and the benchmark runs the plain twin in the
        same process."""
        flags = (torch.backends.cudnn, "benchmark"), (torch.backends.cudnn, "allow_tf32"), \
            (torch.backends.cuda.matmul, "allow_tf32")
        before = [getattr(obj, name) for obj, name in flags]
        inductor = contextlib.nullcontext()
        if self.cuda:
            from torch._inductor import config as inductor_config

            for obj, name in flags:
                setattr(obj, name, True)
            inductor = inductor_config.patch(max_autotune_conv_backends=CONV_BACKENDS)
        try:
            with inductor:
                yield
        finally:
            for (obj, name), value in zip(flags, before):
                setattr(obj, name, value)

    def evaluate(self, state: State) -> list[dict]:
        with self._backend_flags():
            return super().evaluate(state)

    def _set_lr(self, state: State) -> None:
        for group in state.optimizer.param_groups:  # in place: the compiled step sees no change
            group["lr"].fill_(self.schedule(state.step))

    def _train_step(self, state: State, idx: np.ndarray | torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on `idx`: a row of the device-resident epoch order (or host indices)."""
        if isinstance(idx, np.ndarray):
            idx = torch.from_numpy(idx).to(self.device)
        with self._backend_flags():
            self._set_lr(state)
            loss, right = state.step_model(idx)
            state.optimizer.zero_grad(set_to_none=True)
            (loss / idx.shape[0]).backward()
            state.optimizer.step()
        state.step += 1
        return loss.detach(), right

    def _epoch_indices(self, order: np.ndarray) -> torch.Tensor:
        """The epoch's indices on the device once, not once per step."""
        return torch.from_numpy(order).to(self.device)

    def train_epoch(self, state: State, epoch: int, *args, **kwargs) -> tuple[State, dict, int]:
        with self._backend_flags():
            return super().train_epoch(state, epoch, *args, **kwargs)

    def lr(self, state: State) -> float:
        return self.schedule(max(state.step - 1, 0))

    def record(self) -> dict:
        return {"torch_compile": "best", "torch_device": self.device,
                "torch_best": {"memory_format": "channels_last", "fused_optimizer": True,
                               "inductor_mode": self.inductor_mode,
                               "conv_autotune": CONV_BACKENDS if self.cuda else None,
                               "cudnn_benchmark": bool(self.cuda),
                               "tf32": bool(self.cuda), "lr": "device tensor",
                               "indices": "uploaded once per epoch"}}
