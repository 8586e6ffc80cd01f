"""The ``embedpipe`` command: the composition root for serve and the operator tools."""

from __future__ import annotations

import asyncio
import logging.config
import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.table import Table

from embedpipe.datasets.options import RequestOptions
from embedpipe.embedders.prompts import InputType
from embedpipe.embedders.tokens import LongText
from embedpipe.logs import LogFormat, logging_config
from embedpipe.settings import Settings

# embedpipe.quantization.EmbeddingType, spelled here: importing it would load numpy before a
# usage error could be reported.
OutputType = Literal["float32", "float16", "int8", "uint8", "binary", "ubinary"]

app = typer.Typer(help="embedpipe: text embeddings as a service.", no_args_is_help=True)
cache_app = typer.Typer(help="Inspect or clear the cache.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")
keys_app = typer.Typer(help="Make and hash API keys for the keys file.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
console = Console()


def _settings(**overrides: Any) -> Settings:
    given: dict[str, Any] = {key: value for key, value in overrides.items() if value is not None}
    return Settings(**given)


def _configure_logging(level: str, fmt: LogFormat) -> dict[str, Any]:
    config = logging_config(level, fmt)
    logging.config.dictConfig(config)
    return config


def _prepare_metrics_dir(workers: int) -> Path | None:
    """Several workers write their metrics to files that /metrics merges (prometheus_client's
    multiprocess mode): the operator's PROMETHEUS_MULTIPROC_DIR, else a private temporary
    folder, returned to be removed at exit. Emptied first: an earlier run's samples would
    otherwise add to this one's. Must run before anything imports prometheus_client."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if workers <= 1 and not given:
        return None
    path = Path(given) if given else Path(tempfile.mkdtemp(prefix="embedpipe-metrics-"))
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    return None if given else path


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

    from embedpipe.api.connections import server_options

    # Never reach the Hugging Face hub from a server.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = _settings(host=host, port=port, workers=workers)
    # JSON lines in every worker; the access log line is ours (embedpipe.access), not uvicorn's.
    log_config = _configure_logging(settings.log_level, settings.log_format)
    private_metrics_dir = _prepare_metrics_dir(settings.workers)
    try:
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
                log_config=log_config,
                access_log=False,
                timeout_graceful_shutdown=settings.drain_timeout_seconds,
                **server_options(settings),
            )
            return
        from embedpipe.api.app import create_app

        uvicorn.run(
            create_app(settings),
            host=settings.host,
            port=settings.port,
            log_level=settings.log_level,
            log_config=log_config,
            access_log=False,
            timeout_graceful_shutdown=settings.drain_timeout_seconds,
            **server_options(settings),
        )
    finally:
        if private_metrics_dir is not None:
            shutil.rmtree(private_metrics_dir, ignore_errors=True)


@app.command()
def models() -> None:
    """List the models this configuration serves (loads them, offline; with the onnx
    backend, makes the exports that are missing and their models' int8 ranges beside them:
    run it ahead of time, e.g. in an image build)."""
    from embedpipe.embedders import load_embedder, parse_model_specs
    from embedpipe.embedders.registry import onnx_export_root
    from embedpipe.errors import EmbedpipeError
    from embedpipe.quantization.calibration import RECORDS_DIR, make_ahead

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = _settings()
    table = Table("name", "aliases", "backend", "dims", "window", "sha256", "source")
    for spec in parse_model_specs(settings.model, settings.extra_models, settings.backend):
        if spec.backend == "openai":
            from embedpipe.upstream import describe_upstream

            info = describe_upstream(spec, settings).info  # no call; dims 0 = not known yet
        else:
            try:
                embedder = load_embedder(spec, settings)
                info = embedder.info
                if spec.backend == "onnx" and info.task == "embed":
                    make_ahead(embedder, onnx_export_root(settings) / RECORDS_DIR)
            except EmbedpipeError as exc:
                Console(stderr=True).print(f"[red]error:[/red] {exc.message}", highlight=False)
                raise typer.Exit(1) from None
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


@app.command()
def rerank(
    query: Annotated[str, typer.Argument(help="The query the documents are ranked for.")],
    documents_path: Annotated[
        Path,
        typer.Argument(
            metavar="FILE",
            exists=True,
            dir_okay=False,
            readable=True,
            help="A text file, one document a line (blank lines skipped).",
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option(help="A served model. Default: the first cross-encoder, else the model."),
    ] = None,
    top_n: Annotated[int | None, typer.Option(help="Show the best N only.")] = None,
) -> None:
    """Rank FILE's lines by relevance to QUERY, in process (loads the configured models)."""
    from embedpipe.errors import EmbedpipeError
    from embedpipe.operations.rerank import prepare, rank
    from embedpipe.runtime import Runtime

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    lines = documents_path.read_text(encoding="utf-8").splitlines()
    documents = [line for line in lines if line.strip()]

    async def run() -> None:
        settings = _settings()
        runtime = await Runtime.open(settings)
        try:
            prepared = prepare(
                runtime.service,
                settings.limits,
                model=model or runtime.default_reranker,
                route="/v1/rerank",
                query=query,
                documents=documents,
                top_n=top_n,
            )
            result = await runtime.service.embed(prepared.model, prepared.inputs)
            ranked = rank(runtime.service, prepared, result, raw=False)
        finally:
            await runtime.close()
        table = Table("rank", "doc", "score", "document", title=f"{ranked.model}: {query}")
        for place, (index, score) in enumerate(zip(ranked.order, ranked.scores, strict=True)):
            table.add_row(str(place + 1), str(index + 1), f"{score:.4f}", documents[index])
        console.print(table)

    try:
        asyncio.run(run())
    except EmbedpipeError as error:
        Console(stderr=True).print(f"[red]error:[/red] {error.message}")
        raise typer.Exit(2) from None


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


@app.command()
def worker(
    loglevel: Annotated[str, typer.Option(help="Celery's log level.")] = "info",
    hostname: Annotated[
        str | None, typer.Option(help="Worker name (default: embedpipe@<host>.<pid>).")
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            help="Serve Prometheus /metrics on this port (default: "
            "EMBEDPIPE_JOBS__WORKER_METRICS_PORT; 0 = off)."
        ),
    ] = None,
) -> None:
    """Run batch-job chunks from the broker: Redis (EMBEDPIPE_REDIS_URL or _BROKER_URL) or
    RabbitMQ (EMBEDPIPE_BROKER_URL=amqp://..., job state in EMBEDPIPE_REDIS_URL).

    One process per machine is right on CPU: the model already uses every core. Scale out
    with more machines (or processes pinned to cores); each loads the model once.
    """
    from embedpipe.batches.worker import run_worker

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = _settings()
    if not settings.redis_url:
        # Job state lives in Redis whichever the broker; without it the API runs jobs itself.
        console.print("[red]embedpipe worker needs EMBEDPIPE_REDIS_URL (and optionally a broker)")
        raise typer.Exit(2)
    port = settings.jobs.worker_metrics_port if metrics_port is None else metrics_port
    if port:
        from embedpipe import metrics

        metrics.serve_exposition(settings.host, port)
        console.print(f"metrics on http://{settings.host}:{port}/metrics")
    run_worker(settings, loglevel=loglevel, hostname=hostname)


