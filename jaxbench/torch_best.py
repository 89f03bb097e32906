"""`torch-best`: the twin as a PyTorch expert would tune it, so JAX-vs-PyTorch compares best with best.

Same model, initialization, data order, schedule and outputs as `torch_twin.Trainer` (its
numerics: tests/test_torch_twin.py checks the trajectories agree); different only in how the
step runs:
- channels_last memory format for the model and its inputs (cuDNN's fast NHWC kernels);
- on CUDA: `cudnn.benchmark` (autotuned convolution algorithms) and TF32 for float32
  convolutions and matmuls, which is what XLA does on the same GPUs by default (its "DEFAULT"
  precision), so both sides run the same precision; on CPU everything is float32, as for JAX;
- fused Adam / SGD with the learning rate a device tensor updated in place, so the schedule
  neither syncs with the host nor changes the recorded step;
- gather, preprocessing, forward and loss compiled as one graph by `torch.compile` (Inductor's
  fusions; the backward pass compiled by the same call through AOTAutograd);
- on CUDA the whole train step (gather, preprocessing, forward, loss, backward, optimizer update,
  the batch's loss and correct count) recorded once as one CUDA graph and replayed every step
  (a PyTorch that cannot record it fails the variant, rather than timing something else). That
  removes the per-kernel launch cost and the Python between forward, backward and optimizer that
  `mode="reduce-overhead"`/`"max-autotune"` leave (their CUDA graphs cover forward and backward
  only). Inductor compiles in its default mode: `max-autotune` spent 115-150 s per experiment
  on an H200 (results/speed/2026-11-27-907150c-nvidia-h200/) to pick cuDNN for every
  convolution anyway and Triton matmuls ~0.01 ms faster than cuBLAS on a step of milliseconds;
- the epoch's index array uploaded once per epoch, not once per step.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from jaxbench.torch_twin import State, Trainer, build, preprocess

# Steps run before a CUDA graph is recorded (cudnn.benchmark's search, torch.compile's compile,
# the optimizer's state): on a side stream, as CUDA graphs need, and undone afterwards.
WARMUP_STEPS = 3

Body = Callable[[State, torch.Tensor], "tuple[torch.Tensor, torch.Tensor]"]


@dataclasses.dataclass
class BestState(State):
    recorded: "RecordedStep | None" = None  # every batch has one shape (data.epoch_order)


def _snapshot(state: State) -> tuple[list[torch.Tensor], dict]:
    """Copies of everything a train step changes: parameters, BatchNorm statistics, optimizer
    state."""
    model = [t.detach().clone() for t in (*state.model.parameters(), *state.model.buffers())]
    opt = {p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)}
           for p, s in state.optimizer.state.items()}
    return model, opt


@torch.no_grad()
def _restore(state: State, saved: tuple[list[torch.Tensor], dict]) -> None:
    """Back to `saved`, in place (a recorded graph keeps the tensors' addresses). Optimizer state
    the warm-up created is zeroed, which is the state a first step starts from: Adam's step count
    and moments, SGD's momentum buffer (momentum * 0 + gradient is the first step's buffer, with
    the dampening of 0 this project uses)."""
    model, opt = saved
    for t, old in zip((*state.model.parameters(), *state.model.buffers()), model):
        t.copy_(old)
    for p, s in state.optimizer.state.items():
        for k, v in s.items():
            if torch.is_tensor(v):
                v.copy_(opt[p][k]) if p in opt else v.zero_()


class RecordedStep:
    """One train step recorded once and replayed: `body` on a fixed index buffer.

    The warm-up steps change the state they train, so the state is copied before them and put
    back after; what the recorded graph then does from that state is exactly one step of `body`.
    `cuda=False` runs the same warm-up and restore and calls `body` instead of replaying it, which
    is how the CPU tests check that recording leaves the numbers alone.
    """

    def __init__(self, body: Body, state: State, idx: torch.Tensor, cuda: bool):
        self.body, self.state, self.idx, self.graph = body, state, idx.clone(), None
        saved = _snapshot(state)
        side = torch.cuda.Stream() if cuda else None
        if cuda:
            side.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                for _ in range(WARMUP_STEPS):
                    body(state, self.idx)
        finally:
            if cuda:
                torch.cuda.current_stream().wait_stream(side)
        _restore(state, saved)
        state.optimizer.zero_grad(set_to_none=True)  # backward allocates them in the graph's pool
        if cuda:
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = body(state, self.idx)

    def __call__(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step on `idx`. The outputs are the graph's own buffers, overwritten by the next
        replay: the caller adds them up before then (the epoch loop does, on the same stream)."""
        self.idx.copy_(idx)
        if self.graph is None:
            return self.body(self.state, self.idx)
        self.graph.replay()
        return self.out


