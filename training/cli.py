"""Commands of the model area: ``bpstream train``, ``evaluate``, ``export`` and ``bench inference``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DEFAULT_RUNS = Path(".local/runs")


def _threads(n: int | None) -> None:
    """Set torch's CPU threads. Default: all cores, or 1 when the machine is already busy, because OpenMP
    threads that spin-wait for a core others hold make training several times slower (measured 5x here)."""
    import os

    import torch

    if not n:
        cores = os.cpu_count() or 1
        n = 1 if os.getloadavg()[0] > 0.75 * cores else cores
    torch.set_num_threads(n)


def register(app: typer.Typer, bench: typer.Typer) -> None:
    """Add this area's commands to the ``bpstream`` app and its ``bench`` group."""

    @app.command("train")
    def train(
        data: Annotated[Path | None, typer.Option(
            help="../shared/data/cinc2015 (real ICU records: the product model) or a simulated dataset folder "
                 "(default: simulate a cohort).")] = None,
        study: Annotated[Path | None, typer.Option(
            help="Real data: the `bpstream evaluate` report of the cross-validation, whose out-of-fold residuals "
                 "set the interval half-widths and calibration gains.")] = None,
        subjects: Annotated[int, typer.Option(help="Subjects to simulate when --data is not given.")] = 900,
        minutes: Annotated[float, typer.Option(help="Minutes per simulated subject.")] = 4.0,
        data_seed: Annotated[int, typer.Option(help="Seed of the simulated training cohort.")] = 0,
        seed: Annotated[int, typer.Option(help="Seed of splits, initialisation and batching.")] = 0,
        epochs: Annotated[int, typer.Option(help="Maximum epochs (early stopping usually ends sooner).")] = 100,
        patience: Annotated[int, typer.Option(help="Epochs without validation improvement before stopping.")]
        = 6,
        lr: float = 1e-3,
        batch_size: int = 32,
        budget_minutes: Annotated[float, typer.Option(help="Wall-clock budget for data + both trainings.")]
        = 12.0,
        hop: Annotated[float, typer.Option(help="Hop between training windows (s).")] = 10.0,
        augment: Annotated[bool, typer.Option(help="Augment training windows (time shift, gain, noise).")]
        = True,
        pair_weight: Annotated[float, typer.Option(help="Weight of the within-subject pressure-change loss.")]
        = 1.0,
        weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 1e-2,
        dropout: Annotated[float, typer.Option(help="Dropout before the head.")] = 0.1,
        cnn: Annotated[bool, typer.Option(help="Also train the CNN-without-LSTM baseline.")] = True,
        device: Annotated[str, typer.Option(help="auto (CUDA when available), cpu or cuda.")] = "auto",
        threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice).")] = None,
        out: Annotated[Path, typer.Option(help="Folder for training runs.")] = DEFAULT_RUNS,
        export_to: Annotated[Path | None, typer.Option(
            "--export-to", help="Export the trained model into this models root when done.")] = None,
    ) -> None:
        """Train the ResNet-LSTM (and the CNN baseline) with early stopping on subject-disjoint validation."""
        _threads(threads)
        from bpstream.training.real_data import is_cinc2015

        if data is not None and is_cinc2015(data):
            from bpstream.training.real_train import run_real_training

            run = run_real_training(data, out, study_dir=study, seed=seed, log=typer.echo)
            if export_to is not None:
                from bpstream.training.export import export_run

                export_run(run, export_to, log=typer.echo)
            return
        from bpstream.training.train import RunSpec, TrainConfig, run_training

        spec = RunSpec(data=data, n_subjects=subjects, minutes=minutes, data_seed=data_seed, hop_s=hop,
                       budget_minutes=budget_minutes, train_cnn=cnn, dropout=dropout,
                       train=TrainConfig(lr=lr, batch_size=batch_size, max_epochs=epochs, patience=patience,
                                         seed=seed, device=device, augment=augment,
                                         pair_weight=pair_weight, weight_decay=weight_decay))
        run = run_training(spec, out, log=typer.echo)
        if export_to is not None:
            from bpstream.training.export import export_run

            export_run(run, export_to, log=typer.echo)

    @app.command("export")
    def export(
        run: Annotated[Path | None, typer.Argument(help="Training run folder (default: the newest in --runs).")]
        = None,
        runs: Path = DEFAULT_RUNS,
        models_root: Annotated[Path | None, typer.Option(help="Models root (default: the repository's models/).")]
        = None,
        report: Annotated[Path | None, typer.Option(help="metrics.json of an evaluation to embed as test metrics.")]
        = None,
    ) -> None:
        """Export a run to TorchScript + ONNX with metadata, as a new model version folder."""
        from bpstream.shared.model.runtime import DEFAULT_MODELS_ROOT
        from bpstream.training.export import export_run

        if run is None:
            candidates = sorted(p for p in runs.glob("*") if (p / "checkpoint.pt").is_file())
            if not candidates:
                typer.echo(f"no training run in {runs}; run `bpstream train` first", err=True)
                raise typer.Exit(2)
            run = candidates[-1]
        export_run(run, models_root or DEFAULT_MODELS_ROOT, report=report, log=typer.echo)

    @app.command("evaluate")
    def evaluate(
        data: Annotated[list[Path], typer.Option(
            help="Data folder: ../shared/data/cinc2015 (record-grouped cross-validation of the training recipe), "
                 "../shared/data/mimic3-windows (external test of the committed model), ../shared/data/ppg-bp or "
                 "a simulated dataset. Repeat for several (each gets a subfolder of the report).")],
        report: Annotated[Path, typer.Option(help="Output folder for metrics.json, details.json and plots.")],
        model: Annotated[Path | None, typer.Option(help="Model version folder or models root (default: the "
                                                        "committed model).")] = None,
        folds: Annotated[int, typer.Option(help="Subject-grouped folds for the fitted baselines.")] = 5,
        hop: Annotated[float, typer.Option(help="Hop between evaluation windows (s).")] = 4.0,
        seeds: Annotated[str, typer.Option(help="cinc2015: comma-separated training seeds per fold.")] = "0,1,2",
        finetune: Annotated[bool, typer.Option(help="On mimic3: also fine-tune on half the records and "
                                                    "evaluate on the other half.")] = True,
        threads: Annotated[int | None, typer.Option(help="torch CPU threads.")] = None,
    ) -> None:
        """Subject-independent evaluation with baselines, plots and the alerting evaluation."""
        _threads(threads)
        from bpstream.training.evaluate import evaluate_folders

        evaluate_folders(data, report, model, folds=folds, hop_s=hop, finetune=finetune, log=typer.echo,
                         seeds=tuple(int(s) for s in seeds.split(",") if s.strip()))

    @app.command("model-card")
    def model_card(
        study: Annotated[Path, typer.Option(help="Report folder of `bpstream evaluate --data .../cinc2015`.")],
        external: Annotated[Path | None, typer.Option(
            help="Report folder of `bpstream evaluate --data .../mimic3-windows`.")] = None,
        model: Annotated[Path | None, typer.Option(help="Model version folder (default: the committed one).")]
        = None,
        out: Annotated[Path, typer.Option(help="Where to write the card.")] = Path("docs/MODEL_CARD.md"),
    ) -> None:
        """Write docs/MODEL_CARD.md from the evaluation reports and the committed model's metadata."""
        from bpstream.shared.model.runtime import DEFAULT_MODELS_ROOT, latest_model_dir
        from bpstream.training.model_card import write_model_card

        commands = {
            "cross-validation of the recipe (about 15 min on 2 cores)":
                f"bpstream evaluate --data ../shared/data/cinc2015 --report {study} --threads 1",
            "the committed model (trained on all cinc2015 records)":
                f"bpstream train --data ../shared/data/cinc2015 --study {study} --threads 1 --export-to models",
            "external test": f"bpstream evaluate --data ../shared/data/mimic3-windows --report {external}",
            "this card": f"bpstream model-card --study {study} --external {external}",
        }
        notes = study.parent / "NOTES.md"  # the hand-written part: how the numbers came about, what is missing
        write_model_card(study, external, latest_model_dir(model or DEFAULT_MODELS_ROOT), out, commands,
                         extra=notes.read_text() if notes.is_file() else "")
        typer.echo(f"wrote {out}")

    @bench.command("model-ab")
    def bench_model_ab(
        baseline: Annotated[Path, typer.Option(help="Model version folder to compare against.")],
        candidate: Annotated[Path | None, typer.Option(help="Model version folder (default: the committed one).")]
        = None,
        runtime: str = "onnx",
    ) -> None:
        """CPU cost per window of two model versions, interleaved in one process (medians, ratio)."""
        _threads(1)
        from bpstream.shared.model.runtime import DEFAULT_MODELS_ROOT, latest_model_dir
        from bpstream.training.bench import compare_models

        for row in compare_models(baseline, candidate or latest_model_dir(DEFAULT_MODELS_ROOT), runtime):
            typer.echo(f"{row['runtime']} batch {row['batch']}: baseline {row['baseline_ms_per_window']:.3f} "
                       f"ms/window, candidate {row['candidate_ms_per_window']:.3f}, ratio {row['ratio']:.2f}")

    @bench.command("inference")
    def bench_inference(
        model: Annotated[Path | None, typer.Option(help="Model version folder (default: the committed one).")]
        = None,
        batch_sizes: Annotated[str, typer.Option(help="Comma-separated batch sizes.")]
        = "1,2,4,8,16,32,64,128,256,512",
        seconds: Annotated[float, typer.Option(help="Measuring time per (runtime, batch size).")] = 1.0,
        device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
        threads: Annotated[int | None, typer.Option(help="torch / ONNX Runtime CPU threads.")] = None,
        out: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
    ) -> None:
        """Eager vs TorchScript vs ONNX Runtime: windows/s, latency percentiles, ratios, share of matmul FLOP/s."""
        _threads(threads)
        from bpstream.training.bench import run_bench

        run_bench(model, [int(b) for b in batch_sizes.split(",") if b.strip()], seconds, device, threads, out,
                  log=typer.echo)
