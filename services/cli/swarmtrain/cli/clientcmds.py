"""A swarmtrain user's commands: ``login``, ``peers``, ``datasets``, ``sessions`` (beside the operator's
``up``, ``gateway``, ``tap`` …). Each talks to the REST API through ``client.Client`` with the stored
login; ``--json`` on every read command prints the API's JSON instead of a table. An error prints
the API's problem detail on one line (exit status 1), never a traceback.

``sessions watch`` exits with how the session ended: 0 completed, 1 failed, 2 cancelled,
3 the watch itself failed (API unreachable, no such session, …).
"""

from __future__ import annotations

import argparse
import functools
import getpass
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO, get_args

from swarmtrain.cli.client import DEFAULT_API, ApiError, Client, Json, Login, load_login, save_login
from swarmtrain.common import strategies
from swarmtrain.common.events import FEDAVG, ModelKind, OnPeerFailure, Precision, Strategy
from swarmtrain.common.status import SESSION_TERMINAL
from swarmtrain.common.strategies import StrategyRules

EXIT_BY_STATUS = {"completed": 0, "failed": 1, "cancelled": 2}
EXIT_WATCH_ERROR = 3
NONE = "-"
Handler = Callable[[argparse.Namespace], int]


# ------------------------------------------------------------------ output helpers


