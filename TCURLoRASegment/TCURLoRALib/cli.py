"""The command-line interface: ``python -m TCURLoRALib {segment,train,pretrain,evaluate,demo,adapters,info}``.

Exit codes: 0 success, 2 bad input (a file, an argument or a card that cannot be used, or a learning rate that made
training diverge), 3 internal error, 130 cancelled (SIGINT, SIGTERM or the file named by ``$TCURLORA_CANCEL_FILE``).
With ``--progress json`` every event, the final error included, is one JSON object a line on standard output (see
:mod:`TCURLoRALib.progress`); messages for people go to standard error: a bar on a terminal, plain lines in a log.
Options may follow the command and its action (``adapters list --progress none``). The training options, their help
and their printed defaults come from :class:`~TCURLoRALib.settings.TrainSettings`.

Under torchrun (``torchrun --nproc_per_node N -m TCURLoRALib train|pretrain ...``, :mod:`TCURLoRALib.distributed`)
the processes share the training; the first (rank 0) alone reports progress and writes, and every process prints its
own errors, marked ``[rank R]``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import TCURLoRALib as engine

from . import ADAPTER_ONLY, POSTPROCESS_CHOICES, TrainSettings, World, __version__
from .progress import Cancelled, JsonLinesProgress, PlainProgress, Progress, TerminalProgress, cancellable, silent

__all__ = ["EXIT_BAD_INPUT", "EXIT_CANCELLED", "EXIT_INTERNAL", "EXIT_OK", "build_parser", "main"]

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_CANCELLED = 130
PROGRESS_MODES = ("auto", "bar", "plain", "json", "none")
TRAINING_FIELDS = tuple(field.name for field in dataclasses.fields(TrainSettings))
PRETRAINING_FIELDS = tuple(name for name in TRAINING_FIELDS if name not in ADAPTER_ONLY)
TORCHRUN_COMMANDS = ("train", "pretrain")

Handler = Callable[[argparse.Namespace, Progress], Any]


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    # ValueError covers CardError, TCURLoRAFileError and the volume checks; argparse's own errors exit with 2 too.
    # FloatingPointError: the loss diverged, which the learning rates the user chose decide.
    return (ValueError, FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError, NotADirectoryError,
            FloatingPointError)


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
    if mode in ("plain", "auto"):
        return PlainProgress(sys.stderr)
    return silent


# ---------------------------------------------------------------------------------------------------- commands


def _segment(args: argparse.Namespace, progress: Progress) -> None:
    result = engine.segment(
        args.image, args.output, adapter=args.adapter, base=args.base, seg_nrrd_path=args.seg_nrrd,
        probabilities_path=args.probabilities, overlap=args.overlap, sw_batch_size=args.sw_batch_size,
        threads=args.threads, postprocess=args.postprocess, tta=args.tta, overwrite=args.overwrite,
        progress=progress, **_given(device=args.device),
    )
    if _for_people(args):
        for name, millilitres in result.volumes_ml.items():
            print(f"{name}: {millilitres:.2f} mL")


def _demo(args: argparse.Namespace, progress: Progress) -> None:
    runs = engine.run_demo(args.output, image_path=args.image, reference_path=args.reference, base=args.base,
                           threads=args.threads, overwrite=args.overwrite, progress=progress,
                           **_given(device=args.device))
    if _for_people(args):
        print(engine.format_demo_report(runs))
        print(f"outputs in {Path(args.output).resolve()}")


def _info(args: argparse.Namespace, progress: Progress) -> None:
    kind, card = engine.read_info(args.path)
    print(json.dumps({"kind": kind, "card": card}, indent=2))


def _adapters(args: argparse.Namespace, progress: Progress) -> None:
    store = engine.adapter_store()
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


def _labels_argument(text: str | None) -> list | None:
    """``--labels``: a JSON list of ``{value, name, color}`` (inline or a file), or names separated by commas."""
    if text is None:
        return None
    if text.strip()[:1] in ("[", "{") or text.endswith(".json") or Path(text).is_file():
        data = _json_argument(text, "--labels")
        if not isinstance(data, list):
            raise ValueError(f"--labels must be a JSON list of {{value, name, color}} objects, got {data!r:.200}")
        return data
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise ValueError(f"--labels: an empty label name in {text!r} (names are separated by commas)")
    return names


def _one_piece_argument(text: str | None) -> list | str | None:
    """``--one-piece``: ``all``, or label names separated by commas."""
    if text is None:
        return None
    if text.strip().lower() == "all":
        return "all"
    names = [name.strip() for name in text.split(",")]
    if not all(names):
        raise ValueError(f"--one-piece: an empty label name in {text!r} (names are separated by commas, or 'all')")
    return names


def _cases(args: argparse.Namespace) -> Any:
    if args.cases and args.case:
        raise ValueError("give cases either with --cases (folder or JSON) or with --case IMAGE LABEL, not both")
    if args.case:
        return [engine.TrainingCase(Path(case[0]), Path(case[1]), annotated_slices=engine.parse_annotated_slices(
            case[2]) if len(case) > 2 else None) for case in args.case]
    if args.cases:
        return args.cases
    raise ValueError("no training cases: give --cases FOLDER_OR_JSON or --case IMAGE LABEL")


def _given(**options: Any) -> dict[str, Any]:
    """The options the user gave: the others keep the engine's own defaults (one place for each default)."""
    return {key: value for key, value in options.items() if value is not None}


