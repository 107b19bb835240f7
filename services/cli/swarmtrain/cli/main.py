"""swarmtrain: train models on a swarm of peers. Run a service, a peer, the local stack, or tap live events."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import typing
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec

from swarmtrain.cli import commands
from swarmtrain.cli.commands.base import Group
from swarmtrain.common import bus, metrics, subjects
from swarmtrain.common.fedopts import AggregatorName
from swarmtrain.common.logging import configure, get_logger
from swarmtrain.common.settings import Settings, get_settings
from swarmtrain.common.version import VERSION


def serve(main: Callable[[Settings, asyncio.Event], Awaitable[None]], settings: Settings | None = None) -> int:
    """Run ``main(settings, stop)`` until SIGINT or SIGTERM sets ``stop``.

    ``main`` finishes its work cleanly once ``stop`` is set; while it still waits for NATS (away,
    or refusing the credential) it ends at once (``bus.STOP``, ``bus.Stopped``). A second signal
    ends it at once in any state.
    """
    settings = settings or get_settings()
    configure(settings.log_level, settings.log_format)
    metrics.expose(settings.metrics_port, settings.metrics_host)

    async def runner() -> None:
        stop = asyncio.Event()
        bus.STOP.set(stop)
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()

        def on_signal() -> None:
            if stop.is_set() and task is not None:
                task.cancel()  # asked twice: no more waiting for a clean finish
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        try:
            await main(settings, stop)
        except bus.Stopped as exc:
            get_logger("swarmtrain").info("stopped", reason=str(exc))

    with contextlib.suppress(asyncio.CancelledError):
        asyncio.run(runner())
    return 0


def _service_commands(sub: Group) -> None:
    for name, func, text in (
        ("gateway", _gateway, "run the REST gateway"),
        ("scheduler", _scheduler, "run the scheduler"),
        ("projector", _projector, "run the projector (the only writer of PostgreSQL)"),
    ):
        sub.add_parser(name, help=text).set_defaults(func=func)


def _gateway(args: argparse.Namespace) -> int:
    from swarmtrain.gateway.app import run

    return serve(run)


def _scheduler(args: argparse.Namespace) -> int:
    from swarmtrain.scheduler.service import run

    return serve(run)


def _projector(args: argparse.Namespace) -> int:
    from swarmtrain.projector.service import run

    return serve(run)


def _peer_command(sub: Group) -> None:
    peer = sub.add_parser("peer", help="join the swarm as a training peer")
    peer.add_argument("--nats", help="NATS URL (default: SWARMTRAIN_NATS_URL)")
    peer.add_argument("--name", help="a name for this peer; its id is kept per name (default: hostname)")
    peer.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    peer.add_argument(
        "--credentials",
        help="a peer-<n>.env from `swarmtrain nats-config` (its id and NATS nkey), or a folder of them: "
        "the first one no other peer holds is taken (default: none, for an open NATS server)",
    )
    peer.add_argument(
        "--join",
        metavar="TOKEN",
        help="the token `swarmtrain invite` printed on the stack's machine ('-': read it from stdin): "
        "the stack's NATS address and this peer's credential; state under <state dir>/joined/<peer id>",
    )
    peer.add_argument(
        "--gpus",
        help="'all' or GPU indexes such as 0,2: one supervised peer per GPU, named <name>-gpu<i>, stopped together",
    )
    peer.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an owner-given label in the peer's specs, matched by a session's requirements (repeatable)",
    )
    peer.set_defaults(func=_peer)


def _peer(args: argparse.Namespace) -> int:
    if args.gpus is not None:
        from swarmtrain.cli.gpus import supervise

        if args.device != "auto":
            raise ValueError("--gpus runs one CUDA peer per GPU: leave --device out")
        return supervise(args.gpus, name=args.name, nats=args.nats, credentials=args.credentials, labels=args.label)

    from swarmtrain.peer.service import run
    from swarmtrain.peer.specs import parse_labels

    labels = parse_labels(args.label)
    settings = get_settings()
    with contextlib.ExitStack() as stack:
        name = args.name
        if args.join:
            from swarmtrain.cli import invite

            token = invite.decode_token(sys.stdin.read() if args.join == "-" else args.join)
            if why := asyncio.run(invite.refusal(token.nats, token.seed, token.inbox)):
                raise RuntimeError(f"NATS at {', '.join(token.nats)} refuses this invite's credential: {why}")
            settings = invite.joined_settings(token, settings)
        elif args.credentials:
            from swarmtrain.cli.natsconfig import claim
            from swarmtrain.common.settings import from_env

            # the credential fixes the peer's id and NATS identity; it is held while the peer runs
            claimed, env = stack.enter_context(claim(Path(args.credentials)))
            settings = from_env({**os.environ, **env})
            name = name or claimed
        if args.nats:
            settings = msgspec.structs.replace(settings, nats_url=args.nats)

        async def main(s: Settings, stop: asyncio.Event) -> None:
            await run(s, stop, name=name, device=args.device, labels=labels)

        return serve(main, settings)


def _projections_command(sub: Group) -> None:
    proj = sub.add_parser("projections", help="manage the read models")
    proj_sub = proj.add_subparsers(dest="action", required=True, metavar="ACTION")
    proj_sub.add_parser("rebuild", help="empty the read models and replay every event").set_defaults(func=_rebuild)


def _rebuild(args: argparse.Namespace) -> int:
    from swarmtrain.projector.service import rebuild

    settings = get_settings()
    configure(settings.log_level, settings.log_format)
    replayed, position = asyncio.run(rebuild(settings))
    print(f"projections rebuilt: {replayed} events replayed, position {position}")
    return 0


def _tap_command(sub: Group) -> None:
    tap = sub.add_parser("tap", help="print live events, one JSON per line")
    tap.add_argument("subject", nargs="?", default=subjects.SESSION_EVENTS)
    tap.add_argument("--nats", help="NATS URL (default: SWARMTRAIN_NATS_URL)")
    tap.set_defaults(func=_tap)


def _tap(args: argparse.Namespace) -> int:
    """Print every message on SUBJECT as one JSON line, as `nats sub` would show it."""
    import nats
    from nats.aio.msg import Msg

    settings = get_settings()
    url = args.nats or settings.nats_url

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        nc = await nats.connect(
            url.split(","), nkeys_seed_str=settings.nats_nkey_seed, inbox_prefix=settings.nats_inbox_prefix
        )

        async def show(msg: Msg) -> None:
            sys.stdout.write(msg.data.decode(errors="replace") + "\n")
            sys.stdout.flush()

        await nc.subscribe(args.subject, cb=show)
        print(f"# listening on {args.subject} at {url}", file=sys.stderr, flush=True)
        await stop.wait()
        await nc.drain()

    asyncio.run(main())
    return 0


def _replay_round(args: argparse.Namespace) -> int:
    from swarmtrain.cli.replay import replay_round

    result = replay_round(get_settings(), args.session_id, args.round)
    print(
        f"round {result.round} of session {result.session_id}: averaged {len(result.included)} updates "
        f"({', '.join(result.included)})"
    )
    for peer_id, reason in result.rejected:
        print(f"  rejected {peer_id}: {reason}")
    print(
        f"  rule {result.aggregator} (stored: {result.stored_aggregator}), selected {', '.join(result.selected)}, "
        f"{result.update_bytes} update bytes (stored: {result.stored_update_bytes})"
    )
    for k in result.earlier_mismatches:
        print(f"  round {k} on the way differs from its stored model")
    print(f"  recomputed sha256 {result.recomputed_sha256}")
    print(f"  stored     sha256 {result.stored_sha256} ({result.stored_uri})")
    print("MATCH: bit for bit" if result.matches else "MISMATCH")
    return 0 if result.matches else 2


def _backtest(args: argparse.Namespace) -> int:
    from swarmtrain.cli.backtest import backtest, render
    from swarmtrain.common.fedopts import AggregatorSpec

    spec = msgspec.convert({"name": args.aggregator, "beta": args.beta, "f": args.f, "m": args.m}, AggregatorSpec)
    print(render(backtest(get_settings(), args.session_id, spec)))
    return 0


def _export(args: argparse.Namespace) -> int:
    import tempfile

    from swarmtrain.cli.client import ApiError
    from swarmtrain.cli.commands.base import client
    from swarmtrain.cli.output import ProgressBar
    from swarmtrain.training.export import to_onnx

    dest = Path(args.onnx)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "model.safetensors"
            bar = ProgressBar(f"downloading {args.session_id}")
            with client(args) as api:
                size = api.download(args.session_id, raw, bar)
            bar.finish(f"model ({size:,} bytes, safetensors) downloaded")
            meta = to_onnx(raw, dest)
    except ApiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{meta.spec().kind} model exported to {dest} (ONNX: input 'input', output 'output')")
    return 0


def _replay_commands(sessions: Group) -> None:
    """``sessions replay-round`` and ``sessions backtest``: they read the log and the blobs themselves
    and run the training library (torch), so they load it here, only when one of them runs."""
    replay = sessions.add_parser("replay-round", help="recompute a fedavg round from the log and the blobs")
    replay.add_argument("session_id")
    replay.add_argument("round", type=int)
    replay.set_defaults(func=_replay_round)
    backtest = sessions.add_parser(
        "backtest",
        help="per round, aggregate a fedavg session's recorded updates with another rule and compare on the "
        "validation split (a counterfactual on the same updates, not a retraining)",
    )
    backtest.add_argument("session_id")
    backtest.add_argument("--aggregator", required=True, choices=typing.get_args(AggregatorName))
    backtest.add_argument("--f", type=int, default=1, help="krum, multi_krum: peers assumed faulty")
    backtest.add_argument("--beta", type=float, default=0.25, help="trimmed_mean: fraction trimmed from each end")
    backtest.add_argument("--m", type=int, default=None, help="multi_krum: updates averaged (default n - f)")
    backtest.set_defaults(func=_backtest)
    export = sessions.add_parser("export", help="export a session's model for serving (ONNX, run by onnxruntime)")
    export.add_argument("session_id")
    export.add_argument("--onnx", required=True, help="ONNX file to write")
    export.add_argument("--api", help="the gateway's URL (default: the one `swarmtrain login` stored)")
    export.set_defaults(func=_export)


def _nats_config_command(sub: Group) -> None:
    natsconf = sub.add_parser(
        "nats-config", help="write a NATS server configuration and least-privilege credentials (nkeys)"
    )
    natsconf.add_argument("--out", required=True, help="folder to write into, e.g. deploy/nats")
    natsconf.add_argument("--peers", type=int, default=4, help="peer credentials wanted in all (default 4)")
    natsconf.add_argument(
        "--sync",
        default="always",
        help="JetStream sync_interval: 'always' (fsync before every ack; the default) or a duration such as 1s",
    )
    natsconf.add_argument("--port", type=int, default=4222, help="client port (default 4222)")
    natsconf.add_argument(
        "--cluster",
        type=int,
        default=0,
        help="nodes of a JetStream cluster (3: streams kept on three, surviving the loss of one; "
        "compose.yaml's `ha` profile); default 0, one server",
    )
    natsconf.set_defaults(func=_nats_config)


def _nats_config(args: argparse.Namespace) -> int:
    from swarmtrain.cli.natsconfig import main as nats_config

    if args.peers < 0:
        raise ValueError("--peers must be 0 or more")
    return nats_config(Path(args.out), args.peers, args.sync, args.port, args.cluster)


def _up_command(sub: Group) -> None:
    up = sub.add_parser("up", help="run the whole stack on this machine (NATS, PostgreSQL, services, peers)")
    up.add_argument("--peers", type=int, default=3, help="number of local peers (default 3)")
    up.add_argument("--port", type=int, default=8000, help="gateway port (default 8000)")
    up.add_argument("--nats-port", type=int, default=4222, help="NATS port (default 4222)")
    up.add_argument("--data-dir", default=".swarmtrain", help="where state lives (default ./.swarmtrain)")
    up.add_argument(
        "--listen",
        metavar="ADDRESS",
        help="let other machines join: NATS and the gateway listen on ADDRESS (0.0.0.0: every interface), "
        "with NATS authentication and least-privilege credentials on; then `swarmtrain invite` "
        "(default: loopback only)",
    )
    up.add_argument(
        "--advertise",
        metavar="HOST",
        help="with --listen: the host name or address other machines reach this one at "
        "(default: the listen address, or this machine's primary address for 0.0.0.0)",
    )
    up.set_defaults(func=_up)


def _up(args: argparse.Namespace) -> int:
    from swarmtrain.cli.stack import Stack

    return Stack(
        peers=args.peers,
        port=args.port,
        nats_port=args.nats_port,
        data_dir=Path(args.data_dir).resolve(),
        listen=args.listen,
        advertise=args.advertise,
    ).run()


def _invite_command(sub: Group) -> None:
    invite = sub.add_parser(
        "invite", help="print a `swarmtrain peer --join` command that lets another machine join this stack"
    )
    invite.add_argument("--peers", type=int, default=1, help="peer credentials to hand out, one line each (default 1)")
    invite.add_argument("--data-dir", default=".swarmtrain", help="the stack's --data-dir (default ./.swarmtrain)")
    invite.set_defaults(func=_invite)


def _invite(args: argparse.Namespace) -> int:
    from swarmtrain.cli.invite import main as invite

    return invite(Path(args.data_dir).resolve(), args.peers)


def _health_command(sub: Group) -> None:
    health = sub.add_parser(
        "health", help="check the swarmtrain service or peer a container runs (the image's HEALTHCHECK)"
    )
    health.add_argument("--pid", type=int, default=1, help="the process to check (default 1: the container's)")
    health.set_defaults(func=_health)


def _health(args: argparse.Namespace) -> int:
    from swarmtrain.cli.health import main as health

    return health(args.pid)


def _demo_command(sub: Group) -> None:
    demo = sub.add_parser("demo", help="start the stack, train the sample dataset on local peers, show the result")
    demo.add_argument("--peers", type=int, default=3)
    demo.add_argument("--epochs", type=int, default=15)
    demo.add_argument("--dataset", help="a CSV with a `label` column (default: the packaged digits sample)")
    demo.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    from swarmtrain.cli.demo import demo

    return demo(peers=args.peers, csv_path=Path(args.dataset) if args.dataset else None, epochs=args.epochs)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="swarmtrain", description=__doc__)
    p.add_argument("--version", action="version", version=f"swarmtrain {VERSION}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _up_command,
        _invite_command,
        _peer_command,
        _nats_config_command,
        _tap_command,
        _service_commands,
        _projections_command,
        _demo_command,
        _health_command,
    ):
        add(sub)
    _replay_commands(commands.register(sub))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (RuntimeError, OSError, ValueError) as exc:
        if os.environ.get("SWARMTRAIN_DEBUG"):
            raise
        print(f"swarmtrain: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
