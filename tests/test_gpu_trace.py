"""benchmarks/gpu_trace.py's reading of a profiler trace, on a hand-made one (no GPU needed)."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_trace.py"


@pytest.fixture(scope="module")
def gpu_trace():
    spec = importlib.util.spec_from_file_location("gpu_trace", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def trace(kernels):
    """A Perfetto-style trace: GPU streams 1 and 2, the GPU's 'XLA Ops' row repeating each kernel
    (to be left out), and a host thread."""
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 1, "args": {"name": "Stream #1"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 2, "args": {"name": "Stream #2"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 9, "args": {"name": "XLA Ops"}},
            {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "thread_name", "pid": 7, "tid": 1, "args": {"name": "python"}}]
    events = [{"ph": "X", "pid": 1, "tid": tid, "name": name, "ts": ts, "dur": dur}
              for tid, name, ts, dur in kernels]
    events += [{**e, "tid": 9} for e in events]  # the coarser row of the same spans
    events.append({"ph": "X", "pid": 7, "tid": 1, "name": "PjitFunction", "ts": 0, "dur": 5000})
    return {"traceEvents": meta + events}


def test_summary_counts_kernels_merges_streams_and_names_the_largest_gaps(gpu_trace):
    # Two calls of two steps each: within a call the kernels are 1-3 us apart, and the streams
    # overlap once; between the calls the GPU waits 4,000 us (a host round trip).
    kernels = [(1, "cudnn_fprop_a", 0, 10), (2, "loop_add_fusion", 5, 10),  # overlap: 0-15
               (1, "input_reduce_fusion", 18, 3), (1, "cudnn_wgrad_b", 22, 8),  # call 1 ends 30
               (1, "cudnn_fprop_a", 4030, 10), (1, "gemm_c", 4042, 6),
               (1, "memcpy_d2h", 4050, 1), (1, "cudnn_wgrad_b", 4053, 7)]  # ends 4060
    events, census = gpu_trace.device_events(trace(kernels))
    assert len(events) == len(kernels)  # neither 'XLA Ops' nor the host is counted
    assert census["/device:GPU:0 | XLA Ops"] == len(kernels)
    s = gpu_trace.summarize(events, steps=4)
    assert s["kernels"] == 8 and s["kernels_per_step"] == 2
    busy = 15 + 3 + 8 + 10 + 6 + 1 + 7
    assert s["kernel_busy_ms_per_step"] == pytest.approx(busy / 4 / 1e3)
    assert s["device_wall_ms_per_step"] == pytest.approx(4060 / 4 / 1e3)
    assert s["idle_ms_per_step"] == pytest.approx((4060 - busy) / 4 / 1e3)
    assert s["median_gap_us"] == pytest.approx(2)
    first, second, *rest = s["largest_gaps"]
    assert first["us"] == pytest.approx(4000) and first["at_ms"] == pytest.approx(0.030)
    assert (first["after"], first["before"]) == ("cudnn_wgrad_b", "cudnn_fprop_a")
    # the gap after the overlapping pair is named by the stream-2 kernel, which ended last
    assert second == {"us": 3.0, "at_ms": 0.015, "after": "loop_add_fusion",
                      "before": "input_reduce_fusion"}
    assert [g["us"] for g in rest] == [2.0, 2.0, 2.0]  # the 1 us gap is the sixth: left out
    assert len(s["largest_gaps"]) == gpu_trace.GAPS == 5
    kinds = s["by_kind"]
    assert kinds["convolution"]["count_per_step"] == 1.0  # 4 cuDNN kernels over 4 steps
    assert kinds["convolution"]["ms_per_step"] == pytest.approx((10 + 8 + 10 + 7) / 4 / 1e3)
    assert kinds["matmul"]["count_per_step"] == 0.25 and kinds["copy"]["count_per_step"] == 0.25
    assert kinds["fusion"]["count_per_step"] == 0.5


def test_summary_of_no_kernels(gpu_trace):
    assert gpu_trace.summarize([], steps=3) == {"kernels": 0}