def _print_json(value: Any) -> None:
    json.dump(value, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _table(rows: list[list[Any]], headers: list[str], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    cells = [[str(c) for c in headers]] + [[NONE if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for n, row in enumerate(cells):
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")
        if n == 0:
            out.write("  ".join("-" * w for w in widths) + "\n")


def _listing(args: argparse.Namespace, rows: list[Json], headers: list[str], cells: Callable[[Json], list[Any]]) -> int:
    """A list command's output: the API's JSON as it came with ``--json``, else a table."""
    if args.json:
        _print_json(rows)
    else:
        _table([cells(row) for row in rows], headers)
    return 0


def _f(x: float | None, digits: int = 3) -> str:
    return NONE if x is None else f"{x:.{digits}f}"


def _short(value: str | None) -> str:
    return (value or "")[:8]


class ProgressBar:
    """A one-line progress bar on stderr when it is a terminal; otherwise only the final line."""

    def __init__(self, label: str, out: TextIO | None = None) -> None:
        self.label, self.out = label, out or sys.stderr
        self.tty = self.out.isatty()
        self._last = -1.0

    def __call__(self, done: int, total: int) -> None:
        frac = done / total if total else 1.0
        if self.tty and (frac >= 1.0 or frac - self._last >= 0.01):
            self._last = frac
            filled = int(30 * frac)
            self.out.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {frac:6.1%} {done / 1e6:7.2f} MB")
            self.out.flush()

    def finish(self, text: str) -> None:
        self.out.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.out.flush()


# ------------------------------------------------------------------ plumbing


def _client(args: argparse.Namespace) -> Client:
    login = load_login()
    if not login.token:
        raise ApiError(0, "not signed in: run `swarmtrain login` first")
    return Client.from_login(login, getattr(args, "api", None))


def _one_line_errors(exit_code: int = 1) -> Callable[[Handler], Handler]:
    def wrap(func: Handler) -> Handler:
        @functools.wraps(func)
        def run(args: argparse.Namespace) -> int:
            try:
                return func(args)
            except ApiError as exc:
                print(f"swarmtrain: error: {exc}", file=sys.stderr)
                return exit_code
            except KeyboardInterrupt:
                print("swarmtrain: interrupted", file=sys.stderr)
                return 130

        return run

    return wrap


# ------------------------------------------------------------------ login


@_one_line_errors()
def _login(args: argparse.Namespace) -> int:
    api_url = args.api or load_login().api_url
    with Client(api_url) as client:
        if args.token_stdin:
            token = sys.stdin.readline().strip()
            if not token:
                raise ApiError(0, "no token on stdin")
            client.set_token(token)
        else:
            email = args.email or input("Email: ").strip()
            password = sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass("Password: ")
            if args.signup:
                client.signup(email, password)
            token = client.signin(email, password)
        me = client.me()  # the token works before it is stored
    path = save_login(Login(api_url=api_url, token=token))
    print(f"signed in to {api_url} as {me['email']} (login stored in {path})")
    return 0


# ------------------------------------------------------------------ peers and datasets


@_one_line_errors()
def _peers_ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        peers = client.peers()
    return _listing(
        args,
        peers,
        ["NAME", "DEVICE", "STATUS", "LAST SEEN", "SESSION"],
        lambda p: [p["name"], p["device"], p["status"], p["last_seen"], _short(p["session_id"])],
    )


@_one_line_errors()
def _datasets_upload(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if not path.is_file():
        raise ApiError(0, f"no such file: {path}")
    bar = ProgressBar(f"uploading {path.name}")
    with _client(args) as client:
        ds = client.upload(path, args.label, bar)
    if args.json:
        bar.finish("")
        _print_json(ds)
        return 0
    bar.finish(f"dataset {ds['dataset_id']}: {ds['rows']} rows, {ds['features']} features, {ds['classes']} classes")
    return 0


@_one_line_errors()
def _datasets_ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        rows = client.datasets()
    return _listing(
        args,
        rows,
        ["DATASET", "NAME", "ROWS", "FEATURES", "CLASSES", "LABEL"],
        lambda d: [d["dataset_id"], d["name"], d["rows"], d["features"], d["classes"], d["label_column"]],
    )


# ------------------------------------------------------------------ sessions


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _named(flag: str, value: str) -> Json:
    """``--aggregator median`` or ``--aggregator '{"name": "krum", "f": 1}'``; ``--requirements`` takes
    JSON only (``{"device": "cuda", "min_gpu_memory_bytes": ...}``)."""
    if value.lstrip().startswith("{"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ApiError(0, f"--{flag.replace('_', '-')}: not JSON: {exc}") from None
        return parsed if isinstance(parsed, dict) else {}
    if flag == "requirements":
        raise ApiError(0, '--requirements takes a JSON object, e.g. \'{"device": "cuda"}\'')
    return {"name": value}


def session_body(args: argparse.Namespace) -> Json:
    """The POST /sessions body: ``--file`` first, then every flag given on top of it."""
    body: Json = json.loads(Path(args.file).read_text()) if args.file else {}
    if not isinstance(body, dict):
        raise ApiError(0, f"{args.file} must hold a JSON object")
    for flag, field in (
        ("dataset", "dataset_id"),
        ("peers", "num_peers"),
        ("strategy", "strategy"),
        ("rounds", "rounds"),
        ("on_peer_failure", "on_peer_failure"),
        ("validation_split", "validation_split"),
        ("seed", "seed"),
        ("max_update_norm", "max_update_norm"),
        ("queue_timeout_s", "queue_timeout_s"),
        ("priority", "priority"),
        ("precision", "precision"),
    ):
        if getattr(args, flag) is not None:
            body[field] = getattr(args, flag)
    for flag in ("queue", "keep_local_optimizer"):
        if getattr(args, flag):
            body[flag] = True
    for flag in ("aggregator", "outer", "compression", "sharding", "requirements"):
        if getattr(args, flag) is not None:  # NAME or a JSON object, e.g. '{"name": "krum", "f": 1}'
            body[flag] = _named(flag, getattr(args, flag))
    if args.init_from is not None:
        session_id, _, round_ = args.init_from.partition(":")
        body["init_from"] = {"session_id": session_id, **({"round": int(round_)} if round_ else {})}
    model: Json = dict(body.get("model") or {})
    if args.model is not None:
        model["kind"] = args.model
    if args.hidden is not None:
        model["hidden"] = _ints(args.hidden)
    if args.input_shape is not None:
        model["input_shape"] = _ints(args.input_shape)
    if args.channels is not None:
        model["channels"] = _ints(args.channels)
    if model:
        body["model"] = model
    if args.lr is not None or args.epochs is not None or args.batch_size is not None or "hyperparameters" not in body:
        given = body.get("hyperparameters")
        base = given if isinstance(given, dict) else (given[0] if given else {})
        epochs = args.epochs if args.epochs is not None else base.get("epochs", 10)
        batch = args.batch_size if args.batch_size is not None else base.get("batch_size", 64)
        lrs = [float(x) for x in args.lr.split(",")] if args.lr else [base.get("lr", 0.003)]
        sets = [{"epochs": epochs, "batch_size": batch, "lr": lr} for lr in lrs]
        body["hyperparameters"] = sets if len(sets) > 1 else sets[0]
    missing = [f for f in ("dataset_id", "num_peers") if f not in body]
    if missing:
        raise ApiError(0, f"missing {', '.join('--' + ('dataset' if f == 'dataset_id' else 'peers') for f in missing)}")
    return body


@_one_line_errors()
def _sessions_start(args: argparse.Namespace) -> int:
    body = session_body(args)
    with _client(args) as client:
        out = client.start(body)
    if args.json and not args.watch:
        _print_json(out)
        return 0
    print(f"session {out['session_id']} {out['status']}", file=sys.stderr if args.json else sys.stdout)
    if args.watch:
        args.session_id = out["session_id"]
        return _sessions_watch(args)
    return 0


@_one_line_errors()
def _sessions_ls(args: argparse.Namespace) -> int:
    with _client(args) as client:
        rows = client.sessions(args.limit)
    return _listing(
        args,
        rows,
        ["SESSION", "STATUS", "STRATEGY", "PEERS", "ROUNDS", "VAL ACC", "CREATED (UTC)"],
        lambda s: [
            s["session_id"],
            s["status"],
            s["strategy"],
            s["num_peers"],
            s["rounds"] if _trains_in_rounds(s) else NONE,
            _f(s["val_accuracy"] if s["val_accuracy"] is not None else s["best_val_accuracy"]),
            s["created_at"][:19].replace("T", " "),
        ],
    )


def _rules(s: Json) -> StrategyRules | None:
    """The contract's facts of the session's strategy; None for a name this client does not know
    (a newer gateway's)."""
    name = s.get("strategy")
    return strategies.rules(name) if isinstance(name, str) and name in strategies.RULES else None


def _trains_in_rounds(s: Json) -> bool:
    """Whether the session averages in rounds: its strategy does, or it has closed one, or asked
    for more than one (the gateway refuses ``rounds`` above 1 to every other strategy)."""
    rules = _rules(s)
    return bool(s["round_figures"]) or s["rounds"] > 1 or (rules is not None and rules.rounds)


def _shared_model(s: Json) -> bool:
    """Whether the peers train one model together (each trains a shard of it), so that they are
    not ranked against each other."""
    rules = _rules(s)
    return any(p["shard"] is not None for p in s["peers"]) or (rules is not None and rules.shared_model)


def lineage_line(s: Json) -> str:
    """Where the session's starting model came from ("" for seeded weights)."""
    parent = s.get("parent_session_id")
    if not parent:
        return ""
    at = f" at round {s['parent_round']}" if s.get("parent_round") is not None else " (its final model)"
    without = f", without {', '.join(_short(p) for p in s['excluded_peers'])}" if s.get("excluded_peers") else ""
    return f"started from session {parent}{at}{without}"


def print_result(s: Json, out: TextIO | None = None) -> None:
    """The session's final figures: the leaderboard (sweep) or the rounds and the model's accuracy (fedavg)."""
    out = out or sys.stdout
    out.write(
        f"session {s['session_id']}: {s['status']}"
        + (f" ({s['reason']})" if s.get("reason") else "")
        + (f", val accuracy {_f(s['val_accuracy'])}" if s.get("val_accuracy") is not None else "")
        + "\n"
    )
    if lineage := lineage_line(s):
        out.write(lineage + "\n")
    if s.get("round_options_summary"):
        out.write(f"round options: {s['round_options_summary']}\n")
    if s["round_figures"]:
        out.write("rounds:\n")
        _table(
            [
                [
                    r["round"],
                    ", ".join(_short(p) for p in r["included"]),
                    ", ".join(_short(p) for p in r["left_out"]) or NONE,
                    "; ".join(f"{_short(x['peer_id'])}: {x['reason']}" for x in r["rejected"]) or NONE,
                    _f(r["loss"], 4),
                    _f(r["val_accuracy"]),
                    r.get("aggregator") or NONE,
                    f"{r['update_bytes']:,}" if r.get("update_bytes") else NONE,
                ]
                for r in s["round_figures"]
            ],
            ["ROUND", "INCLUDED", "LEFT OUT", "REJECTED", "LOSS", "VAL ACC", "RULE", "BYTES"],
            out,
        )
    out.write("peers:\n" if _shared_model(s) else "leaderboard (validation accuracy):\n")
    ranked = sorted(s["peers"], key=lambda p: -(p["val_accuracy"] if p["val_accuracy"] is not None else -1))
    _table(
        [
            [
                n,
                ("* " if p["peer_id"] == s["best_peer_id"] else "  ") + _short(p["peer_id"]),
                p["status"],
                f"{p['epoch']}/{p['epochs']}",
                p["hyperparameters"]["lr"],
                _f(p["loss"], 4),
                _f(p["val_accuracy"]),
            ]
            for n, p in enumerate(ranked, 1)
        ],
        ["#", "PEER", "STATUS", "EPOCH", "LR", "LOSS", "VAL ACC"],
        out,
    )
    if s.get("model_available"):
        out.write(f"model: swarmtrain sessions download {s['session_id']}\n")


class Watcher:
    """Follows one session's event stream and shows it: a live table redrawn in place on a terminal,
    one line per event otherwise (or one JSON line per event with ``as_json``)."""

    def __init__(self, client: Client, session_id: str, out: TextIO | None = None, as_json: bool = False) -> None:
        self.client, self.session_id, self.as_json = client, session_id, as_json
        self.out = out or sys.stdout
        self.tty = self.out.isatty() and not as_json
        self.peers: dict[str, Json] = {}
        self.rounds: dict[str, int] = {}
        self.last_event = ""
        self.drawn = 0
        self.last_draw = 0.0

    def run(self) -> Json:
        """Watch until the session ends; returns the session as the API shows it then."""
        for _, event in self.client.stream(self.session_id):
            self.on_event(event)
        if self.tty:
            self.draw(force=True)
        return self.settled()

    def settled(self) -> Json:
        """The session once the read models have applied its terminal event (moments after the stream)."""
        deadline = time.monotonic() + 30
        while (s := self.client.session(self.session_id))["status"] not in SESSION_TERMINAL:
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        return s

    def on_event(self, e: Json) -> None:
        kind = e["type"]
        if self.as_json:
            self.out.write(json.dumps(e) + "\n")
            self.out.flush()
            return
        if kind == "Heartbeat":
            self.peers[e["peer_id"]] = e
            if not self.tty:
                self.line(
                    f"{_short(e['peer_id'])}  epoch {e['epoch']:>3}/{e['epochs']}  loss {e['loss']:.4f}"
                    f"  acc {e['accuracy']:.3f}  val_acc {_f(e.get('val_accuracy'))}"
                    f"  {e['samples_per_s']:,.0f} samples/s"
                )
        else:
            text = self.describe(e)
            self.last_event = f"{kind} {text}".strip()
            if not self.tty:
                self.line(self.last_event)
        if self.tty:
            self.draw()

    def describe(self, e: Json) -> str:
        match e["type"]:
            case "SessionStarted":
                return f"on {', '.join(_short(p) for p in e['assignments'])}"
            case "PeerDone":
                return f"{_short(e['peer_id'])} val_acc {_f(e.get('val_accuracy'))} in {e['train_seconds']:.1f}s"
            case "PeerFailed":
                return f"{_short(e['peer_id'])}: {e['reason']}"
            case "RoundClosed":
                self.rounds["closed"] = e["round"]
                return f"round {e['round']}: {len(e['updates'])} updates" + (
                    f", left out {', '.join(_short(p) for p in e['left_out'])}" if e["left_out"] else ""
                )
            case "RoundAveraged":
                return f"round {e['round']} averaged: val_acc {_f(e.get('val_accuracy'))}"
            case "UpdateRejected":
                return f"round {e['round']}: {_short(e['peer_id'])} rejected: {e['reason']}"
            case "ShardReassigned":
                return (
                    f"round {e['round']}: shard {e['shard']} {_short(e['from_peer_id'])} -> {_short(e['to_peer_id'])}"
                )
            case "SessionFailed" | "SessionCancelled":
                return str(e["reason"])
            case "SessionCompleted":
                return f"best {_short(e['best_peer_id'])} ({_f(e.get('best_val_accuracy'))})"
            case _:
                return ""

    def line(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        lines = [f"session {self.session_id}" + (f"  round {self.rounds['closed']} closed" if self.rounds else "")]
        for peer_id, e in sorted(self.peers.items()):
            frac = e["epoch"] / e["epochs"] if e["epochs"] else 0
            bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
            lines.append(
                f"  {_short(peer_id)} [{bar}] epoch {e['epoch']:>3}/{e['epochs']}  loss {e['loss']:.4f}"
                f"  val_acc {_f(e.get('val_accuracy'))}"
            )
        lines.append(f"  last: {self.last_event}")
        if self.drawn:
            self.out.write(f"\033[{self.drawn}F")
        self.out.write("".join(f"\033[K{text}\n" for text in lines))
        self.out.flush()
        self.drawn = len(lines)


@_one_line_errors(EXIT_WATCH_ERROR)
def _sessions_watch(args: argparse.Namespace) -> int:
    with _client(args) as client:
        session = Watcher(client, args.session_id, as_json=args.json).run()
    if args.json:
        _print_json(session)
    else:
        print_result(session)
    return EXIT_BY_STATUS.get(session["status"], EXIT_WATCH_ERROR)


@_one_line_errors()
def _sessions_show(args: argparse.Namespace) -> int:
    with _client(args) as client:
        s = client.session(args.session_id)
    if args.json:
        _print_json(s)
    else:
        print_result(s)
    return 0


@_one_line_errors()
def _sessions_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        out = client.cancel(args.session_id)
    print(f"session {out['session_id']} {out['status']}")
    return 0


@_one_line_errors()
def _sessions_events(args: argparse.Namespace) -> int:
    with _client(args) as client:
        events = list(client.events(args.session_id))
    if args.json:
        _print_json([{"seq": seq, "event": e} for seq, e in events])
        return 0
    for seq, e in events:
        detail = {k: v for k, v in e.items() if k not in ("type", "event_id", "occurred_at", "session_id")}
        print(f"{seq:>7}  {e['occurred_at'][:23]}  {e['type']:<22} {json.dumps(detail)[:160]}")
    return 0


@_one_line_errors()
def _sessions_download(args: argparse.Namespace) -> int:
    dest = Path(args.output or f"{args.session_id}.safetensors")
    bar = ProgressBar(f"downloading {dest.name}")
    with _client(args) as client:
        size = client.download(args.session_id, dest, bar)
    bar.finish(f"model ({size:,} bytes, safetensors) saved to {dest}")
    return 0


def plot_curves(metrics: Json, session: Json, dest: Path, width_px: int = 1200, height_px: int = 400) -> None:
    """The session's curves per peer (loss, accuracy, validation accuracy) as a PNG of the given size."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    dpi = 100
    fig, axes = plt.subplots(1, 3, figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    try:
        for series in metrics["peers"]:
            pts = series["points"]
            label = _short(series["peer_id"])
            xs = [p["epoch"] for p in pts]
            axes[0].plot(xs, [p["loss"] for p in pts], label=label)
            axes[1].plot(xs, [p["accuracy"] for p in pts], label=label)
            val = [(p["epoch"], p["val_accuracy"]) for p in pts if p["val_accuracy"] is not None]
            axes[2].plot([x for x, _ in val], [y for _, y in val], marker=".", label=label)
        for ax, title in zip(axes, ("training loss", "training accuracy", "validation accuracy"), strict=True):
            ax.set_title(title)
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
        axes[2].legend(fontsize="small")
        fig.suptitle(f"session {_short(session['session_id'])}: {session['strategy']}, {session['status']}")
        fig.tight_layout()
        fig.savefig(dest, dpi=dpi, format="png")
    finally:
        plt.close(fig)


@_one_line_errors()
def _sessions_plot(args: argparse.Namespace) -> int:
    try:
        width, height = (int(x) for x in args.size.lower().split("x"))
    except ValueError:
        raise ApiError(0, f"--size must be WIDTHxHEIGHT in pixels, not {args.size!r}") from None
    with _client(args) as client:
        metrics, session = client.metrics(args.session_id), client.session(args.session_id)
    dest = Path(args.output)
    plot_curves(metrics, session, dest, width, height)
    print(f"curves of {len(metrics['peers'])} peers saved to {dest} ({width}x{height})")
    return 0


# ------------------------------------------------------------------ parsers


def _api_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api", help="the gateway's URL (default: the one `swarmtrain login` stored)")


def _read(p: argparse.ArgumentParser, func: Handler) -> argparse.ArgumentParser:
    _api_flag(p)
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.set_defaults(func=func)
    return p


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the user's commands to the ``swarmtrain`` parser."""
    login = sub.add_parser("login", help="sign in to a swarmtrain gateway and store the token (0600)")
    login.add_argument("--api", help=f"the gateway's URL (default: the stored one, else {DEFAULT_API})")
    login.add_argument("--email", help="the account's email (default: asked)")
    login.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    login.add_argument("--token-stdin", action="store_true", help="read an access token from stdin (for scripts)")
    login.add_argument("--signup", action="store_true", help="create the account first")
    login.set_defaults(func=_login)

    peers = sub.add_parser("peers", help="the swarm's peers").add_subparsers(dest="action", required=True)
    _read(peers.add_parser("ls", help="list peers"), _peers_ls)

    ds = sub.add_parser("datasets", help="upload and list datasets").add_subparsers(dest="action", required=True)
    up = _read(ds.add_parser("upload", help="upload a training CSV (with a progress bar)"), _datasets_upload)
    up.add_argument("file")
    up.add_argument("--label", default="label", help="the label column (default: label)")
    _read(ds.add_parser("ls", help="list my datasets"), _datasets_ls)

    ss = sub.add_parser("sessions", help="start, watch and inspect training sessions").add_subparsers(
        dest="action", required=True
    )
    start = _read(
        ss.add_parser("start", help="request a training session (flags, or --file body.json)"), _sessions_start
    )
    start.add_argument("--file", help="a JSON body for POST /sessions; flags given override its fields")
    start.add_argument("--dataset", help="dataset id")
    start.add_argument("--peers", type=int, help="number of peers")
    start.add_argument("--strategy", choices=get_args(Strategy))
    start.add_argument("--epochs", type=int, help="epochs per peer (fedavg: local epochs per round; default 10)")
    start.add_argument("--batch-size", type=int, help="default 64")
    start.add_argument("--lr", help="learning rate; sweep: comma separated, one per peer (default 0.003)")
    start.add_argument("--rounds", type=int, help="fedavg: averaging rounds")
    start.add_argument("--on-peer-failure", choices=get_args(OnPeerFailure), help=FEDAVG)
    start.add_argument("--model", choices=get_args(ModelKind))
    start.add_argument("--hidden", help="hidden layer widths, e.g. 128,64")
    start.add_argument("--input-shape", help="cnn: C,H,W")
    start.add_argument("--channels", help="cnn: convolution widths, e.g. 16,32")
    start.add_argument("--validation-split", type=float)
    start.add_argument("--seed", type=int)
    start.add_argument("--aggregator", help=f"{FEDAVG}: mean|trimmed_mean|median|krum|multi_krum, or a JSON object")
    start.add_argument("--outer", help=f"{FEDAVG}: none|momentum|nesterov|adam, or a JSON object with lr, betas")
    start.add_argument("--compression", help=f"{FEDAVG}: none|fp16|bf16|int8")
    start.add_argument("--sharding", help=f"{FEDAVG}: iid|label_skew, or a JSON object with alpha")
    start.add_argument("--keep-local-optimizer", action="store_true", help=FEDAVG)
    start.add_argument("--max-update-norm", type=float, help=f"{FEDAVG}: reject updates with a larger L2 norm")
    start.add_argument("--init-from", metavar="SESSION[:ROUND]", help="start from an earlier session's model")
    start.add_argument("--requirements", help='a JSON object, e.g. \'{"device": "cuda", "labels": {"region": "eu"}}\'')
    start.add_argument("--queue", action="store_true", help="wait queued for matching peers instead of a 400")
    start.add_argument("--queue-timeout-s", type=float, help="give up after this long in the queue (implies --queue)")
    start.add_argument("--priority", type=int, help="higher is served first (default 0)")
    start.add_argument("--precision", choices=get_args(Precision))
    start.add_argument("--watch", action="store_true", help="then watch it (exit status as `sessions watch`)")

    ls = _read(ss.add_parser("ls", help="list my sessions, newest first"), _sessions_ls)
    ls.add_argument("--limit", type=int, default=100)
    for name, func, text in (
        ("show", _sessions_show, "one session's figures"),
        ("events", _sessions_events, "a session's event history"),
    ):
        _read(ss.add_parser(name, help=text), func).add_argument("session_id")
    watch = _read(
        ss.add_parser(
            "watch",
            help="follow a session live; exit 0 completed, 1 failed, 2 cancelled, 3 watch error",
            description="Follow a session live (a table on a terminal, one line per event otherwise), "
            "then print its leaderboard or final figures. Exit status: 0 completed, 1 failed, 2 cancelled, "
            "3 the watch failed.",
        ),
        _sessions_watch,
    )
    watch.add_argument("session_id")
    cancel = ss.add_parser("cancel", help="cancel a queued or running session")
    _api_flag(cancel)
    cancel.add_argument("session_id")
    cancel.set_defaults(func=_sessions_cancel)
    dl = ss.add_parser("download", help="download a session's model (safetensors)")
    _api_flag(dl)
    dl.add_argument("session_id")
    dl.add_argument("-o", "--output", help="file to write (default: <session_id>.safetensors)")
    dl.set_defaults(func=_sessions_download)
    plot = ss.add_parser("plot", help="a session's curves as a PNG")
    _api_flag(plot)
    plot.add_argument("session_id")
    plot.add_argument("-o", "--output", required=True, help="PNG file to write")
    plot.add_argument("--size", default="1200x400", help="WIDTHxHEIGHT in pixels (default 1200x400)")
    plot.set_defaults(func=_sessions_plot)


__all__ = ["EXIT_BY_STATUS", "ProgressBar", "Watcher", "print_result", "register", "session_body"]
