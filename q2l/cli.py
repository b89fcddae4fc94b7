"""The ``q2l`` command line: it parses, loads the config once, hands typed objects to the working layer.

Imports of the heavy layers happen inside each command so that ``q2l --help`` and config errors are instant.
"""

from __future__ import annotations

from pathlib import Path

import typer

from q2l.config import Config, ConfigError, ResolvedConfig, resolve_config

app = typer.Typer(
    help="Query2Label on Ray + MLflow: data, train, tune, promote, predict, bench.", no_args_is_help=True
)
data_app = typer.Typer(help="Data sets: make the demo set, validate a set.", no_args_is_help=True)
app.add_typer(data_app, name="data")
config_app = typer.Typer(help="Configs: show the resolved config.", no_args_is_help=True)
app.add_typer(config_app, name="config")

CONFIG_OPT = typer.Option(
    None, "--config", "-c", help="YAML config under experiments/ (defaults if omitted)."
)
SET_OPT = typer.Option(None, "--set", "-s", help="Override one key: section.key=value (repeatable).")


def _resolved(config: Path | None, overrides: list[str] | None) -> ResolvedConfig:
    """File, --set and MLflow's variables, validated; a bad config exits 2 before anything starts."""
    try:
        return resolve_config(config, overrides or [])
    except ConfigError as e:
        typer.secho(f"config error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None


def _config(config: Path | None, overrides: list[str] | None) -> Config:
    """The config every command runs with (see ``_resolved``)."""
    return _resolved(config, overrides).config


@config_app.command("show")
def config_show(config: Path | None = CONFIG_OPT, set: list[str] | None = SET_OPT) -> None:
    """Print the resolved config as YAML, each given key marked with its source (file, --set, $VARIABLE)."""
    typer.echo(_resolved(config, set).to_annotated_yaml(), nl=False)


@data_app.command("demo")
def data_demo(
    out: Path = typer.Option(
        Path("data/demo"), "--out", help="Folder to write the COCO-layout demo set into."
    ),
    train: int = typer.Option(8000, "--train", min=1, help="Number of training images."),
    val: int = typer.Option(2000, "--val", min=1, help="Number of validation (test) images."),
    size: int = typer.Option(96, "--size", min=32, help="Image side in pixels."),
    seed: int = typer.Option(0, "--seed", help="Seed: the same seed gives the same set."),
) -> None:
    """Write the real-image demo set (Fashion-MNIST items on scikit-image photos) in COCO 2014 layout."""
    from q2l.data.demo import DemoSourceError, make_demo_dataset

    try:
        summary = make_demo_dataset(out, num_train=train, num_val=val, size=size, seed=seed)
    except DemoSourceError as e:
        typer.secho(str(e), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    typer.echo(summary)


@data_app.command("validate")
def data_validate(
    format: str = typer.Option("coco", "--format", help="coco | voc | csv"),
    annotations: Path | None = typer.Option(
        None, "--annotations", help="COCO instances JSON, or the CSV/JSONL file."
    ),
    images: Path | None = typer.Option(None, "--images", help="Image folder (COCO, CSV)."),
    root: Path | None = typer.Option(None, "--root", help="VOC: the VOC2007 folder."),
    max_image_pixels: int | None = typer.Option(
        None, "--max-image-pixels", min=1, help="Decoding limit (data.max_image_pixels; default its default)."
    ),
) -> None:
    """Scan a whole data set and list every problem; exit 1 if there is any, 2 for bad arguments."""
    from q2l.data.validate import ArgumentsError, validate_dataset

    limit = {"max_pixels": max_image_pixels} if max_image_pixels is not None else {}
    try:
        problems = validate_dataset(format=format, annotations=annotations, images=images, root=root, **limit)
    except ArgumentsError as e:
        typer.secho(f"usage error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    for p in problems:
        typer.echo(str(p))
    typer.echo(f"{len(problems)} problem(s)")
    raise typer.Exit(1 if problems else 0)


@app.command()
def train(config: Path | None = CONFIG_OPT, set: list[str] | None = SET_OPT) -> None:
    """Train one run on Ray Train (DDP workers), recorded in MLflow."""
    cfg = _config(config, set)
    from q2l.data import DataError
    from q2l.tracking import TrackingUnavailableError
    from q2l.train import TrainingInputError, TrainingRunError, run_training

    try:
        run_training(cfg)
    except TrainingInputError as e:
        typer.secho(str(e), fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except (TrackingUnavailableError, DataError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except TrainingRunError as e:
        typer.secho(str(e), fg=typer.colors.RED, err=True)
        raise typer.Exit(1) from None


@app.command()
def tune(
    config: Path | None = CONFIG_OPT,
    set: list[str] | None = SET_OPT,
    resume: bool = typer.Option(False, "--resume", help="Restore an interrupted sweep of the same name."),
) -> None:
    """Sweep with Ray Tune (Optuna TPE + ASHA); each trial is a Ray Train run; the best becomes challenger."""
    cfg = _config(config, set)
    from q2l.sweep.runner import run_sweep
    from q2l.sweep.state_integrity import SweepStateError
    from q2l.tracking import TrackingUnavailableError

    try:
        run_sweep(cfg, resume=resume)
    except (ConfigError, TrackingUnavailableError, SweepStateError) as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


@app.command()
def promote(
    model: str = typer.Option(..., "--model", "-m", help="Registered model name, e.g. q2l-demo."),
    candidate: str | None = typer.Option(
        None, "--candidate", help="Version number or @alias to evaluate (default @challenger)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Evaluate and print the table; change nothing."),
    rollback: bool = typer.Option(False, "--rollback", help="Move @champion back to @previous-champion."),
    config: Path | None = CONFIG_OPT,
    set: list[str] | None = SET_OPT,
) -> None:
    """Gate a candidate against @champion on the test split and move the aliases.

    Exit code 0 promoted (or would be, with --dry-run), 1 refused (gate or label mismatch), 2 usage error.
    """
    cfg = _config(config, set)
    from q2l.registry.promote import run_promote

    code = run_promote(
        cfg,
        model,
        candidate,
        dry_run=dry_run,
        rollback_=rollback,
        error=lambda line: typer.secho(line, fg=typer.colors.RED, err=True),
    )
    raise typer.Exit(code)


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., help="Image files and/or folders (searched recursively)."),
    model: str = typer.Option(
        ...,
        "--model",
        "-m",
        help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, or a checkpoint (best.pt).",
    ),
    top_k: int | None = typer.Option(None, "--top-k", min=1, help="Show at most K labels per image."),
    threshold: float | None = typer.Option(
        None, "--threshold", min=0.0, max=1.0, help="Show labels with probability >= T (0.5 unless --top-k)."
    ),
    format: str = typer.Option("table", "--format", help="table | json | csv"),
    explain: Path | None = typer.Option(
        None, "--explain", help="Folder for per-image attention-map figures (PNG), one panel per shown label."
    ),
    batch_size: int = typer.Option(32, "--batch-size", min=1, help="Images per forward pass."),
    config: Path | None = CONFIG_OPT,
    set: list[str] | None = SET_OPT,
) -> None:
    """Label images with a registered model or a training checkpoint; unreadable images are listed, not fatal.

    Exit code 0 when images were labelled, 1 when none could be read, 2 usage error.
    """
    cfg = _config(config, set)
    from q2l.registry.predict import run_predict
    from q2l.tracking import tracking_uri

    code = run_predict(
        model,
        images,
        top_k=top_k,
        threshold=threshold,
        fmt=format,
        explain_dir=explain,
        batch_size=batch_size,
        tracking_uri=tracking_uri(cfg),
        max_image_pixels=cfg.data.max_image_pixels,
    )
    raise typer.Exit(code)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, add_help_option=False
)
def bench(ctx: typer.Context) -> None:
    """Benchmarks: q2l bench [PART ...] [OPTIONS]; parts a b c d e seed, `q2l bench --help` for options."""
    import sys

    repo = Path(__file__).resolve().parents[1]
    if not (repo / "experiments" / "benchmarks" / "suite.py").is_file():
        typer.secho("q2l bench needs the source checkout", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    sys.path.insert(0, str(repo))
    from experiments.benchmarks.suite import main

    raise typer.Exit(main(list(ctx.args)))


if __name__ == "__main__":
    app()
