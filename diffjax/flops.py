"""FLOPs of a compiled program and the peak FLOP/s of the device: TFLOP/s per device and MFU.

- `step_flops(stage)`: XLA's cost analysis of a `jax.jit(...).lower(...)` (Lowered) or of its
  `.compile()` (Compiled). A Compiled SPMD program is counted per device (measured on 8 CPU
  devices, a batch split 8 ways: 1/8 of the unpartitioned count, plus the work every device does
  whole, such as a replicated optimiser update, and the gradient all-reduce's additions); a
  Lowered one is the whole, unpartitioned program. XLA counts a `while` loop's body once
  (`lax.scan` with `unroll=False`); an unrolled scan of n steps is counted n times. On GPUs the
  compiled count may leave out convolutions run as cuDNN custom calls (see diffjax.info).
- `device_peak(device_kind, dtype)`: the datasheet dense peak of one device (`PEAKS`), or None for
  a device the table does not know (the CPU).
- `throughput_metrics(flops_per_step, steps_per_sec, peak)`: TFLOP/s per device and MFU (model
  FLOPs utilisation, a fraction of the peak) for a log line.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PEAKS", "step_flops", "device_peak", "throughput_metrics"]

# Datasheet dense peaks in FLOP/s of one device, by a substring of jax's `device.device_kind`:
# (bfloat16, float32 as the device runs it by default).
PEAKS: dict[str, tuple[float, float]] = {
    "H100": (989.4e12, 494.7e12),  # SXM; f32 matmuls run as TF32 by default on NVIDIA
    "H200": (989.4e12, 494.7e12),
    "A100": (312e12, 156e12),
    "TPU v4": (275e12, 275e12),  # TPU f32 matmuls default to bf16 passes
    "TPU v5 lite": (197e12, 197e12),
    "TPU v5p": (459e12, 459e12),
    "TPU v6 lite": (918e12, 918e12),
}


def step_flops(stage: Any, steps: int = 1) -> float | None:
    """FLOPs per step of a jitted program's Lowered or Compiled stage that runs `steps` steps
    (XLA's cost analysis divided by `steps`); None when the backend gives no FLOP count."""
    try:
        cost = stage.cost_analysis()
    except (NotImplementedError, RuntimeError):  # a backend without a cost model (XlaRuntimeError: UNIMPLEMENTED)
        return None
    if isinstance(cost, (list, tuple)):  # older jax: one dict per executable
        cost = cost[0] if cost else None
    if not cost or cost.get("flops") is None:
        return None
    return float(cost["flops"]) / max(1, steps)


def device_peak(device_kind: str, dtype: str) -> float | None:
    """Datasheet peak FLOP/s of one `device_kind` device computing in `dtype` ('bfloat16' picks
    the bf16 column, anything else the float32 one); None for a device not in `PEAKS`."""
    for name, (bf16, f32) in PEAKS.items():
        if name.lower() in device_kind.lower():
            return bf16 if str(dtype) == "bfloat16" else f32
    return None


def throughput_metrics(flops_per_step: float | None, steps_per_sec: float, peak: float | None) -> dict[str, float]:
    """A log line's {"tflops_per_device", "mfu"} from one device's FLOPs per step, the measured
    steps/s and the device's peak FLOP/s: empty without a FLOP count, no "mfu" without a peak."""
    if flops_per_step is None:
        return {}
    achieved = flops_per_step * steps_per_sec
    metrics = {"tflops_per_device": achieved / 1e12}
    if peak:
        metrics["mfu"] = achieved / peak
    return metrics
