"""Language modelling end to end on `swarmtrain up` as processes: a seeded text corpus uploaded, a
``transformer`` fedavg on its token windows to completed whose validation perplexity ends below a
unigram model's (counted from the training tokens here), ``replay-round`` MATCH for that fedavg,
``swarmtrain sessions generate`` sampling text from the finished model, and a sweep on it."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from swarmtrain.common.events import DataSpec
from swarmtrain.training.data import split_indices
from swarmtrain.training.formats.text import corpus_tokens, cut_windows
from tests.factories import session_body

from .conftest import Api, Stack, cli

pytestmark = pytest.mark.timeout(300)  # the stack's start and two sessions on a busy 2-core runner

CONTEXT = 32
SEED = 3
MODEL = {"kind": "transformer", "layers": 2, "d_model": 48, "heads": 4, "context": CONTEXT}
LOCAL = {"epochs": 2, "batch_size": 32, "lr": 0.003}
SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "a small bird"]
VERBS = ["sat on", "ran to", "looked at", "walked past", "sang near"]
PLACES = ["the mat.", "the park.", "a tree.", "the river.", "our house."]


def story(lines: int, seed: int = 0) -> str:
    """Sentences from a seeded generator: words repeat, and inside them the next byte is easy."""
    rng = np.random.default_rng(seed)
    return "".join(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(PLACES)}\n" for _ in range(lines))


def unigram_perplexity(path: Path, seed: int) -> float:
    """The validation perplexity of a unigram model counted on the session's training windows
    (add-one smoothed over the 256 bytes), on the session's own split of the windows."""
    x, y = cut_windows(corpus_tokens(path, DataSpec(format="text")), CONTEXT)
    train, val = split_indices(len(x), 0.2, seed)
    counts = np.bincount(y[train.numpy()].reshape(-1), minlength=256).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return math.exp(-float(logp[y[val.numpy()].reshape(-1)].mean()))


def _write(path: Path, text: str) -> bytes:
    path.write_text(text)
    return text.encode()


async def _upload(api: Api, raw: bytes) -> dict[str, Any]:
    resp = await api.client.post("/datasets", files={"file": ("story.txt", raw, "text/plain")}, data={"format": "text"})
    assert resp.status_code == 201, resp.text
    return dict(resp.json())


async def test_a_transformer_fedavg_on_a_corpus_beats_unigram_replays_and_generates(
    stack: Stack, api: Api, tmp_path: Path
) -> None:
    path = tmp_path / "story.txt"
    raw = _write(path, story(700))
    ds = await _upload(api, raw)
    assert (ds["format"], ds["target"], ds["tokens"]) == ("text", "language_modeling", len(raw))

    await api.wait_idle_peers(2)
    body = session_body(ds["dataset_id"], 2, LOCAL, strategy="fedavg", rounds=3, model=MODEL, seed=SEED)
    resp = await api.client.post("/sessions", json=body)
    assert resp.status_code == 201, resp.text
    sid = resp.json()["session_id"]
    done = await api.wait_ended(sid, timeout=240)
    assert done["status"] == "completed", done
    assert done["task"] == "language_modeling" and done["model_available"], done

    # the last round's average on the validation windows (val_loss: next-token cross-entropy)
    unigram = unigram_perplexity(path, SEED)
    last = done["round_figures"][-1]
    assert last["round"] == 3 and last["val_loss"] is not None, done["round_figures"]
    perplexity = math.exp(last["val_loss"])
    assert perplexity < 0.7 * unigram, (perplexity, unigram)
    assert done["val_accuracy"] is not None and 0.0 < done["val_accuracy"] <= 1.0  # next-token accuracy
    page = (await api.client.get(f"/sessions/{sid}/events", params={"limit": 1000})).json()
    [requested] = [r["event"] for r in page["events"] if r["event"]["type"] == "SessionRequested"]
    assert (requested["data_read"], requested["data"]["context"]) == ("shard", CONTEXT)  # peers read their windows
    beats = [r["event"]["figures"] for r in page["events"] if r["event"]["type"] == "Heartbeat"]
    assert len(beats) == 2 * 3 * LOCAL["epochs"], beats  # every peer's every epoch
    assert all(b["tokens_per_s"] > 0 and 1.0 < b["perplexity"] < 256 for b in beats), beats

    rc, out, err = await cli("session", "replay-round", sid, "2", env=stack.env, timeout=120)
    assert rc == 0, out + err
    assert "MATCH: bit for bit" in out

    login = {"api_url": str(api.client.base_url), "token": api.client.headers["Authorization"].split()[1]}
    (tmp_path / "swarmtrain").mkdir()
    (tmp_path / "swarmtrain" / "config.json").write_text(json.dumps(login))
    env = {**stack.env, "XDG_CONFIG_HOME": str(tmp_path)}
    args = ("sessions", "generate", sid, "--prompt", "the cat", "--tokens", "50", "--temperature", "0.8")
    rc, out, err = await cli(*args, "--seed", "0", env=env)
    assert rc == 0, err
    assert out.startswith("the cat") and len(out.encode()) >= len(b"the cat") + 40, out
    sampled = out[len("the cat") :]
    alphabet = set(story(700))
    assert set(sampled) <= alphabet, out  # the corpus's own 25-odd bytes, not any of 256
    words = set(" ".join(SUBJECTS + VERBS + PLACES).replace(".", "").split())
    assert len(words & set(sampled.replace(".", " ").split())) >= 2, out  # and some of its words
    again = await cli(*args, "--seed", "0", env=env)
    assert again == (0, out, err)  # the same seed samples the same text

    model = await api.client.get(f"/sessions/{sid}/model")
    assert model.status_code == 200
    from swarmtrain.training.model import load_model

    net, meta = load_model(model.content)
    assert (meta.task, meta.vocab) == ("language_modeling", 256)
    assert net(torch.zeros(1, CONTEXT, dtype=torch.long)).shape == (1, CONTEXT, 256)


async def test_a_transformer_sweep_on_a_corpus_and_what_is_refused(stack: Stack, api: Api, tmp_path: Path) -> None:
    path = tmp_path / "story.txt"
    ds = await _upload(api, _write(path, story(300, seed=1)))
    mlp = session_body(ds["dataset_id"], 1, LOCAL, model={"kind": "mlp", "hidden": [8]})
    resp = await api.client.post("/sessions", json=mlp)
    assert resp.status_code == 400 and "transformer" in resp.text, resp.text
    huge = session_body(ds["dataset_id"], 1, LOCAL, model={**MODEL, "context": 1 << 14})
    resp = await api.client.post("/sessions", json=huge)
    assert resp.status_code == 400 and "window" in resp.text, resp.text

    await api.wait_idle_peers(2)
    hps = [LOCAL, {**LOCAL, "lr": 0.001}]
    resp = await api.client.post("/sessions", json=session_body(ds["dataset_id"], 2, hps, model=MODEL, seed=SEED))
    assert resp.status_code == 201, resp.text
    done = await api.wait_ended(resp.json()["session_id"], timeout=240)
    assert done["status"] == "completed", done
    assert done["task"] == "language_modeling" and done["val_accuracy"] is not None
    best = min(p["val_loss"] for p in done["peers"] if p["val_loss"] is not None)
    assert math.exp(best) < unigram_perplexity(path, SEED), done
