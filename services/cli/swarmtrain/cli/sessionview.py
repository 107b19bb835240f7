"""How a session is shown: its final figures (the leaderboard or the rounds), where its starting
model came from, and ``Watcher``, which follows its live events (``sessions watch``, ``demo``)."""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

from swarmtrain.cli.client import Client, Json
from swarmtrain.cli.output import NONE, fmt, short, table
from swarmtrain.common import strategies, tasks
from swarmtrain.common.status import SESSION_TERMINAL
from swarmtrain.common.strategies import StrategyRules


def _rules(s: Json) -> StrategyRules | None:
    """The contract's facts of the session's strategy; None for a name this client does not know
    (a newer gateway's)."""
    name = s.get("strategy")
    return strategies.rules(name) if isinstance(name, str) and name in strategies.RULES else None


def trains_in_rounds(s: Json) -> bool:
    """Whether the session averages in rounds: its strategy does, or it has closed one, or asked
    for more than one (the gateway refuses ``rounds`` above 1 to every other strategy)."""
    rules = _rules(s)
    return bool(s["round_figures"]) or s["rounds"] > 1 or (rules is not None and rules.rounds)


def _shared_model(s: Json) -> bool:
    """Whether the peers train one model together (each trains a shard of it), so that they are
    not ranked against each other."""
    rules = _rules(s)
    return any(p["shard"] is not None for p in s["peers"]) or (rules is not None and rules.shared_model)


def task_rules(s: Json) -> tasks.TaskRules:
    """The facts of the session's task (classification for a gateway from before tasks)."""
    name = s.get("task")
    return tasks.rules(name if isinstance(name, str) and name in tasks.RULES else "classification")


HEADLINES = {"accuracy": "VAL ACC", "mse": "VAL MSE", "perplexity": "VAL PPL"}
"""A task's headline figure's column (``TaskRules.headline``)."""


def headline(s: Json, figures: Json) -> str:
    """``figures``' (a peer's, a round's) headline figure as text: accuracy, MSE or perplexity."""
    value = task_rules(s).headline_of(figures.get("val_loss"), figures.get("val_accuracy"))
    return fmt(value, 4 if task_rules(s).headline != "accuracy" else 3)


def lineage_line(s: Json) -> str:
    """Where the session's starting model came from ("" for seeded weights)."""
    parent = s.get("parent_session_id")
    if not parent:
        return ""
    at = f" at round {s['parent_round']}" if s.get("parent_round") is not None else " (its final model)"
    without = f", without {', '.join(short(p) for p in s['excluded_peers'])}" if s.get("excluded_peers") else ""
    return f"started from session {parent}{at}{without}"


def print_result(s: Json, out: TextIO | None = None) -> None:
    """The session's final figures: the leaderboard (sweep) or the rounds and the model's accuracy (fedavg)."""
    out = out or sys.stdout
    out.write(
        f"session {s['session_id']}: {s['status']}"
        + (f" ({s['reason']})" if s.get("reason") else "")
        + (
            f", val {task_rules(s).score.replace('_', ' ')} {fmt(s['val_accuracy'])}"
            if s.get("val_accuracy") is not None
            else ""
        )
        + "\n"
    )
    if lineage := lineage_line(s):
        out.write(lineage + "\n")
    if s.get("round_options_summary"):
        out.write(f"round options: {s['round_options_summary']}\n")
    if s["round_figures"]:
        out.write("rounds:\n")
        table(
            [
                [
                    r["round"],
                    ", ".join(short(p) for p in r["included"]),
                    ", ".join(short(p) for p in r["left_out"]) or NONE,
                    "; ".join(f"{short(x['peer_id'])}: {x['reason']}" for x in r["rejected"]) or NONE,
                    fmt(r["loss"], 4),
                    headline(s, r),
                    r.get("aggregator") or NONE,
                    f"{r['update_bytes']:,}" if r.get("update_bytes") else NONE,
                ]
                for r in s["round_figures"]
            ],
            ["ROUND", "INCLUDED", "LEFT OUT", "REJECTED", "LOSS", HEADLINES[task_rules(s).headline], "RULE", "BYTES"],
            out,
        )
    board = {"accuracy": "validation accuracy", "mse": "validation MSE, lower is better"}
    out.write(
        "peers:\n"
        if _shared_model(s)
        else f"leaderboard ({board.get(task_rules(s).headline, 'validation perplexity, lower is better')}):\n"
    )
    ranked = sorted(s["peers"], key=lambda p: -(p["val_accuracy"] if p["val_accuracy"] is not None else -1))
    table(
        [
            [
                n,
                ("* " if p["peer_id"] == s["best_peer_id"] else "  ") + short(p["peer_id"]),
                p["status"],
                f"{p['epoch']}/{p['epochs']}",
                p["hyperparameters"]["lr"],
                fmt(p["loss"], 4),
                headline(s, p),
            ]
            for n, p in enumerate(ranked, 1)
        ],
        ["#", "PEER", "STATUS", "EPOCH", "LR", "LOSS", HEADLINES[task_rules(s).headline]],
        out,
    )
    if s.get("search"):
        print_search(s["search"], s["session_id"], out)
    if s.get("model_available"):
        out.write(f"model: swarmtrain sessions download {s['session_id']}\n")


