"""The command-line interface: ``python -m TCURLoRALib {segment,train,pretrain,evaluate,adapters,info}``.

Exit codes: 0 success, 2 bad input (a file, an argument or a card that cannot be used), 3 internal error,
130 cancelled (SIGINT or SIGTERM). With ``--progress json`` every event, the final error included, is one JSON object
a line on standard output (see :mod:`TCURLoRALib.progress`); human-readable messages go to standard error.
"""
from __future__ import annotations

import argparse
import json
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__
from .progress import Cancelled, JsonLinesProgress, Progress, TerminalProgress, silent

__all__ = ["EXIT_BAD_INPUT", "EXIT_CANCELLED", "EXIT_INTERNAL", "EXIT_OK", "build_parser", "main"]

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_CANCELLED = 130

Handler = Callable[[argparse.Namespace, Progress], Any]


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    # ValueError covers CardError, TCURLoRAFileError and the volume checks; argparse's own errors exit with 2 too.
    return (ValueError, FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError)


def _raise_cancelled(signum: int, _frame: Any) -> None:
    raise Cancelled(f"cancelled by {signal.Signals(signum).name}")


def install_cancel_handlers() -> None:
    """Turn SIGINT and SIGTERM into :class:`Cancelled`, so that jobs unwind and atomic writes clean up."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _raise_cancelled)


def _make_progress(mode: str) -> Progress:
    if mode == "json":
        return JsonLinesProgress(sys.stdout)
    if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
        return TerminalProgress(sys.stderr)
    return silent


# ---------------------------------------------------------------------------------------------------- resolving


def resolve_base(argument: str | None) -> Path:
    """``--base``: a file, or else the one shipped base model."""
    from . import files
    from .paths import shipped_models_dir

    if argument:
        path = Path(argument)
        if not path.is_file():
            raise FileNotFoundError(f"base model {argument!r} does not exist")
        return path
    folder = shipped_models_dir()
    bases = []
    for candidate in sorted(folder.glob("*.safetensors")):
        try:
            if files.read_info(candidate)[0] == "base":
                bases.append(candidate)
        except files.TCURLoRAFileError:
            continue
    if len(bases) != 1:
        found = "none" if not bases else ", ".join(p.name for p in bases)
        raise ValueError(f"give --base: {len(bases)} shipped base models in {str(folder)!r} ({found})")
    return bases[0]


def adapter_store():
    from .paths import shipped_models_dir
    from .store import AdapterStore

    return AdapterStore(shipped_models_dir())


def resolve_adapter(argument: str | None) -> Path | None:
    """``--adapter``: an adapter file, or the name of one in the store; ``None`` or ``"none"`` for the base alone."""
    if argument is None or argument.lower() == "none":
        return None
    path = Path(argument)
    if path.suffix == ".safetensors" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"adapter file {argument!r} does not exist")
        return path
    return adapter_store().find(argument).path


# ---------------------------------------------------------------------------------------------------- commands


def _segment(args: argparse.Namespace, progress: Progress) -> None:
    from .segment import segment

    result = segment(
        args.image, resolve_base(args.base), args.output, adapter_path=resolve_adapter(args.adapter),
        seg_nrrd_path=args.seg_nrrd, probabilities_path=args.probabilities, overlap=args.overlap,
        sw_batch_size=args.sw_batch_size, device=args.device, progress=progress,
    )
    if args.progress != "json":
        for name, millilitres in result.volumes_ml.items():
            print(f"{name}: {millilitres:.2f} mL")


def _info(args: argparse.Namespace, progress: Progress) -> None:
    from . import files

    kind, card = files.read_info(args.path)
    print(json.dumps({"kind": kind, "card": card}, indent=2))


def _adapters(args: argparse.Namespace, progress: Progress) -> None:
    store = adapter_store()
    if args.action == "list":
        entries = store.list()
        if args.json:
            print(json.dumps([{"name": e.name, "path": str(e.path), "source": e.source, "read_only": e.read_only,
                               "card": e.card.to_json()} for e in entries], indent=2))
        else:
            for entry in entries:
                labels = ", ".join(label.name for label in entry.card.labels[1:])
                print(f"{entry.name}\t{entry.source}\trank {entry.card.rank}\tbase {entry.card.base_name}\t{labels}")
        for problem in store.problems:
            print(f"skipped {problem.path}: {problem.message}", file=sys.stderr)
    elif args.action == "delete":
        store.delete(args.name)
    elif args.action == "rename":
        store.rename(args.name, args.new_name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m TCURLoRALib",
        description="TCURLoRA: segment volumes with a frozen UNETR and tCURLoRA adapters, and train adapters.",
    )
    parser.add_argument("--version", action="version", version=f"TCURLoRA {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--progress", choices=("auto", "json", "bar", "none"), default="auto",
                        help="progress on stdout as JSON lines (for Slicer), a bar on a terminal, or none")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    seg = commands.add_parser("segment", parents=[common], help="segment a volume with the base and an adapter")
    seg.add_argument("image", help="input volume (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd)")
    seg.add_argument("-o", "--output", required=True, help="label map to write (.nii.gz, .nii, .nrrd)")
    seg.add_argument("--base", help="base model file (default: the shipped base)")
    seg.add_argument("--adapter", help="adapter file or name in the store; 'none' for the base alone")
    seg.add_argument("--seg-nrrd", help="also write a Slicer segmentation (.seg.nrrd) with names and colours")
    seg.add_argument("--probabilities", help="also write the softmax probabilities")
    seg.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap in [0, 1) (default 0.25)")
    seg.add_argument("--sw-batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    seg.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    seg.set_defaults(handler=_segment)

    info = commands.add_parser("info", parents=[common], help="print the card of a base model or adapter file")
    info.add_argument("path")
    info.set_defaults(handler=_info)

    adapters = commands.add_parser("adapters", parents=[common], help="list, delete or rename stored adapters")
    actions = adapters.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="shipped and user adapters")
    listing.add_argument("--json", action="store_true")
    delete = actions.add_parser("delete", help="delete a user adapter")
    delete.add_argument("name")
    rename = actions.add_parser("rename", help="rename a user adapter")
    rename.add_argument("name")
    rename.add_argument("new_name")
    adapters.set_defaults(handler=_adapters)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = _make_progress(getattr(args, "progress", "none"))
    install_cancel_handlers()
    try:
        args.handler(args, progress)
        return EXIT_OK
    except Cancelled as error:
        progress("error", kind="cancelled", message=str(error))
        print(f"cancelled: {error}", file=sys.stderr)
        return EXIT_CANCELLED
    except _bad_input_errors() as error:
        progress("error", kind="bad_input", message=str(error))
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as error:  # the last line of defence: report, with the traceback, and exit distinctly
        progress("error", kind="internal", message=f"{type(error).__name__}: {error}")
        traceback.print_exc(file=sys.stderr)
        return EXIT_INTERNAL
