"""The `tunery` command line: serve, worker, tune, generate, models, jobs, keys, register.

Errors are one line on stderr and exit code 1; logging is configured here and only here.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tunery.engine.specs import GenerationParams
from tunery.errors import TuneryError
from tunery.settings import Settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
keys_app = typer.Typer(no_args_is_help=True, help="API keys for the server.")
app.add_typer(keys_app, name="keys")
console = Console()
err = Console(stderr=True)
T = TypeVar("T")

DataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Data dir [env TUNERY_DATA_DIR].", show_default=False),
]
DbUrl = Annotated[str | None, typer.Option("--db-url", help="Database URL [env TUNERY_DB_URL].")]
Server = Annotated[
    str | None, typer.Option("--server", help="Talk to a running server at this URL.")
]
ApiKey = Annotated[str | None, typer.Option("--api-key", envvar="TUNERY_API_KEY")]


def _settings(data_dir: Path | None = None, db_url: str | None = None, **extra: Any) -> Settings:
    """Settings from TUNERY_* variables and the defaults, with the options given (not None)."""
    given = {"data_dir": data_dir, "db_url": db_url, **extra}
    overrides = {k: v for k, v in given.items() if v is not None and v != ""}
    try:
        return Settings(**overrides)
    except ValidationError as exc:  # a bad TUNERY_* variable: the user's to fix, in one line
        problems = "; ".join(
            f"TUNERY_{'_'.join(str(part) for part in e['loc']).upper()}: {e['msg']}"
            for e in exc.errors()
        )
        err.print(f"[red]error:[/red] bad setting: {problems}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


def _run(fn: Callable[[], T]) -> T:
    """Turn any TuneryError into one line on stderr and exit 1."""
    try:
        return fn()
    except TuneryError as exc:
        err.print(f"[red]error:[/red] {exc.message}", highlight=False, soft_wrap=True, markup=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    except typer.Exit:  # already reported (a bad setting)
        raise
    except Exception as exc:  # a bug or an environment problem: still one line, no traceback
        if os.environ.get("TUNERY_DEBUG"):
            raise
        err.print(
            f"[red]internal error:[/red] {type(exc).__name__}: {exc} (TUNERY_DEBUG=1 shows more)",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2) from None


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Default: TUNERY_HOST, else 127.0.0.1.")] = None,
    port: Annotated[int | None, typer.Option(help="Default: TUNERY_PORT, else 8000.")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes to start. Default: TUNERY_WORKERS, else 1.")
    ] = None,
    data_dir: DataDir = None,
    db_url: DbUrl = None,
) -> None:
    """Start the Gemini-compatible API server and its training workers."""
    from tunery.server import run_server

    settings = _settings(data_dir, db_url, host=host, port=port, workers=workers)
    _run(lambda: run_server(settings))


@app.command()
def worker(data_dir: DataDir = None, db_url: DbUrl = None) -> None:
    """Run one training worker against the database (start more for more parallel jobs)."""
    from tunery.worker import run_worker

    settings = _settings(data_dir, db_url)
    _run(lambda: run_worker(settings))


@app.command()
def tune(
    data: Annotated[Path, typer.Argument(help="JSONL, CSV or JSON file of text_input/output.")],
    base: Annotated[str, typer.Option("--base")] = "gemma-3-270m",
    name: Annotated[str, typer.Option("--name", help="Display name of the tuned model.")] = "",
    model_id: Annotated[str | None, typer.Option("--id", help="tunedModels/{id} to use.")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size")] = None,
    learning_rate: Annotated[float | None, typer.Option("--learning-rate")] = None,
    lr_multiplier: Annotated[float | None, typer.Option("--learning-rate-multiplier")] = None,
    description: Annotated[str, typer.Option()] = "",
    server: Server = None,
    api_key: ApiKey = None,
    data_dir: DataDir = None,
    db_url: DbUrl = None,
) -> None:
    """Tune BASE on DATA; shows a live progress bar, prints the tuned model's name."""
    from tunery.datasets import load_examples
    from tunery.service.tuning import CreateRequest

    def go() -> None:
        request = CreateRequest(
            base_model=base,
            examples=tuple(load_examples(data)),
            display_name=name,
            description=description,
            tuned_model_id=model_id,
            epoch_count=epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            learning_rate_multiplier=lr_multiplier,
        )
        if server:
            from tunery.cli_remote import tune_remote

            model = tune_remote(server, api_key, request, _progress)
        else:
            from tunery.cli_local import tune_local

            model = tune_local(_settings(data_dir, db_url), request, _progress)
        console.print(f"[green]tuned:[/green] {model}")

    _run(go)


