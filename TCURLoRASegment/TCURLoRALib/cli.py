"""The command-line interface: ``python -m TCURLoRALib {segment,train,pretrain,evaluate,adapters,info}``.

Exit codes: 0 success, 2 bad input (a file, an argument or a card that cannot be used), 3 internal error,
130 cancelled (SIGINT, SIGTERM or the file named by ``$TCURLORA_CANCEL_FILE``). With ``--progress json`` every event, the final error included, is one JSON object
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
from .outputs import OutputFiles
from .progress import Cancelled, JsonLinesProgress, Progress, TerminalProgress, cancellable, silent
from .store import adapter_store, resolve_adapter, resolve_base

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


def run_command(handler: Handler, args: argparse.Namespace, progress: Progress) -> Any:
    """Runs a command's handler; a :class:`Cancelled` that a library wrapped in an error of its own (MONAI's
    transforms re-raise whatever they meet as RuntimeError) comes out as :class:`Cancelled` again."""
    try:
        return handler(args, progress)
    except Exception as error:
        cause: BaseException | None = error
        while cause is not None and not isinstance(cause, Cancelled):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise Cancelled(str(cause)) from None


def _make_progress(mode: str) -> Progress:
    if mode == "json":
        return JsonLinesProgress(sys.stdout)
    if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
        return TerminalProgress(sys.stderr)
    return silent


# ---------------------------------------------------------------------------------------------------- commands


def _segment(args: argparse.Namespace, progress: Progress) -> None:
    from .segment import segment

    result = segment(
        args.image, resolve_base(args.base), args.output, adapter_path=resolve_adapter(args.adapter),
        seg_nrrd_path=args.seg_nrrd, probabilities_path=args.probabilities, overlap=args.overlap,
        sw_batch_size=args.sw_batch_size, device=args.device, overwrite=args.overwrite, progress=progress,
    )
    if args.progress != "json":
        for name, millilitres in result.volumes_ml.items():
            print(f"{name}: {millilitres:.2f} mL")


def _demo(args: argparse.Namespace, progress: Progress) -> None:
    from .demo import format_report, run_demo
    from .paths import SAMPLE_IMAGE, SAMPLE_REFERENCE, shipped_samples_dir

    samples = shipped_samples_dir()
    image = Path(args.image) if args.image else samples / SAMPLE_IMAGE
    reference = args.reference or (None if args.image else samples / SAMPLE_REFERENCE)
    shipped = [entry for entry in adapter_store().list() if entry.source == "shipped"]
    runs = run_demo(resolve_base(args.base), shipped, image, args.output, reference_path=reference,
                    device=args.device, overwrite=args.overwrite, progress=progress)
    if args.progress != "json":
        print(format_report(runs))
        print(f"outputs in {Path(args.output).resolve()}")


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


def _json_argument(text: str | None, what: str) -> Any:
    """A JSON value given inline or as the path of a JSON file."""
    if text is None:
        return None
    path = Path(text)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"{what} file {text!r} does not exist")
        text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} is neither a JSON file nor valid JSON: {error}") from error


def _cases(args: argparse.Namespace) -> Any:
    if args.cases and args.case:
        raise ValueError("give cases either with --cases (folder or JSON) or with --case IMAGE LABEL, not both")
    if args.case:
        return [tuple(pair) for pair in args.case]
    if args.cases:
        return args.cases
    raise ValueError("no training cases: give --cases FOLDER_OR_JSON or --case IMAGE LABEL")


def _adapter_output(args: argparse.Namespace) -> tuple[Path, str]:
    if args.out:
        out = Path(args.out)
        return out, args.name or out.name.removesuffix(".safetensors")
    if not args.name:
        raise ValueError("give the new adapter a --name (it is saved in your adapter folder) or an --out file")
    return adapter_store().path_for_new(args.name, overwrite=args.overwrite), args.name


def _given(**options: Any) -> dict[str, Any]:
    """The options the user gave: the others keep the engine's own defaults (one place for each default)."""
    return {key: value for key, value in options.items() if value is not None}


def _training_options(args: argparse.Namespace) -> dict[str, Any]:
    return _given(
        label_map=_json_argument(args.label_map, "--label-map"), unmapped=args.unmapped, steps=args.steps,
        lr=args.lr, batch_size=args.batch_size, seed=args.seed, device=args.device, validation=args.validation,
        validate_every=args.validate_every, threads=args.threads,
    )


def _train(args: argparse.Namespace, progress: Progress) -> None:
    from .train import train_adapter

    out, name = _adapter_output(args)
    labels = _json_argument(args.labels, "--labels")
    card = train_adapter(
        resolve_base(args.base), _cases(args), labels, out, name=name, overwrite=args.overwrite, progress=progress,
        **_given(rank=args.rank, init=args.init, groups=args.groups, lr_u=args.lr_u,
                 parent_adapter=resolve_adapter(args.parent)),
        **_training_options(args),
    )
    if args.progress != "json":
        print(f"adapter {card.name!r} written to {out}")
        print(json.dumps(card.metrics, indent=2))


