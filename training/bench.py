"""``bpstream bench inference``: eager PyTorch vs TorchScript vs ONNX Runtime on the exported model, in one
process, batch sizes 1..512: windows/s, latency percentiles, ratios against eager batch 1, and the fraction
of the machine's measured dense matmul FLOP/s that the model reaches (FLOPs per window from the metadata,
LSTM included)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bpstream.shared.modelspec import MODEL_CHANNELS, WINDOW_SAMPLES


def matmul_flops(device: str, seconds: float = 1.0) -> float:
    """Sustained float32 matmul FLOP/s of this device (square matrices, 1024 on CPU, 4096 on CUDA)."""
    import torch

    n = 4096 if device.startswith("cuda") else 1024
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    for _ in range(3):
        a @ b
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    return 2.0 * n**3 * reps / (time.perf_counter() - t0)


def _measure(fn: Callable[[], None], seconds: float, sync: Callable[[], None]) -> list[float]:
    for _ in range(3):
        fn()
    sync()
    lat: list[float] = []
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end or len(lat) < 5:
        t0 = time.perf_counter()
        fn()
        sync()
        lat.append(time.perf_counter() - t0)
    return lat


def run_bench(model_path: Path | None, batch_sizes: list[int], seconds: float, device: str,
              threads: int | None, out: Path | None, log: Callable[[str], None] = print) -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    from bpstream.shared.model.metadata import ONNX_FILE, TORCHSCRIPT_FILE, WEIGHTS_FILE, ModelMetadata
    from bpstream.shared.model.network import Deployable
    from bpstream.shared.model.runtime import DEFAULT_MODELS_ROOT, latest_model_dir
    from bpstream.training.export import build_net, load_checkpoint

    directory = latest_model_dir(model_path or DEFAULT_MODELS_ROOT)
    meta = ModelMetadata.read(directory)
    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    net, stats = build_net(load_checkpoint(directory / WEIGHTS_FILE))
    eager = Deployable(net, stats).to(dev).eval()
    scripted = torch.jit.load(str(directory / TORCHSCRIPT_FILE), map_location=dev).eval()
    so = ort.SessionOptions()
    # Same thread count as torch, so the runtimes are compared on equal hardware.
    so.intra_op_num_threads = threads or torch.get_num_threads()
    providers = (["CUDAExecutionProvider", "CPUExecutionProvider"]
                 if dev.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers()
                 else ["CPUExecutionProvider"])
    sess = ort.InferenceSession(str(directory / ONNX_FILE), so, providers=providers)
    in_name = sess.get_inputs()[0].name
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    flops_window = float(meta.flops_per_window.get("total", 0))
    peak = matmul_flops(dev)
    log(f"model {meta.version}: {meta.parameters} parameters, {flops_window / 1e6:.1f} MFLOP/window; device "
        f"{dev}; torch threads {torch.get_num_threads()}; ONNX Runtime {sess.get_providers()[0]}; "
        f"measured matmul {peak / 1e9:.1f} GFLOP/s")
    rng = np.random.default_rng(0)
    rows: list[dict[str, Any]] = []
    for b in batch_sizes:
        x_np = rng.normal(size=(b, len(MODEL_CHANNELS), WINDOW_SAMPLES)).astype(np.float32)
        x_t = torch.from_numpy(x_np).to(dev)

        def run_eager(x: Any = x_t) -> None:
            with torch.inference_mode():
                eager(x)

        def run_ts(x: Any = x_t) -> None:
            with torch.inference_mode():
                scripted(x)

        def run_onnx(x: Any = x_np) -> None:
            sess.run(None, {in_name: x})

        for name, fn in (("eager", run_eager), ("torchscript", run_ts), ("onnxruntime", run_onnx)):
            lat = np.asarray(_measure(fn, seconds, sync))
            wps = b / float(lat.mean())
            rows.append({"runtime": name, "batch": b, "windows_per_s": wps,
                         "p50_ms": float(np.percentile(lat, 50) * 1e3), "p95_ms": float(np.percentile(lat, 95) * 1e3),
                         "p99_ms": float(np.percentile(lat, 99) * 1e3), "iterations": int(lat.size),
                         "flops_fraction": wps * flops_window / peak if peak else None})
    base = next(r["windows_per_s"] for r in rows if r["runtime"] == "eager" and r["batch"] == batch_sizes[0])
    log(f"{'runtime':<12}{'batch':>6}{'win/s':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'x eager b1':>11}"
        f"{'% matmul':>10}")
    for r in rows:
        r["ratio_vs_eager_batch1"] = r["windows_per_s"] / base
        log(f"{r['runtime']:<12}{r['batch']:>6}{r['windows_per_s']:>10.0f}{r['p50_ms']:>9.2f}{r['p95_ms']:>9.2f}"
            f"{r['p99_ms']:>9.2f}{r['ratio_vs_eager_batch1']:>11.2f}{100 * (r['flops_fraction'] or 0):>9.1f}%")
    result = {"model": meta.version, "device": dev, "torch_threads": torch.get_num_threads(),
              "matmul_flops": peak, "flops_per_window": flops_window, "rows": rows}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
    return result


def compare_models(baseline: Path, candidate: Path, runtime: str = "onnx", batch_sizes: tuple[int, ...] = (1, 64, 256),
                   repeats: int = 7, seconds: float = 0.4) -> list[dict[str, Any]]:
    """CPU cost per window of two model versions in one process, interleaved, median of ``repeats`` runs:
    the ratio is what to read (timings on a shared machine are noisy)."""
    import statistics

    from bpstream.shared.model.runtime import load_model

    models = {name: load_model(Path(path), runtime, device="cpu", threads=1)  # type: ignore[arg-type]
              for name, path in (("baseline", baseline), ("candidate", candidate))}
    x = np.random.default_rng(0).normal(size=(max(batch_sizes), len(MODEL_CHANNELS), WINDOW_SAMPLES))
    x = x.astype(np.float32)
    rows = []
    for b in batch_sizes:
        times: dict[str, list[float]] = {"baseline": [], "candidate": []}
        for _ in range(repeats):
            for name, model in models.items():
                n, t0 = 0, time.perf_counter()
                while time.perf_counter() - t0 < seconds:
                    model.predict(x[:b])
                    n += b
                times[name].append((time.perf_counter() - t0) / n * 1e3)
        base, cand = statistics.median(times["baseline"]), statistics.median(times["candidate"])
        rows.append({"runtime": runtime, "batch": b, "baseline_ms_per_window": base,
                     "candidate_ms_per_window": cand, "ratio": cand / base})
    return rows
