"""``swarmtrain sessions start|ls|show|events|watch|cancel|download|generate|plot`` (``session`` is the same group).

Each talks to the REST API with the stored login. ``sessions watch`` exits with how the session
ended: 0 completed, 1 failed, 2 cancelled, 3 the watch itself failed (API unreachable, no such
session, …). ``replay-round`` and ``backtest``, which read the log and the blobs themselves and run
the training library, and ``export`` (torch's ONNX exporter), join this group from the launcher
(``cli/main.py``), the one module that loads what a command needs only when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from swarmtrain.cli.client import ApiError, Json
from swarmtrain.cli.commands.base import Group, client, command
from swarmtrain.cli.output import NONE, ProgressBar, fmt, listing, one_line_errors, print_json
from swarmtrain.cli.plot import plot_curves
from swarmtrain.cli.sessionview import Watcher, print_result, trains_in_rounds
from swarmtrain.common.events import FEDAVG, LrSchedule, ModelKind, OnPeerFailure, Optimizer, Precision, Strategy
from swarmtrain.training.generate import generate_text

EXIT_BY_STATUS = {"completed": 0, "failed": 1, "cancelled": 2}
EXIT_WATCH_ERROR = 3
MAX_GENERATED_TOKENS = 100_000


def register(sub: Group) -> Group:
    """Add the ``sessions`` group (alias ``session``); returns its subcommands, for the launcher's."""
    group = sub.add_parser(
        "sessions", aliases=["session"], help="start, watch and inspect training sessions"
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    for add in (_start, _ls, _show, _events, _watch, _cancel, _download, _generate, _plot):
        add(group)
    return group


# ------------------------------------------------------------------ start


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _layers(text: str) -> int | list[Any]:
    """``--layers 4`` (a transformer's blocks) or ``--layers '[{"type": "linear", "out": 64}, ...]'``."""
    if text.strip().lstrip("-").isdigit():
        return int(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(0, f"--layers takes a number or a JSON list of layers: {exc}") from None
    if not isinstance(value, list):
        raise ApiError(0, "--layers takes a number or a JSON list of layers")
    return value


def _rule(flag: str) -> Callable[[str], Json]:
    """``--aggregator median`` or ``--aggregator '{"name": "krum", "f": 1}'``."""

    def value(text: str) -> Json:
        return {"name": text} if not text.lstrip().startswith("{") else _json_object(flag, text)

    return value


def _json_object(flag: str, text: str) -> Json:
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(0, f"{flag}: not JSON: {exc}") from None
    return parsed if isinstance(parsed, dict) else {}


def _requirements(text: str) -> Json:
    if not text.lstrip().startswith("{"):
        raise ApiError(0, '--requirements takes a JSON object, e.g. \'{"device": "cuda"}\'')
    return _json_object("--requirements", text)


def _init_from(text: str) -> Json:
    session_id, _, round_ = text.partition(":")
    return {"session_id": session_id, **({"round": int(round_)} if round_ else {})}


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class BodyFlag:
    """One ``sessions start`` flag: how argparse reads it and the POST /sessions field it sets."""

    flag: str
    field: str | None
    """The body's field (``model.hidden``: a field of the model); None: read by a rule of its own."""
    help: str | None = None
    type: Callable[[str], Any] = str
    choices: tuple[str, ...] | None = None
    switch: bool = False
    """Takes no value; sets the field to true when given."""
    metavar: str | None = None
    value: Callable[[Any], Any] = _same
    """The field's value from the flag's (run when the body is built, so its errors are one line)."""

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    def add(self, p: argparse._ActionsContainer) -> None:
        if self.switch:
            p.add_argument(self.flag, action="store_true", help=self.help)
        else:
            p.add_argument(self.flag, type=self.type, choices=self.choices, metavar=self.metavar, help=self.help)

    def apply(self, args: argparse.Namespace, body: Json) -> None:
        given = getattr(args, self.dest)
        if self.field is None or given is None or given is False:
            return
        *parents, name = self.field.split(".")
        into = body
        for parent in parents:
            inner = dict(into.get(parent) or {})
            into[parent] = inner
            into = inner
        into[name] = True if self.switch else self.value(given)


def _search(raw: str) -> Json:
    """``--search``: a JSON object, or the path of a file holding one."""
    path = Path(raw)
    text = path.read_text() if not raw.lstrip().startswith("{") and path.is_file() else raw
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(0, f"--search: not JSON, nor a file of JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ApiError(0, "--search must be a JSON object")
    return value


START_FLAGS = (
    BodyFlag("--dataset", "dataset_id", "dataset id"),
    BodyFlag("--peers", "num_peers", "number of peers", type=int),
    BodyFlag("--strategy", "strategy", "how the peers share the work (default sweep)", choices=get_args(Strategy)),
    BodyFlag("--epochs", None, "epochs per peer (fedavg: local epochs per round; default 10)", type=int),
    BodyFlag("--batch-size", None, "default 64", type=int),
    BodyFlag("--lr", None, "learning rate; sweep: comma separated, one per peer (default 0.003)"),
    BodyFlag("--rounds", "rounds", "fedavg: averaging rounds", type=int),
    BodyFlag(
        "--on-peer-failure",
        "on_peer_failure",
        f"{FEDAVG}: what to do when a peer dies (default reassign)",
        choices=get_args(OnPeerFailure),
    ),
    BodyFlag("--model", "model.kind", "the model kind (default mlp)", choices=get_args(ModelKind)),
    BodyFlag("--hidden", "model.hidden", "hidden layer widths, e.g. 128,64", value=_ints),
    BodyFlag("--input-shape", "model.input_shape", "cnn: C,H,W", value=_ints),
    BodyFlag("--channels", "model.channels", "cnn: convolution widths, e.g. 16,32", value=_ints),
    BodyFlag("--depth", "model.depth", "resnet: basic blocks per stage (default 2)", type=int),
    BodyFlag("--width", "model.width", "resnet: the first stage's channels (default 16)", type=int),
    BodyFlag("--stages", "model.stages", "resnet: stages, channels doubling (default 3)", type=int),
    BodyFlag(
        "--layers",
        "model.layers",
        'transformer: blocks (default 2); layers: a JSON list of layers, e.g. \'[{"type": "linear", "out": 64}]\'',
        value=_layers,
    ),
    BodyFlag("--d-model", "model.d_model", "transformer: width (default 128)", type=int),
    BodyFlag("--heads", "model.heads", "transformer: attention heads (default 4)", type=int),
    BodyFlag("--context", "model.context", "transformer, layers on text: tokens a window (default 128)", type=int),
    BodyFlag("--positions", "model.positions", "transformer: learned|rotary (default learned)"),
    BodyFlag("--mlp-ratio", "model.mlp_ratio", "transformer: MLP width / d_model (default 4)", type=int),
    BodyFlag("--validation-split", "validation_split", "fraction held out for validation (default 0.2)", type=float),
    BodyFlag(
        "--validation-dataset",
        "validation_dataset_id",
        "validate on another of your datasets (same format, features, classes) instead of a split",
    ),
    BodyFlag("--seed", "seed", "the session's seed (default 0)", type=int),
    BodyFlag(
        "--aggregator",
        "aggregator",
        f"{FEDAVG}: mean|trimmed_mean|median|krum|multi_krum, or a JSON object",
        value=_rule("--aggregator"),
    ),
    BodyFlag(
        "--outer",
        "outer",
        f"{FEDAVG}: none|momentum|nesterov|adam, or a JSON object with lr, betas",
        value=_rule("--outer"),
    ),
    BodyFlag("--compression", "compression", f"{FEDAVG}: none|fp16|bf16|int8", value=_rule("--compression")),
    BodyFlag(
        "--sharding", "sharding", f"{FEDAVG}: iid|label_skew, or a JSON object with alpha", value=_rule("--sharding")
    ),
    BodyFlag("--keep-local-optimizer", "keep_local_optimizer", FEDAVG, switch=True),
    BodyFlag("--max-update-norm", "max_update_norm", f"{FEDAVG}: reject updates with a larger L2 norm", type=float),
    BodyFlag(
        "--init-from",
        "init_from",
        "start from an earlier session's model",
        metavar="SESSION[:ROUND]",
        value=_init_from,
    ),
    BodyFlag(
        "--requirements",
        "requirements",
        'a JSON object, e.g. \'{"device": "cuda", "labels": {"region": "eu"}}\'',
        value=_requirements,
    ),
    BodyFlag("--queue", "queue", "wait queued for matching peers instead of a 400", switch=True),
    BodyFlag(
        "--queue-timeout-s", "queue_timeout_s", "give up after this long in the queue (implies --queue)", type=float
    ),
    BodyFlag("--priority", "priority", "higher is served first (default 0)", type=int),
    BodyFlag("--precision", "precision", "what the peers compute in (default fp32)", choices=get_args(Precision)),
    BodyFlag(
        "--search",
        "search",
        'sweep: a search (JSON file or text), e.g. \'{"space": {"lr": {"log_uniform": [1e-4, 0.1]}}, "trials": 24}\'',
        value=_search,
    ),
)
"""Every flag of ``sessions start`` that sets a field of the request, in ``--help``'s order."""
REQUIRED = {"dataset_id": "--dataset", "num_peers": "--peers"}

TRAINING_FLAGS = (
    BodyFlag("--optimizer", "optimizer", "the peers' optimizer (default adamw)", choices=get_args(Optimizer)),
    BodyFlag("--weight-decay", "weight_decay", "AdamW's decoupled decay, SGD's L2 penalty (default 0)", type=float),
    BodyFlag("--momentum", "momentum", "sgd: momentum (default 0.9)", type=float),
    BodyFlag("--grad-clip-norm", "grad_clip_norm", "clip the gradients' L2 norm to this before each step", type=float),
    BodyFlag(
        "--lr-schedule",
        "lr_schedule",
        "the learning rate over the run (default constant)",
        choices=get_args(LrSchedule),
    ),
    BodyFlag("--warmup-steps", "warmup_steps", "optimizer steps of linear warmup (default 0)", type=int),
    BodyFlag("--grad-accumulation", "grad_accumulation", "batches summed into one step (default 1)", type=int),
    BodyFlag(
        "--checkpoint-every",
        "checkpoint_every",
        "sweep: save a checkpoint every N epochs, so a re-sent run resumes (default 0: none)",
        type=int,
    ),
)
"""The flags that set a field of every hyperparameter set (``--epochs``, ``--batch-size`` and
``--lr`` are read by ``_hyperparameters``'s own rule), in ``--help``'s order."""


def _hyperparameters(args: argparse.Namespace, body: Json) -> None:
    """``--epochs``, ``--batch-size`` and ``--lr`` (comma separated: one set per peer) and the
    :data:`TRAINING_FLAGS` over the file's hyperparameters (its first set, where it has a list; its
    other fields kept), with the defaults where neither says."""
    training: Json = {}
    for flag in TRAINING_FLAGS:
        flag.apply(args, training)
    flagged = args.lr is not None or args.epochs is not None or args.batch_size is not None or training
    if not flagged and "hyperparameters" in body:
        return
    given = body.get("hyperparameters")
    base = given if isinstance(given, dict) else (given[0] if given else {})
    epochs = args.epochs if args.epochs is not None else base.get("epochs", 10)
    batch = args.batch_size if args.batch_size is not None else base.get("batch_size", 64)
    lrs = [float(x) for x in args.lr.split(",")] if args.lr else [base.get("lr", 0.003)]
    sets = [{**base, **training, "epochs": epochs, "batch_size": batch, "lr": lr} for lr in lrs]
    body["hyperparameters"] = sets if len(sets) > 1 else sets[0]


def session_body(args: argparse.Namespace) -> Json:
    """The POST /sessions body: ``--file`` first, then every flag given on top of it."""
    body: Json = json.loads(Path(args.file).read_text()) if args.file else dict(getattr(args, "base", None) or {})
    if not isinstance(body, dict):
        raise ApiError(0, f"{args.file} must hold a JSON object")
    for flag in START_FLAGS:
        flag.apply(args, body)
    _hyperparameters(args, body)
    if missing := [name for field, name in REQUIRED.items() if field not in body]:
        raise ApiError(0, f"missing {', '.join(missing)}")
    return body


def best_body(s: Json) -> Json:
    """A session request of one peer from a finished search's best configuration."""
    best = (s.get("search") or {}).get("best")
    if not best:
        raise ApiError(0, f"session {s['session_id']} has no best configuration (not a search, or not finished)")
    return {
        "dataset_id": s["dataset_id"],
        "num_peers": 1,
        "strategy": "sweep",
        "hyperparameters": best["hyperparameters"],
        "model": best["model"],
        "validation_split": s["validation_split"],
        "seed": s["seed"],
    }


def _start(group: Group) -> None:
    p = command(
        group.add_parser("start", help="request a training session (flags, or --file body.json)"), _run_start, json=True
    )
    p.add_argument("--file", help="a JSON body for POST /sessions; flags given override its fields")
    p.add_argument(
        "--from-best",
        metavar="SESSION",
        help="start from a finished search's best configuration (its dataset, hyperparameters and model); "
        "flags given override it",
    )
    for flag in START_FLAGS:
        flag.add(p)
    training = p.add_argument_group("training", "fields of every hyperparameter set (over --file's)")
    for flag in TRAINING_FLAGS:
        flag.add(training)
    p.add_argument("--watch", action="store_true", help="then watch it (exit status as `sessions watch`)")


@one_line_errors()
def _run_start(args: argparse.Namespace) -> int:
    with client(args) as api:
        if getattr(args, "from_best", None):
            args.base = best_body(api.session(args.from_best))
        body = session_body(args)
        out = api.start(body)
    if args.json and not args.watch:
        print_json(out)
        return 0
    print(f"session {out['session_id']} {out['status']}", file=sys.stderr if args.json else sys.stdout)
    if args.watch:
        args.session_id = out["session_id"]
        return _run_watch(args)
    return 0


# ------------------------------------------------------------------ look


def _ls(group: Group) -> None:
    p = command(group.add_parser("ls", help="list my sessions, newest first"), _run_ls, json=True)
    p.add_argument("--limit", type=int, default=100)


@one_line_errors()
def _run_ls(args: argparse.Namespace) -> int:
    with client(args) as api:
        rows = api.sessions(args.limit)
    return listing(
        args,
        rows,
        ["SESSION", "STATUS", "STRATEGY", "PEERS", "ROUNDS", "VAL ACC", "CREATED (UTC)"],
        lambda s: [
            s["session_id"],
            s["status"],
            s["strategy"],
            s["num_peers"],
            s["rounds"] if trains_in_rounds(s) else NONE,
            fmt(s["val_accuracy"] if s["val_accuracy"] is not None else s["best_val_accuracy"]),
            s["created_at"][:19].replace("T", " "),
        ],
    )


def _show(group: Group) -> None:
    command(group.add_parser("show", help="one session's figures"), _run_show, json=True).add_argument("session_id")


@one_line_errors()
def _run_show(args: argparse.Namespace) -> int:
    with client(args) as api:
        s = api.session(args.session_id)
    if args.json:
        print_json(s)
    else:
        print_result(s)
    return 0


def _events(group: Group) -> None:
    p = command(group.add_parser("events", help="a session's event history"), _run_events, json=True)
    p.add_argument("session_id")


@one_line_errors()
def _run_events(args: argparse.Namespace) -> int:
    with client(args) as api:
        events = list(api.events(args.session_id))
    if args.json:
        print_json([{"seq": seq, "event": e} for seq, e in events])
        return 0
    for seq, e in events:
        detail = {k: v for k, v in e.items() if k not in ("type", "event_id", "occurred_at", "session_id")}
        print(f"{seq:>7}  {e['occurred_at'][:23]}  {e['type']:<22} {json.dumps(detail)[:160]}")
    return 0


def _watch(group: Group) -> None:
    p = group.add_parser(
        "watch",
        help="follow a session live; exit 0 completed, 1 failed, 2 cancelled, 3 watch error",
        description="Follow a session live (a table on a terminal, one line per event otherwise), "
        "then print its leaderboard or final figures. Exit status: 0 completed, 1 failed, 2 cancelled, "
        "3 the watch failed.",
    )
    command(p, _run_watch, json=True).add_argument("session_id")


@one_line_errors(EXIT_WATCH_ERROR)
def _run_watch(args: argparse.Namespace) -> int:
    with client(args) as api:
        session = Watcher(api, args.session_id, as_json=args.json).run()
    if args.json:
        print_json(session)
    else:
        print_result(session)
    return EXIT_BY_STATUS.get(session["status"], EXIT_WATCH_ERROR)


# ------------------------------------------------------------------ act


def _cancel(group: Group) -> None:
    command(group.add_parser("cancel", help="cancel a queued or running session"), _run_cancel).add_argument(
        "session_id"
    )


@one_line_errors()
def _run_cancel(args: argparse.Namespace) -> int:
    with client(args) as api:
        out = api.cancel(args.session_id)
    print(f"session {out['session_id']} {out['status']}")
    return 0


def _download(group: Group) -> None:
    p = command(group.add_parser("download", help="download a session's model (safetensors)"), _run_download)
    p.add_argument("session_id")
    p.add_argument("-o", "--output", help="file to write (default: <session_id>.safetensors)")


@one_line_errors()
def _run_download(args: argparse.Namespace) -> int:
    dest = Path(args.output or f"{args.session_id}.safetensors")
    bar = ProgressBar(f"downloading {dest.name}")
    with client(args) as api:
        size = api.download(args.session_id, dest, bar)
    bar.finish(f"model ({size:,} bytes, safetensors) saved to {dest}")
    return 0


def _generate(group: Group) -> None:
    p = command(group.add_parser("generate", help="sample text from a finished language model"), _run_generate)
    p.add_argument("session_id")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--tokens", type=int, default=200, help="tokens to sample (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0: the likeliest token each time (default 0.8)")
    p.add_argument("--seed", type=int, default=0, help="the sampling seed (default 0)")


@one_line_errors()
def _run_generate(args: argparse.Namespace) -> int:
    if not 1 <= args.tokens <= MAX_GENERATED_TOKENS:
        raise ApiError(0, f"--tokens must be 1 to {MAX_GENERATED_TOKENS}")
    with tempfile.TemporaryDirectory(prefix="swarmtrain-generate-") as tmp:
        dest = Path(tmp) / "model.safetensors"
        with client(args) as api:
            api.download(args.session_id, dest)
        try:
            text = generate_text(dest, args.prompt, args.tokens, args.temperature, args.seed)
        except ValueError as exc:
            raise ApiError(0, str(exc)) from None
    print(args.prompt + text)
    return 0


def _plot(group: Group) -> None:
    p = command(group.add_parser("plot", help="a session's curves as a PNG"), _run_plot)
    p.add_argument("session_id")
    p.add_argument("-o", "--output", required=True, help="PNG file to write")
    p.add_argument("--size", default="1200x400", help="WIDTHxHEIGHT in pixels (default 1200x400)")


@one_line_errors()
def _run_plot(args: argparse.Namespace) -> int:
    try:
        width, height = (int(x) for x in args.size.lower().split("x"))
    except ValueError:
        raise ApiError(0, f"--size must be WIDTHxHEIGHT in pixels, not {args.size!r}") from None
    with client(args) as api:
        metrics, session = api.metrics(args.session_id), api.session(args.session_id)
    dest = Path(args.output)
    plot_curves(metrics, session, dest, width, height)
    print(f"curves of {len(metrics['peers'])} peers saved to {dest} ({width}x{height})")
    return 0


__all__ = ["EXIT_BY_STATUS", "START_FLAGS", "TRAINING_FLAGS", "register", "session_body"]
