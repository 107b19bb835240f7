"""The checker's witness: ``python -m tests.faults.tap NATS_URL OUT`` subscribes to everything and
writes one JSON line per publish to a stream subject, per JetStream acknowledgement of one, and
per gap in its own view (disconnected .. reconnected).

A JetStream publish is a request: the producer's message carries a reply subject, and the server's
PubAck (``{"stream": "EVENTS", "seq": 42}``) is published to it. Seeing both, the tap knows which
``Nats-Msg-Id`` every producer — gateway, scheduler, peer, test — was told is stored, and where.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import nats
from nats.aio.msg import Msg

STREAM_KINDS = {("session", "events"), ("peer", "events"), ("user", "events"), ("dataset", "events")}


async def main(url: str, out_path: Path) -> None:
    out = out_path.open("a", buffering=1)
    pending: dict[str, tuple[str, str]] = {}
    gap_from: list[float] = []

    def write(**record: object) -> None:
        out.write(json.dumps(record) + "\n")

    async def on_msg(msg: Msg) -> None:
        tokens = msg.subject.split(".")
        if len(tokens) == 3 and (tokens[0], tokens[2]) in STREAM_KINDS:
            msg_id = (msg.headers or {}).get("Nats-Msg-Id")
            write(kind="pub", subject=msg.subject, id=msg_id, reply=msg.reply, t=time.time())
            if msg.reply and msg_id:
                pending[msg.reply] = (msg_id, msg.subject)
        elif msg.subject in pending:
            msg_id, subject = pending.pop(msg.subject)
            try:
                ack = json.loads(msg.data)
            except ValueError:
                return
            if isinstance(ack, dict) and "seq" in ack and "error" not in ack:
                write(kind="ack", id=msg_id, subject=subject, seq=ack["seq"], dup=bool(ack.get("duplicate")))
            else:
                write(kind="nak", id=msg_id, subject=subject, ack=ack)

    async def disconnected() -> None:
        gap_from.append(time.time())

    async def reconnected() -> None:
        write(kind="gap", start=gap_from.pop() if gap_from else None, end=time.time())

    nc = await nats.connect(
        url.split(","),
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.1,
        disconnected_cb=disconnected,
        reconnected_cb=reconnected,
    )
    await nc.subscribe(">", cb=on_msg, pending_msgs_limit=1_000_000)
    await nc.flush()
    ready = out_path.with_name(out_path.name + ".ready")
    await asyncio.to_thread(ready.touch)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await nc.drain()
    out.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2])))