def _settings(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    return _given(**{name: getattr(args, name) for name in names})


def _for_people(args: argparse.Namespace) -> bool:
    """Whether the command's own summary goes to standard output (not with JSON lines there)."""
    return _progress_mode(args) != "json"


def _train(args: argparse.Namespace, progress: Progress) -> None:
    settings = TrainSettings.of(**_settings(args, TRAINING_FIELDS))  # checked before the base is read
    with engine.torchrun_session(settings.device) as parallel:
        result = engine.train_adapter(
            _cases(args), args.output, name=args.name, base=args.base, labels=_labels_argument(args.labels),
            label_map=_json_argument(args.label_map, "--label-map"), parent=args.parent,
            one_piece=_one_piece_argument(args.one_piece), settings=settings, overwrite=args.overwrite,
            progress=progress, parallel=parallel,
        )
    if result is not None and _for_people(args):  # None: a torchrun process that writes nothing
        print(f"adapter {result.card.name!r} written to {result.output_path}")
        print(engine.validation_table(result.card.metrics, result.card.training))


def _pretrain(args: argparse.Namespace, progress: Progress) -> None:
    settings = TrainSettings.for_pretraining(**_settings(args, PRETRAINING_FIELDS))
    with engine.torchrun_session(settings.device) as parallel:
        result = engine.pretrain(_cases(args), _json_argument(args.card, "--card"), args.output,
                                 label_map=_json_argument(args.label_map, "--label-map"), settings=settings,
                                 overwrite=args.overwrite, progress=progress, parallel=parallel)
    if result is not None and _for_people(args):
        print(f"base model {result.card.name!r} written to {result.output_path}")
        print(engine.validation_table(result.card.metrics, result.card.provenance.get("training")))


def _evaluate(args: argparse.Namespace, progress: Progress) -> None:
    cases = engine.evaluate(args.predictions, args.references, json_path=args.json, csv_path=args.csv,
                            threads=args.threads, overwrite=args.overwrite, progress=progress)
    if _for_people(args):
        print(engine.format_metrics_table(cases))


# ---------------------------------------------------------------------------------------------------- the parser


class _HelpFormatter(argparse.HelpFormatter):
    """Appends ``(default: X)`` to every option with a default that its help does not state already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: {action.default})"


class _AnnotatedSlices(argparse.Action):
    """``--annotated-slices AXIS:I,J,...``: attached to the ``--case`` just before it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        cases = getattr(namespace, "case", None)
        if not cases:
            parser.error(f"{option_string} belongs to a case: give it after its --case IMAGE LABEL")
        if len(cases[-1]) > 2:
            parser.error(f"{option_string} given twice for the case {cases[-1][0]!r}")
        cases[-1] = [*cases[-1], values]


class _DeprecatedOut(argparse.Action):
    """``--out``, the old spelling of ``-o/--output`` on ``train``; hidden from the help."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print("note: --out is deprecated, use -o/--output", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _progress_mode(args: argparse.Namespace) -> str:
    return getattr(args, "progress", "auto")


def _progress_parent(modes: Sequence[str], text: str) -> argparse.ArgumentParser:
    """``--progress``, accepted after any command or action; its default (auto) is applied after parsing, so that a
    value given before an action is not reset by the action's own parser."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--progress", choices=modes, default=argparse.SUPPRESS, help=text + " (default: auto)")
    return parent


def _add_settings(parser: argparse.ArgumentParser, defaults: TrainSettings, names: Sequence[str]) -> None:
    """Options for the named :class:`TrainSettings` fields, their help and defaults from the dataclass.

    Their argparse default is None, so that only what the user gave reaches the settings."""
    for item in dataclasses.fields(TrainSettings):
        if item.name in names:
            parser.add_argument(item.metadata["flag"], dest=item.name, default=None,
                                help=f"{item.metadata['help']} (default: {defaults.default_text(item.name)})",
                                **item.metadata["argparse"])


def _add_cases(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", metavar="FOLDER_OR_JSON",
                        help="training cases: a folder of <case>_image.<ext> with <case>_label.<ext> (or nnU-Net's "
                             "imagesTr/ and labelsTr/), or a JSON list of {image, label[, annotated_slices]}")
    parser.add_argument("--case", nargs=2, action="append", metavar=("IMAGE", "LABEL"),
                        help="one training case (label map: a label volume or a .seg.nrrd); repeat for more")
    parser.add_argument("--annotated-slices", action=_AnnotatedSlices, metavar="AXIS:I,J,...",
                        help="only these slices of the --case before it are annotated, e.g. z:12,20 (axis x, y or "
                             "z = the image's voxel axes i, j, k; 0-based); the rest stays out of the loss")
    parser.add_argument("--label-map", metavar="JSON",
                        help="case structure (label value or segment name) -> adapter label, JSON inline or a "
                             "file, e.g. '{\"1\": \"left hippocampus\"}'; a name that is no label becomes a new "
                             "label when --labels is not given")


def _add_base(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", help="base model file (default: the shipped base)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m TCURLoRALib", formatter_class=_HelpFormatter,
        description="TCURLoRA: segment volumes with a frozen UNETR and tCURLoRA adapters, and train adapters.",
    )
    parser.add_argument("--version", action="version", version=f"TCURLoRA {__version__}")
    working = _progress_parent(PROGRESS_MODES, "progress: a bar on a terminal (auto, bar), plain lines in a log "
                                               "(auto when standard error is no terminal, plain), JSON lines on "
                                               "standard output (json, for Slicer) or none")
    quiet = _progress_parent(("auto", "json", "none"), "json: an error as one JSON line on standard output (as "
                                                       "the other commands, for Slicer); nothing else to report")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, parent: argparse.ArgumentParser, text: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[parent], help=text, description=text,
                                   formatter_class=_HelpFormatter)

    plain = TrainSettings()
    seg = command("segment", working, "segment a volume with the base and an adapter")
    seg.add_argument("image", help="input volume (.nii, .nii.gz, .nrrd, .nhdr, .mha, .mhd)")
    seg.add_argument("-o", "--output", required=True, help="label map to write (.nii.gz, .nii, .nrrd)")
    _add_base(seg)
    seg.add_argument("--adapter", help="adapter file or name in the store; 'none' for the base alone "
                                       "(default: none)")
    seg.add_argument("--seg-nrrd", help="also write a Slicer segmentation (.seg.nrrd) with names and colours")
    seg.add_argument("--probabilities", help="also write the softmax probabilities (.nrrd, .nii.gz, .nii, .mha)")
    seg.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap in [0, 1)")
    seg.add_argument("--sw-batch-size", type=int, default=1, help="windows per forward pass")
    seg.add_argument("--postprocess", choices=POSTPROCESS_CHOICES, default=POSTPROCESS_CHOICES[0],
                     help="largest-component: each label the adapter's card declares one connected piece keeps only "
                          "its largest component (labels not declared are left as they are); none: the network's "
                          "own label map")
    seg.add_argument("--tta", action="store_true",
                     help="test-time mirroring: also segment the image mirrored left/right and average (twice the "
                          "time; needs left/right label pairs such as 'left X' / 'right X')")
    seg.add_argument("--overwrite", action="store_true", help="replace output files that exist")
    _add_settings(seg, plain, ("device", "threads"))
    seg.set_defaults(handler=_segment)

    train = command("train", working, "train a tCURLoRA adapter on a few cases")
    train.add_argument("--name", help="adapter name; saved in your adapter folder ($TCURLORA_HOME) unless -o is "
                                      "given (default: the -o file's name)")
    train.add_argument("-o", "--output", help="write the adapter to this .safetensors file instead")
    train.add_argument("--out", dest="output", action=_DeprecatedOut, help=argparse.SUPPRESS)
    train.add_argument("--overwrite", action="store_true",
                       help="replace a user adapter of the same name, or the -o file")
    _add_base(train)
    train.add_argument("--labels", metavar="NAMES_OR_JSON",
                       help="the adapter's labels: names separated by commas ('left hippocampus,right hippocampus': "
                            "values 1, 2, ..., background implicit, colours as Slicer gives new segments), or a JSON "
                            "list of {value, name, color} (inline or a file) (default: new names in --label-map, "
                            "else the parent adapter's labels, else the base's)")
    train.add_argument("--parent", help="continue from this adapter (file or name in the store)")
    train.add_argument("--one-piece", metavar="NAMES|all",
                       help="labels that are one connected piece, names separated by commas or 'all'; recorded in "
                            "the card, so that segment keeps only their largest component (default: the parent's, "
                            "else none)")
    _add_cases(train)
    _add_settings(train, plain, TRAINING_FIELDS)
    train.set_defaults(handler=_train)

    pretrain = command("pretrain", working, "train a whole UNETR into a base-model file")
    pretrain.add_argument("--card", required=True, help="model card fields without fingerprint (JSON inline or file)")
    pretrain.add_argument("-o", "--output", required=True, help="base-model file to write")
    pretrain.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    _add_cases(pretrain)
    _add_settings(pretrain, TrainSettings.for_pretraining(), PRETRAINING_FIELDS)
    pretrain.set_defaults(handler=_pretrain)

    evaluate = command("evaluate", working, "Dice and HD95 per label against references")
    evaluate.add_argument("--predictions", nargs="+", required=True, help="predicted label maps")
    evaluate.add_argument("--references", nargs="+", required=True, help="reference label maps, same order")
    evaluate.add_argument("--json", help="also write the metrics as JSON")
    evaluate.add_argument("--csv", help="also write the metrics as CSV")
    evaluate.add_argument("--overwrite", action="store_true", help="replace the --json/--csv files if they exist")
    _add_settings(evaluate, plain, ("threads",))
    evaluate.set_defaults(handler=_evaluate)

    demo = command("demo", working, "segment the shipped sample with the base and each shipped adapter")
    demo.add_argument("-o", "--output", default="tcurlora-demo", help="output folder")
    demo.add_argument("--image", help="another volume instead of the shipped sample")
    demo.add_argument("--reference", help="reference label map for Dice (the shipped sample comes with one)")
    _add_base(demo)
    demo.add_argument("--overwrite", action="store_true", help="replace the files of an earlier demo in the folder")
    _add_settings(demo, plain, ("device", "threads"))
    demo.set_defaults(handler=_demo)

    info = command("info", quiet, "print the card of a base model or adapter file")
    info.add_argument("path")
    info.set_defaults(handler=_info)

    adapters = command("adapters", quiet, "list, delete or rename stored adapters")
    actions = adapters.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", parents=[quiet], help="shipped and user adapters")
    listing.add_argument("--json", action="store_true", help="as JSON, cards included")
    delete = actions.add_parser("delete", parents=[quiet], help="delete a user adapter")
    delete.add_argument("name")
    rename = actions.add_parser("rename", parents=[quiet], help="rename a user adapter")
    rename.add_argument("name")
    rename.add_argument("new_name")
    adapters.set_defaults(handler=_adapters)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        world = World.from_environment()
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    marker = "" if world is None else f"[rank {world.rank}] "
    reporter = _make_progress(_progress_mode(args)) if world is None or world.main else silent
    # A cancel file (the Slicer panels' way to stop a job on Windows) is checked at every progress event; under
    # torchrun by every process at every step instead (distributed.DataParallel), so that all stop together.
    progress = cancellable(reporter) if world is None else reporter
    install_cancel_handlers()
    try:
        if world is not None and args.command not in TORCHRUN_COMMANDS:
            raise ValueError(f"{args.command} runs in one process: start it with python -m TCURLoRALib, not "
                             f"torchrun (which runs only {' and '.join(TORCHRUN_COMMANDS)})")
        run_command(args.handler, args, progress)
        return EXIT_OK
    except Cancelled as error:
        progress("error", kind="cancelled", message=str(error))
        print(f"{marker}cancelled: {error}", file=sys.stderr)
        return EXIT_CANCELLED
    except _bad_input_errors() as error:
        progress("error", kind="bad_input", message=str(error))
        print(f"{marker}error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as error:  # the last line of defence: report, with the traceback, and exit distinctly
        progress("error", kind="internal", message=f"{type(error).__name__}: {error}")
        traceback.print_exc(file=sys.stderr)
        if marker:  # after the traceback, the line that says which process it was
            print(f"{marker}internal error: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_INTERNAL