def print_search(search: Json, session_id: str, out: TextIO) -> None:
    """A search's trials, what mattered (the importance table) and its best configuration."""
    eta = search.get("eta_s")
    out.write(
        f"search: {search['done']} done, {search['running']} running, {search['pruned']} pruned, "
        f"{search['failed']} failed, {search['left']} left" + (f", about {eta:.0f}s to go" if eta else "") + "\n"
    )
    trials = sorted(search["trials"], key=lambda t: -(t["value"] if t["value"] is not None else -1e300))
    table(
        [
            [
                t["trial"],
                t["status"] + (f"@{t['rung']}" if t.get("rung") else ""),
                short(t["peer_id"]),
                f"{t['epoch']}/{t['epochs']}",
                ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in t["params"].items()),
                fmt(t["value"]),
            ]
            for t in trials
        ],
        ["TRIAL", "STATUS", "PEER", "EPOCH", "PARAMS", str(search["spec"].get("metric") or "val_accuracy").upper()],
        out,
    )
    if search["importances"]:
        out.write("importance (what mattered):\n")
        table(
            [[k, f"{v:.3f}", "#" * round(40 * v)] for k, v in search["importances"].items()],
            ["HYPERPARAMETER", "IMPORTANCE", ""],
            out,
        )
    if search.get("best"):
        best = search["best"]
        out.write(
            f"best: trial {best['trial']} ({fmt(best['value'])} as the scheduler measured it): {best['params']}\n"
        )
        out.write(f"start from it: swarmtrain sessions start --from-best {session_id}\n")


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
                    f"{short(e['peer_id'])}  epoch {e['epoch']:>3}/{e['epochs']}  loss {e['loss']:.4f}"
                    f"  acc {e['accuracy']:.3f}  val_acc {fmt(e.get('val_accuracy'))}"
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
                return f"on {', '.join(short(p) for p in e['assignments'])}"
            case "PeerDone":
                return f"{short(e['peer_id'])} val_acc {fmt(e.get('val_accuracy'))} in {e['train_seconds']:.1f}s"
            case "PeerFailed":
                return f"{short(e['peer_id'])}: {e['reason']}"
            case "RoundClosed":
                self.rounds["closed"] = e["round"]
                return f"round {e['round']}: {len(e['updates'])} updates" + (
                    f", left out {', '.join(short(p) for p in e['left_out'])}" if e["left_out"] else ""
                )
            case "RoundAveraged":
                return f"round {e['round']} averaged: val_acc {fmt(e.get('val_accuracy'))}"
            case "UpdateRejected":
                return f"round {e['round']}: {short(e['peer_id'])} rejected: {e['reason']}"
            case "ShardReassigned":
                return f"round {e['round']}: shard {e['shard']} {short(e['from_peer_id'])} -> {short(e['to_peer_id'])}"
            case "SessionFailed" | "SessionCancelled":
                return str(e["reason"])
            case "SessionCompleted":
                return f"best {short(e['best_peer_id'])} ({fmt(e.get('best_val_accuracy'))})"
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
                f"  {short(peer_id)} [{bar}] epoch {e['epoch']:>3}/{e['epochs']}  loss {e['loss']:.4f}"
                f"  val_acc {fmt(e.get('val_accuracy'))}"
            )
        lines.append(f"  last: {self.last_event}")
        if self.drawn:
            self.out.write(f"\033[{self.drawn}F")
        self.out.write("".join(f"\033[K{text}\n" for text in lines))
        self.out.flush()
        self.drawn = len(lines)