def _pretrain(args: argparse.Namespace, progress: Progress) -> None:
    from .train import pretrain

    card_fields = _json_argument(args.card, "--card")
    card = pretrain(_cases(args), card_fields, args.output, overwrite=args.overwrite, progress=progress,
                    **_training_options(args))
    if args.progress != "json":
        print(f"base model {card.name!r} written to {args.output}")


def _evaluate(args: argparse.Namespace, progress: Progress) -> None:
    from . import metrics

    if len(args.predictions) != len(args.references):
        raise ValueError(f"{len(args.predictions)} predictions but {len(args.references)} references: give one "
                         "reference per prediction, in the same order")
    outputs = OutputFiles(overwrite=args.overwrite, inputs=[*args.predictions, *args.references])
    reports = {}
    if args.json:
        reports[outputs.add(args.json, "metrics JSON")] = metrics.write_json
    if args.csv:
        reports[outputs.add(args.csv, "metrics CSV")] = metrics.write_csv
    cases = metrics.evaluate(args.predictions, args.references, progress=progress)
    outputs.publish({path: lambda temporary, write=write: write(temporary, cases) for path, write in reports.items()})
    if args.progress != "json":
        print(metrics.format_table(cases))


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", help="a folder of cases or a JSON case list (see TCURLoRALib/cases.py)")
    parser.add_argument("--case", nargs=2, action="append", metavar=("IMAGE", "LABEL"),
                        help="one training case; repeat for more")
    parser.add_argument("--label-map", help="JSON (inline or file): case structure (value or segment name) -> label")
    parser.add_argument("--unmapped", choices=("error", "background", "ignore"), default="error",
                        help="what to do with structures the mapping misses (default: error)")
    parser.add_argument("--steps", type=int, help="optimiser steps")
    parser.add_argument("--lr", type=float, help="learning rate")
    parser.add_argument("--batch-size", type=int, help="crops per step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--validation",
                        help="'auto' (held-out cases, see TCURLoRALib/train.py; train's default), 'none', or a "
                             "folder/JSON of cases")
    parser.add_argument("--validate-every", type=int, help="steps between validations")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")


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
    seg.add_argument("--overwrite", action="store_true", help="replace output files that exist")
    seg.set_defaults(handler=_segment)

    train = commands.add_parser("train", parents=[common], help="train a tCURLoRA adapter on a few cases")
    train.add_argument("--name", help="adapter name; saved in your adapter folder ($TCURLORA_HOME)")
    train.add_argument("--out", help="write the adapter to this file instead")
    train.add_argument("--overwrite", action="store_true",
                       help="replace a user adapter of the same name, or the --out file")
    train.add_argument("--base", help="base model file (default: the shipped base)")
    train.add_argument("--labels", help="the adapter's labels, JSON list of {value, name, color} (inline or file); "
                                        "default: the parent adapter's, else the base's")
    train.add_argument("--parent", help="continue from this adapter (file or name)")
    # Defaults written out, so that --help needs no torch import; a test checks them against train's.
    train.add_argument("--rank", type=int, help="tensor CUR rank r (default 16)")
    train.add_argument("--init", choices=("pinv", "zero"), help="U initialisation (default zero)")
    train.add_argument("--groups", nargs="+", choices=("attention", "mlp_up", "mlp_down"),
                       help="weight groups to adapt (default: all)")
    train.add_argument("--lr-u", type=float, help="learning rate of U")
    _add_training_arguments(train)
    train.set_defaults(handler=_train)

    pretrain = commands.add_parser("pretrain", parents=[common], help="train a whole UNETR into a base-model file")
    pretrain.add_argument("--card", required=True, help="model card fields without fingerprint (JSON inline or file)")
    pretrain.add_argument("-o", "--output", required=True, help="base-model file to write")
    pretrain.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    _add_training_arguments(pretrain)
    pretrain.set_defaults(handler=_pretrain)

    evaluate = commands.add_parser("evaluate", parents=[common], help="Dice and HD95 per label against references")
    evaluate.add_argument("--predictions", nargs="+", required=True, help="predicted label maps")
    evaluate.add_argument("--references", nargs="+", required=True, help="reference label maps, same order")
    evaluate.add_argument("--json", help="also write the metrics as JSON")
    evaluate.add_argument("--csv", help="also write the metrics as CSV")
    evaluate.add_argument("--overwrite", action="store_true", help="replace the --json/--csv files if they exist")
    evaluate.set_defaults(handler=_evaluate)

    demo = commands.add_parser("demo", parents=[common],
                               help="segment the shipped sample with the base and each shipped adapter")
    demo.add_argument("-o", "--output", default="tcurlora-demo", help="output folder (default ./tcurlora-demo)")
    demo.add_argument("--image", help="another volume instead of the shipped sample")
    demo.add_argument("--reference", help="reference label map for Dice (the sample's ships with it)")
    demo.add_argument("--base", help="base model file (default: the shipped base)")
    demo.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    demo.add_argument("--overwrite", action="store_true", help="replace the files of an earlier demo in the folder")
    demo.set_defaults(handler=_demo)

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
    # A cancel file (the Slicer panels' way to stop a job on Windows) is checked at every progress event.
    progress = cancellable(_make_progress(getattr(args, "progress", "none")))
    install_cancel_handlers()
    try:
        run_command(args.handler, args, progress)
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