@app.command()
def embed(
    input_path: Annotated[
        Path,
        typer.Argument(
            metavar="INPUT",
            exists=True,
            dir_okay=False,
            readable=True,
            help="A .jsonl/.ndjson, .csv, .parquet or .txt file (one text a line); .gz allowed.",
        ),
    ],
    output: Annotated[
        Path | None,
        typer.Option(
            "--output", "-o", dir_okay=False, help="Default: INPUT's name + .embeddings.parquet."
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="A served model name or a sentence-transformers directory."),
    ] = None,
    text_field: Annotated[str, typer.Option(help="The field or column holding the text.")] = (
        "text"
    ),
    id_field: Annotated[
        str | None,
        typer.Option(help="The field or column of the ids. Default: the 0-based row number."),
    ] = None,
    output_format: Annotated[
        Literal["parquet", "npy", "jsonl"] | None,
        typer.Option("--format", help="Default: from the output's extension."),
    ] = None,
    chunk_size: Annotated[
        int, typer.Option(min=1, max=65536, help="Rows per committed chunk.")
    ] = 256,
    on_error: Annotated[
        Literal["fail", "skip"],
        typer.Option(help="A row with no usable text or id: fail (with its row number) or skip."),
    ] = "fail",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    server: Annotated[
        str | None,
        typer.Option(
            help="Submit to a running embedpipe at this URL instead (the Batch API), follow "
            "its progress and download the result."
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="EMBEDPIPE_CLIENT_API_KEY", help="--server's API key (when it needs one)."
        ),
    ] = None,
    batch_rows: Annotated[
        int,
        typer.Option(min=1, help="--server: rows per submitted batch (the server's limit)."),
    ] = 50_000,
    input_type: Annotated[
        InputType | None,
        typer.Option(
            help="What the texts are (query, document, ...): the model's prompt for them, as "
            "/v1/embeddings' input_type."
        ),
    ] = None,
    long_text: Annotated[
        LongText,
        typer.Option(help="A text past the model's window: cut (truncate) or its windows' mean."),
    ] = "truncate",
    embedding_type: Annotated[
        OutputType,
        typer.Option(
            help="The vectors' type, stored natively (binary/ubinary: packed sign bits, "
            "dims / 8 bytes)."
        ),
    ] = "float32",
) -> None:
    """Embed a dataset file in this process, through the same cache and batcher as the server,
    or with --server as batch jobs on a running service.

    Resumable: after an interruption, run the same command again to continue.
    """
    from embedpipe.datasets.formats import input_kind
    from embedpipe.datasets.formats import output_format as format_of
    from embedpipe.datasets.local import default_output, embed_file, settings_for_embed
    from embedpipe.errors import EmbedpipeError

    err = Console(stderr=True)
    request = RequestOptions(input_type=input_type, long_text=long_text)
    if server is not None:
        _embed_on_server(
            err,
            server,
            api_key,
            input_path=input_path,
            output=output or default_output(input_path),
            output_format=output_format,
            model=model,
            text_field=text_field,
            id_field=id_field,
            on_error=on_error,
            batch_rows=batch_rows,
            quiet=quiet,
            request=request,
            embedding_type=embedding_type,
        )
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # ours is the only bar
    settings = _settings()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    target = output or default_output(input_path)
    try:
        input_kind(input_path)
        fmt = format_of(target, output_format)
        report = asyncio.run(
            embed_file(
                settings_for_embed(settings, model),
                input_path=input_path,
                output=target,
                fmt=fmt,
                text_field=text_field,
                id_field=id_field,
                chunk_size=chunk_size,
                on_error=on_error,
                console=err,
                quiet=quiet,
                request=request,
                embedding_type=embedding_type,
            )
        )
    except EmbedpipeError as exc:
        err.print(f"[red]error:[/red] {exc.message}", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("interrupted: finished chunks are kept; run the same command to resume")
        raise typer.Exit(130) from None
    err.print(report.summary(), highlight=False, soft_wrap=True)


def _embed_on_server(
    err: Console,
    server: str,
    api_key: str | None,
    *,
    input_path: Path,
    output: Path,
    output_format: str | None,
    model: str | None,
    text_field: str,
    id_field: str | None,
    on_error: str,
    batch_rows: int,
    quiet: bool,
    request: RequestOptions,
    embedding_type: OutputType,
) -> None:
    from openai import APIError, APIStatusError, OpenAI, OpenAIError

    from embedpipe.datasets.formats import output_format as format_of
    from embedpipe.datasets.progress import RichProgress
    from embedpipe.datasets.remote import RemoteJob, run_remote_job
    from embedpipe.errors import EmbedpipeError

    client = OpenAI(base_url=server.rstrip("/") + "/v1", api_key=api_key or "unused", max_retries=3)
    try:
        job = RemoteJob(
            server=server,
            input=input_path,
            output=output,
            format=format_of(output, output_format),
            model=model,
            text_field=text_field,
            id_field=id_field,
            on_error=on_error,
            batch_rows=batch_rows,
            request=request,
            embedding_type=embedding_type,
        )

        def notice(message: str) -> None:
            err.print(f"[yellow]{message}", highlight=False)

        if quiet:
            report = run_remote_job(client, job, notice=notice)
        else:
            bar = RichProgress(err, f"embedding {input_path.name} on {server}", cache_hits=False)
            with bar:
                report = run_remote_job(client, job, on_progress=bar.update, notice=notice)
    except EmbedpipeError as exc:
        err.print(f"[red]error:[/red] {exc.message}", highlight=False)
        raise typer.Exit(1) from None
    except APIStatusError as exc:
        err.print(f"[red]the server answered {exc.status_code}:[/red] {exc.message}")
        raise typer.Exit(1) from None
    except (APIError, OpenAIError) as exc:
        err.print(f"[red]cannot reach {server}:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print(
            "interrupted: the batches keep running on the server; run the same command "
            "to pick them up and download the result"
        )
        raise typer.Exit(130) from None
    finally:
        client.close()
    err.print(report.summary(), highlight=False, soft_wrap=True)


@keys_app.command("hash")
def keys_hash(
    key: Annotated[
        str | None,
        typer.Argument(help="The key; read from stdin when omitted (keeps it out of history)."),
    ] = None,
) -> None:
    """Print a key's digest: the ``hash`` of its entry in the keys file."""
    import sys

    from embedpipe.auth import hash_key

    if key is None:
        if sys.stdin.isatty():
            key = typer.prompt("API key", hide_input=True)
        else:
            key = sys.stdin.readline()
    key = key.strip()
    if not key:
        raise typer.BadParameter("the key is empty")
    typer.echo(hash_key(key))


@keys_app.command("generate")
def keys_generate(
    name: Annotated[str, typer.Option(help="The key's name: its identity in limits and logs.")],
    rpm: Annotated[int | None, typer.Option(help="Its own requests per minute (0: none).")] = None,
    tpm: Annotated[int | None, typer.Option(help="Its own tokens per minute (0: none).")] = None,
) -> None:
    """Make a random key. The key goes to stderr (give it to the client, it is stored nowhere);
    its keys-file entry to stdout: ``embedpipe keys generate --name team >> keys.toml``."""
    import sys

    from embedpipe.auth import NAME_RULE, generate_key, hash_key, valid_name

    if not valid_name(name):
        raise typer.BadParameter(f"a key name is {NAME_RULE}", param_hint="--name")
    for given in (rpm, tpm):
        if given is not None and given < 0:
            raise typer.BadParameter("limits are whole numbers, 0 or more (0 = unlimited)")
    key = generate_key()
    print(f"API key for {name!r} (shown once): {key}", file=sys.stderr)
    entry = f'[[keys]]\nname = "{name}"\nhash = "{hash_key(key)}"\n'
    entry += "".join(f"{k} = {v}\n" for k, v in (("rpm", rpm), ("tpm", tpm)) if v is not None)
    typer.echo(entry)


@keys_app.command("list")
def keys_list() -> None:
    """The keys this configuration accepts (names and limits; never the keys)."""
    from embedpipe.auth import KeysFileError, KeyStore

    settings = _settings()
    try:
        store = KeyStore.load(settings.api_keys, settings.api_keys_file)
    except KeysFileError as exc:
        raise typer.BadParameter(str(exc)) from None
    table = Table("name", "requests/min", "tokens/min")

    def shown(own: int | None, default: int) -> str:
        value = default if own is None else own
        return (str(value) if value else "unlimited") + (" (default)" if own is None else "")

    for key in store:
        table.add_row(
            key.name,
            shown(key.rpm, settings.rate_limit_rpm),
            shown(key.tpm, settings.rate_limit_tpm),
        )
    console.print(table if store.enabled else "no API keys: authentication is off")


def main() -> None:
    app()
