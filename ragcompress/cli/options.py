"""What the commands share: the options several take, the answer options their flags make, and
the output helpers (one JSON object with ``--json``, progress bars only on a terminal)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import typer

from ragcompress.errors import RagCompressError, missing_store, need_matplotlib
from ragcompress.models import DTYPES

# the exit status of every command on a store another process holds locked (StoreBusyError): it is
# not damaged (verify's 1) nor unfinished (verify's 2), and retrying when the writer finishes does
BUSY = 3

# the names of ragcompress/presets.py (not imported here: --help stays fast; a test checks the list)
PRESET_HELP = (
    "measured settings: fast, small, smallest, faithful, distilled (README: Presets); explicit options override them"
)


def recompute_schedule(text: str | None) -> float | tuple[tuple[int, float], ...] | None:
    """``--recompute``: one fraction (``0.1``) or a schedule by passages retrieved (``3:0.05,5:0.1``:
    5 % up to 3 passages, 10 % from 5, linear between; ``RecomputeConfig.ratio_by_passages``).
    The values are checked where the config is made; this reads the notation."""
    if text is None:
        return None
    try:
        if ":" not in text:
            return float(text)
        points = []
        for point in text.split(","):
            passages, ratio = point.split(":")
            points.append((int(passages), float(ratio)))
        return tuple(points)
    except ValueError:
        raise RagCompressError(
            f"--recompute {text!r} is neither a fraction (0.1) nor a schedule of passages:fraction "
            "points (3:0.05,5:0.1)"
        ) from None


RECOMPUTE_OPTION = typer.Option(
    None,
    "--recompute",
    help="fraction of passage tokens recomputed at query time, in [0, 1], the same at every --top-k, or a "
    "schedule by passages retrieved: 3:0.05,5:0.1 (5 % up to 3, 10 % from 5, linear between); CacheBlend, "
    "docs/recompute.md; default: the preset's, 0 without one",
)


SELECTION_OPTION = typer.Option(
    None,
    "--selection",
    help="how recomputed tokens are chosen: deviation (CacheBlend), question (the question's attention at the "
    "check layer), mixed (both) or question-deep (its attention over every layer, no check pass)",
)


FALLBACK_OPTION = typer.Option(
    None,
    "--fallback-margin",
    min=0.0,
    max=0.999,
    help="answer by full prefill (the prefix, and an exact first passage, cached) a question whose first "
    "token from the caches leads the runner-up by less than this probability: the near ties a stale cache "
    "flips most (both timed; docs/recompute.md); default: the preset's, 0 (never) without one",
)


CALIBRATE_OPTION = typer.Option(
    True,
    "--calibrate/--no-calibrate",
    help="apply the attention temperature `ragcompress calibrate` recorded in the store (default); "
    "--no-calibrate answers at temperature 1, as an uncalibrated store does (the packed backends need it)",
)


# the names of runtime/options.py's BACKENDS (not imported here: --help stays fast; a test checks the list)
BACKEND_OPTION = typer.Option(
    None,
    "--backend",
    help="attention over the stored caches: auto (default: dense), dense, packed-torch or packed-triton "
    "(the fused kernel, CUDA; measured slower than dense on an H200: docs/kernels.md)",
)


def home_path(value: str) -> Path:
    """A file or folder option's value with a leading ``~`` (``~user``) expanded: a shell expands
    it only at the start of a word, so ``--store=~/s`` arrived as typed and ``index`` made a folder
    named ``~`` in the current one (``--model`` is expanded where it is resolved, models.py). An
    option typed ``str`` that may name a file (``--adaptor``, a folder or a packaged name) takes
    ``os.path.expanduser`` itself as its parser."""
    return Path(os.path.expanduser(value))


def path_option(default: Any, *names: str, **kwargs: Any) -> Any:
    """``typer.Option`` of a file or folder: a ``Path``, ``~`` expanded (:func:`home_path`)."""
    # the metavar typer shows for a Path (with a parser it would name the type: <Path>)
    return typer.Option(default, *names, parser=home_path, metavar="<path>", **kwargs)


def existing_store(path: Path) -> Path:
    """``--store`` of a command that reads one: a missing path fails here, before the command
    imports torch and the model libraries (seconds), with the same error the store raises."""
    if not path.exists():
        raise missing_store(path)
    return path


STORE_OPTION = path_option(
    ..., "--store", callback=existing_store, help="store directory (built by `ragcompress index`)"
)


def dtype_name(name: str | None) -> str | None:
    """``--dtype``, checked before the model libraries load (``ragcompress.models`` imports
    only the standard library at module level)."""
    if name is not None and name not in DTYPES:
        raise RagCompressError(f"--dtype {name!r} is not one of: {', '.join(DTYPES)}")
    return name


def writable_file(path: Path | None) -> Path | None:
    """An output file option (``--plot``), checked before the command measures anything: its
    folder is created, and a path that cannot be written, or whose extension matplotlib cannot
    write, fails now, not after minutes of work (``out.txt`` once ended a finished benchmark in a
    traceback); so does a missing matplotlib, whatever the extension."""
    if path is None:
        return None
    need_matplotlib("--plot draws", "bench", "; or leave out --plot")
    if path.suffix:
        from matplotlib.figure import Figure

        formats = Figure().canvas.get_supported_filetypes()
        if path.suffix[1:].lower() not in formats:
            raise RagCompressError(
                f"cannot write a plot as {path.name}: {path.suffix} is not an image format matplotlib writes "
                f"({', '.join(sorted(formats))}); use e.g. .png"
            )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RagCompressError(f"cannot write {path}: {exc.strerror or exc}; choose another path") from None
    if path.is_dir() or not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise RagCompressError(f"cannot write {path} (a folder, or not writable); choose another path")
    return path


DTYPE_OPTION = typer.Option(
    None,
    "--dtype",
    callback=dtype_name,
    help="the model weights' dtype: float32 (default), bfloat16 or float16 (half the memory); a "
    "store records the one it was indexed in, and answering uses it unless given",
)


DEVICE_OPTION = typer.Option(
    None,
    "--device",
    help="where the model runs: cpu (default) or cuda / cuda:N (a GPU torch sees)",
)


def options_from_flags(
    preset: str | None,
    max_new_tokens: int | None = None,
    recompute: float | tuple[tuple[int, float], ...] | None = None,
    selection: str | None = None,
    backend: str | None = None,
    fallback_margin: float | None = None,
    calibrate: bool = True,
) -> Any:
    """``AnswerOptions`` of ``--preset`` (defaults without one) with the options given explicitly
    (``--recompute`` replaces the preset's recompute fraction, one for every top-k or a schedule,
    ``--selection`` its ranking; ``--backend`` replaces its attention path, ``--fallback-margin``
    its fallback to full prefill; ``calibrate`` False, ``--no-calibrate``, answers without the
    store's calibrated temperature)."""
    from ragcompress.presets import answer_options

    try:
        return answer_options(preset).overridden(
            max_new_tokens=max_new_tokens,
            recompute=recompute,
            selection=selection,
            backend=backend,
            fallback_margin=fallback_margin,
            calibrate=None if calibrate else False,
        )
    except (ValueError, TypeError) as exc:
        raise RagCompressError(str(exc)) from None


def preset_matches_store(manifest: Any, preset: str | None) -> bool | None:
    """Whether the store of ``manifest`` was built with ``--preset``'s index settings (None: no
    preset given, or settings that cannot be read back). On ``ask``/``eval``/``bench``/``serve`` a
    preset sets only the answer options; a store built otherwise is read as it is, so a results
    file labelled with the preset would describe another store: a note on stderr says which
    settings differ, and ``--json`` records the verdict."""
    if preset is None:
        return None
    from ragcompress.indexing.config import config_from_manifest, differing_settings
    from ragcompress.indexing.indexer import as_indexed_for
    from ragcompress.presets import preset as named_preset

    try:
        stored = config_from_manifest(manifest)
    except RagCompressError:  # an adaptor that is not packaged: its settings cannot be compared
        return None
    wanted = as_indexed_for(named_preset(preset).index, manifest.model_ref, manifest.model_fingerprint)
    differ = differing_settings(stored, wanted)
    if differ:
        shown = ", ".join(f"{key} {ours!r} (preset: {theirs!r})" for key, (ours, theirs) in list(differ.items())[:4])
        typer.echo(
            f"note: the store was not built with --preset {preset} ({shown}); only the preset's answer options "
            f"apply (`ragcompress index --preset {preset}` builds such a store)",
            err=True,
        )
    return not differ


def quiet_libraries() -> None:
    """Keep library chatter off stdout/stderr so --json output stays one object."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def emit(data: dict[str, Any], as_json: bool, human: str) -> None:
    """A command's result: exactly one JSON object on stdout with ``--json``, else the text. A
    closed stdout (``>&-``, ``sys.stdout`` is None) gets nothing, as ``typer.echo`` does."""
    if as_json:
        if sys.stdout is not None:
            sys.stdout.write(json.dumps(data) + "\n")
    else:
        typer.echo(human)


def show_progress(as_json: bool) -> bool:
    """Progress bars only on a terminal, never beside ``--json``."""
    return not as_json and sys.stderr.isatty()