class BestTrainer(Trainer):
    """`torch_twin.Trainer` with the step tuned as the module docstring lists."""

    def __post_init__(self):
        super().__post_init__()
        self.cuda = self.device.startswith("cuda")
        self.compile_mode = "best"
        self.inductor_mode = "default"
        self.recorded = self.cuda  # the whole step as one CUDA graph

    def init_state(self) -> BestState:
        torch.manual_seed(self.cfg.seed)
        model = build(self.cfg.model, self.cfg.num_classes, self.cfg.image_size).to(self.device)
        model = model.to(memory_format=torch.channels_last)
        lr = torch.tensor(self.schedule(0), dtype=torch.float32, device=self.device)
        if self.cfg.optimizer == "adam":  # capturable: its step count stays on the device
            opt = torch.optim.Adam(model.parameters(), lr=lr, fused=True, capturable=self.cuda)
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
        return BestState(model, step_fn, opt)

    @contextlib.contextmanager
    def _backend_flags(self) -> Iterator[None]:
        """cudnn.benchmark and TF32 while this trainer runs, restored after: they are global in
        PyTorch, and the benchmark runs the plain twin in the same process."""
        flags = (torch.backends.cudnn, "benchmark"), (torch.backends.cudnn, "allow_tf32"), \
            (torch.backends.cuda.matmul, "allow_tf32")
        before = [getattr(obj, name) for obj, name in flags]
        if self.cuda:
            for obj, name in flags:
                setattr(obj, name, True)
        try:
            yield
        finally:
            for (obj, name), value in zip(flags, before):
                setattr(obj, name, value)

    def evaluate(self, state: State) -> list[dict]:
        with self._backend_flags():
            return super().evaluate(state)

    def _set_lr(self, state: State) -> None:
        for group in state.optimizer.param_groups:  # in place: the recorded step reads it
            group["lr"].fill_(self.schedule(state.step))

    @staticmethod
    def _body(state: State, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss, right = state.step_model(idx)
        state.optimizer.zero_grad(set_to_none=True)
        (loss / idx.shape[0]).backward()
        state.optimizer.step()
        return loss.detach(), right

    def _train_step(self, state: BestState, idx: np.ndarray | torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step on `idx`: a row of the device-resident epoch order (or host indices)."""
        if isinstance(idx, np.ndarray):
            idx = torch.from_numpy(idx).to(self.device)
        with self._backend_flags():
            self._set_lr(state)
            if not self.recorded:
                loss, right = self._body(state, idx)
            else:  # recorded at the first step; a failure to record is an error, not a fallback
                if state.recorded is None:
                    state.recorded = RecordedStep(self._body, state, idx, self.cuda)
                loss, right = state.recorded(idx)
        state.step += 1
        return loss, right

    def _epoch_indices(self, order: np.ndarray) -> torch.Tensor:
        """The epoch's indices on the device once, not once per step."""
        return torch.from_numpy(order).to(self.device)

    def train_epoch(self, state: State, epoch: int, *args, **kwargs) -> tuple[State, dict, int]:
        with self._backend_flags():
            return super().train_epoch(state, epoch, *args, **kwargs)

    def lr(self, state: State) -> float:
        return self.schedule(max(state.step - 1, 0))

    def record(self) -> dict:
        graph = "whole step" if self.recorded and self.cuda else None
        return {"torch_compile": "best", "torch_device": self.device,
                "torch_best": {"memory_format": "channels_last", "fused_optimizer": True,
                               "inductor_mode": self.inductor_mode, "cuda_graph": graph,
                               "cudnn_benchmark": bool(self.cuda),
                               "tf32": bool(self.cuda), "lr": "device tensor",
                               "indices": "uploaded once per epoch"}}