@app.command()
def generate(
    model: Annotated[str, typer.Argument(help="tunedModels/ID, ID, or models/NAME.")],
    prompt: Annotated[str, typer.Argument()],
    stream: Annotated[bool, typer.Option("--stream")] = False,
    temperature: Annotated[float, typer.Option()] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k")] = 0,
    max_tokens: Annotated[int, typer.Option("--max-tokens")] = 256,
    stop: Annotated[list[str] | None, typer.Option("--stop")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    server: Server = None,
    api_key: ApiKey = None,
    data_dir: DataDir = None,
    db_url: DbUrl = None,
) -> None:
    """Generate text with a base or tuned model."""

    def go() -> None:
        params = GenerationParams(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_output_tokens=max_tokens,
            stop_sequences=tuple(stop or ()),
            seed=seed,
        )
        if server:
            from tunery.cli_remote import generate_remote

            pieces = generate_remote(server, api_key, model, prompt, params, stream)
        else:
            from tunery.cli_local import generate_local

            pieces = generate_local(_settings(data_dir, db_url), model, prompt, params, stream)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")

    _run(go)


@app.command()
def models(
    server: Server = None, api_key: ApiKey = None, data_dir: DataDir = None, db_url: DbUrl = None
) -> None:
    """List base models and tuned models."""

    def go() -> None:
        if server:
            from tunery.cli_remote import list_remote

            rows = list_remote(server, api_key)
        else:
            from tunery.cli_local import list_local

            rows = list_local(_settings(data_dir, db_url))
        _print_table(("name", "kind", "state", "base", "display name"), rows)

    _run(go)


@app.command()
def jobs(data_dir: DataDir = None, db_url: DbUrl = None) -> None:
    """List tuning jobs and their states."""

    def go() -> None:
        from tunery.cli_local import list_jobs

        _print_table(
            ("job", "tuned model", "state", "steps", "error"),
            list_jobs(_settings(data_dir, db_url)),
        )

    _run(go)


@app.command()
def register(
    name: Annotated[str, typer.Argument(help="Name to serve it under (models/NAME).")],
    path: Annotated[Path, typer.Argument(help="A Hugging Face model dir or a .gguf file.")],
    description: Annotated[str, typer.Option()] = "",
    data_dir: DataDir = None,
) -> None:
    """Register your own base model."""
    from tunery.engine.base_models import BaseModelRegistry

    settings = _settings(data_dir)
    info = _run(lambda: BaseModelRegistry(settings.models_dir).register(name, path, description))
    console.print(f"registered {info.resource_name}")


@keys_app.command("create")
def keys_create(data_dir: DataDir = None, db_url: DbUrl = None) -> None:
    """Create an API key; it is printed once and stored only as a hash."""
    from tunery.cli_local import create_key

    key = _run(lambda: create_key(_settings(data_dir, db_url)))
    console.print(key, highlight=False)


def _print_table(headers: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """A rich table on a terminal; tab-separated lines, never truncated, in a pipe."""
    if not console.is_terminal:
        for row in [headers, *rows]:
            sys.stdout.write("\t".join(row) + "\n")
        return
    table = Table(*headers)
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _progress(stream: Any) -> None:
    """Render an iterator of (completed_steps, total_steps, epoch, loss) as a live bar."""
    columns = (
        TextColumn("[bold]tuning"),
        BarColumn(),
        TextColumn("step {task.completed:.0f}/{task.fields[steps]}"),
        TextColumn("epoch {task.fields[epoch]}"),
        TextColumn("loss {task.fields[loss]}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err, transient=False) as progress:
        task = progress.add_task("tune", total=None, steps="?", epoch="-", loss="-")
        for done, total, epoch, loss in stream:
            progress.update(
                task,
                completed=done,
                total=total or None,
                steps=total or "?",
                epoch=epoch if epoch is not None else "-",
                loss=f"{loss:.4f}" if loss is not None else "-",
            )


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "transformers", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    app()


if __name__ == "__main__":
    main()
