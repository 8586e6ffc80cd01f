"""The ``embedpipe`` command: the composition root for serve and the operator tools."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from embedpipe.settings import Settings

app = typer.Typer(help="embedpipe: text embeddings as a service.", no_args_is_help=True)
cache_app = typer.Typer(help="Inspect or clear the cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
console = Console()


def _settings(**overrides: Any) -> Settings:
    given: dict[str, Any] = {key: value for key, value in overrides.items() if value is not None}
    return Settings(**given)


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address [env EMBEDPIPE_HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [env EMBEDPIPE_PORT].")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Worker processes [env EMBEDPIPE_WORKERS].")
    ] = None,
) -> None:
    """Start the HTTP API (embedded default: no configuration needed)."""
    import uvicorn

    # Never reach the Hugging Face hub from a server.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = _settings(host=host, port=port, workers=workers)
    _configure_logging(settings.log_level)
    if settings.workers > 1:
        # Each worker process builds its own app from the environment.
        os.environ["EMBEDPIPE_HOST"] = settings.host
        os.environ["EMBEDPIPE_PORT"] = str(settings.port)
        uvicorn.run(
            "embedpipe.api.app:create_app_from_env",
            factory=True,
            host=settings.host,
            port=settings.port,
            workers=settings.workers,
            log_level=settings.log_level,
        )
        return
    from embedpipe.api.app import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
    )


@app.command()
def models() -> None:
    """List the models this configuration serves (loads them, offline)."""
    from embedpipe.embedders import load_embedder, parse_model_specs

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = _settings()
    table = Table("name", "aliases", "backend", "dims", "window", "sha256", "source")
    for spec in parse_model_specs(settings.model, settings.extra_models):
        info = load_embedder(spec).info
        table.add_row(
            info.name,
            ", ".join(spec.aliases),
            info.backend,
            str(info.dimensions),
            str(info.max_tokens),
            (info.weights_sha256 or "")[:12],
            info.source,
        )
    console.print(table)


@cache_app.command("stats")
def cache_stats() -> None:
    """Entries and hit counters of the cache this configuration uses."""
    from embedpipe.cache import open_cache

    async def run() -> None:
        cache = await open_cache(_settings())
        try:
            table = Table("tier", "entries", "bytes", "healthy")
            for tier in await cache.stats():
                table.add_row(tier.name, str(tier.entries), str(tier.bytes), str(tier.healthy))
            console.print(table)
        finally:
            await cache.close()

    asyncio.run(run())


@cache_app.command("clear")
def cache_clear(
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove every cached vector under this configuration's namespace."""
    from embedpipe.cache import open_cache

    if not yes:
        typer.confirm("Remove all cached vectors?", abort=True)

    async def run() -> None:
        cache = await open_cache(_settings())
        try:
            await cache.clear()
        finally:
            await cache.close()

    asyncio.run(run())
    console.print("cache cleared")


def main() -> None:
    app()
