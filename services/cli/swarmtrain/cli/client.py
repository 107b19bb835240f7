"""The swarmtrain REST API from Python: what the user's commands (``cli/commands``) and ``swarmtrain demo``
are built on. Synchronous (httpx), one method per route, errors as ``ApiError`` carrying the API's
problem detail. The stored login lives in ``$XDG_CONFIG_HOME/swarmtrain/config.json`` (mode 0600).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import httpx

DEFAULT_API = "http://127.0.0.1:8000"
CHUNK = 64 * 1024
Json = dict[str, Any]
TERMINAL_EVENTS = frozenset({"SessionCompleted", "SessionFailed", "SessionCancelled"})
Progress = Callable[[int, int], None]
"""Called with (bytes sent, total bytes)."""


class ApiError(Exception):
    """The API said no (``status`` >= 400, ``detail`` from its problem JSON), or it could not be reached
    (``status`` 0)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status} {detail}" if status else detail)
        self.status, self.detail = status, detail


# ------------------------------------------------------------------ stored login


def config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "swarmtrain" / "config.json"


@dataclass(frozen=True)
class Login:
    api_url: str = DEFAULT_API
    token: str | None = None


def load_login(path: Path | None = None) -> Login:
    path = path or config_path()
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return Login()
    except (OSError, ValueError) as exc:
        raise ApiError(0, f"cannot read {path}: {exc}") from None
    return Login(api_url=str(raw.get("api_url") or DEFAULT_API), token=raw.get("token"))


def save_login(login: Login, path: Path | None = None) -> Path:
    """Write the login with 0600 rights (its folder 0700), never readable by others even briefly."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"api_url": login.api_url, "token": login.token}, f)
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return path


# ------------------------------------------------------------------ the client


def _problem(resp: httpx.Response) -> ApiError:
    detail = resp.reason_phrase or "error"
    try:
        body = resp.json()
        if isinstance(body, dict) and body.get("detail"):
            detail = str(body["detail"])
    except ValueError:
        if resp.text.strip():
            detail = resp.text.strip().splitlines()[0][:300]
    return ApiError(resp.status_code, detail)


def _multipart(path: Path, fields: dict[str, str], progress: Progress | None) -> tuple[str, int, Iterator[bytes]]:
    """A multipart/form-data body streamed from ``path``: (content type, length, chunks)."""
    boundary = uuid.uuid4().hex
    head = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    )
    filename = path.name.replace('"', "_")
    head += (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        f"Content-Type: {'text/csv' if path.suffix.lower() == '.csv' else 'application/octet-stream'}\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    size = path.stat().st_size
    total = len(head) + size + len(tail)

    def chunks() -> Iterator[bytes]:
        sent = len(head)
        yield head
        f: BinaryIO
        with path.open("rb") as f:
            while block := f.read(CHUNK):
                sent += len(block)
                if progress:
                    progress(sent, total)
                yield block
        yield tail
        if progress:
            progress(total, total)

    return f"multipart/form-data; boundary={boundary}", total, chunks()


class Client:
    def __init__(self, api_url: str = DEFAULT_API, token: str | None = None, timeout: float = 30.0) -> None:
        self.api_url = api_url.rstrip("/")
        headers = {"Accept": "application/json", "User-Agent": "swarmtrain-cli"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self.http = httpx.Client(base_url=self.api_url, headers=headers, timeout=timeout)

    @classmethod
    def from_login(cls, login: Login, api_url: str | None = None) -> Client:
        return cls(api_url or login.api_url, login.token)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_token(self, token: str) -> None:
        self.http.headers["Authorization"] = f"Bearer {token}"

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(0, f"cannot reach the API at {self.api_url}: {exc}") from None
        if resp.status_code >= 400:
            raise _problem(resp)
        return resp

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(method, path, **kwargs).json()

    # ---- accounts

    def signup(self, email: str, password: str, username: str | None = None) -> Json:
        body: Json = {"email": email, "password": password}
        if username:
            body["username"] = username
        result: Json = self._json("POST", "/auth/signup", json=body)
        return result

    def signin(self, email: str, password: str) -> str:
        token = str(self._json("POST", "/auth/signin", json={"email": email, "password": password})["access_token"])
        self.set_token(token)
        return token

    def me(self) -> Json:
        result: Json = self._json("GET", "/auth/me")
        return result

    # ---- swarm and datasets

    def peers(self) -> list[Json]:
        result: list[Json] = self._json("GET", "/peers")
        return result

    def upload(
        self,
        path: Path,
        label_column: str = "label",
        progress: Progress | None = None,
        options: dict[str, str] | None = None,
    ) -> Json:
        """Upload ``path``; ``options``: the form's other fields (``format``, ``image_size``, ``vocab_size``)."""
        fields = {"label_column": label_column, **(options or {})}
        content_type, length, body = _multipart(path, fields, progress)
        result: Json = self._json(
            "POST",
            "/datasets",
            content=body,
            headers={"Content-Type": content_type, "Content-Length": str(length)},
            timeout=httpx.Timeout(30.0, write=None, read=300.0),
        )
        return result

    def datasets(self) -> list[Json]:
        result: list[Json] = self._json("GET", "/datasets")
        return result

    def dataset(self, dataset_id: str) -> Json:
        result: Json = self._json("GET", f"/datasets/{dataset_id}")
        return result

    def preview(self, dataset_id: str) -> Json:
        result: Json = self._json("GET", f"/datasets/{dataset_id}/preview")
        return result

    # ---- sessions

    def start(self, body: Json) -> Json:
        result: Json = self._json("POST", "/sessions", json=body)
        return result

    def sessions(self, limit: int = 100) -> list[Json]:
        result: list[Json] = self._json("GET", "/sessions", params={"limit": limit})
        return result

    def session(self, session_id: str) -> Json:
        result: Json = self._json("GET", f"/sessions/{session_id}")
        return result

    def cancel(self, session_id: str) -> Json:
        result: Json = self._json("POST", f"/sessions/{session_id}/cancel")
        return result

    def metrics(self, session_id: str) -> Json:
        result: Json = self._json("GET", f"/sessions/{session_id}/metrics")
        return result

    def events(self, session_id: str, after: int = 0) -> Iterator[tuple[int, Json]]:
        """Every stored event of the session, page by page: (stream sequence, event)."""
        while True:
            page = self._json("GET", f"/sessions/{session_id}/events", params={"after": after, "limit": 1000})
            for record in page["events"]:
                yield int(record["seq"]), record["event"]
            after = int(page["next_after"])
            if not page["more"]:
                return

    def download(self, session_id: str, dest: Path, progress: Progress | None = None) -> int:
        """Save the session's model to ``dest`` (written beside it, then renamed); returns its size."""
        tmp = dest.with_name(dest.name + ".part")
        try:
            with self.http.stream("GET", f"/sessions/{session_id}/model", timeout=httpx.Timeout(30.0, read=300.0)) as r:
                if r.status_code >= 400:
                    r.read()
                    raise _problem(r)
                total = int(r.headers.get("content-length") or 0)
                written = 0
                with tmp.open("wb") as f:
                    for block in r.iter_bytes(CHUNK):
                        f.write(block)
                        written += len(block)
                        if progress:
                            progress(written, total or written)
            os.replace(tmp, dest)
        except httpx.HTTPError as exc:
            raise ApiError(0, f"download failed: {exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return written

    def stream(self, session_id: str, after: int = 0, retries: int = 5) -> Iterator[tuple[int, Json]]:
        """The session's events, history first, then live, until the session ends (the server closes
        the stream then). A dropped connection resumes after the last event seen."""
        last, failures = after, 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last:
                headers["Last-Event-ID"] = str(last)
            try:
                with self.http.stream(
                    "GET", f"/sessions/{session_id}/stream", headers=headers, timeout=httpx.Timeout(30.0, read=60.0)
                ) as r:
                    if r.status_code >= 400:
                        r.read()
                        raise _problem(r)
                    seq, data = 0, ""
                    for line in r.iter_lines():
                        if line.startswith("id:"):
                            seq = int(line[3:].strip() or 0)
                        elif line.startswith("data:"):
                            data += line[5:].lstrip()
                        elif line == "" and data:
                            last, failures = max(last, seq), 0
                            event = json.loads(data)
                            yield seq, event
                            if event.get("type") in TERMINAL_EVENTS:
                                return
                            seq, data = 0, ""
                problem: Exception = ApiError(0, "the gateway closed the event stream")
            except (httpx.TransportError, httpx.StreamError) as exc:
                problem = exc
            failures += 1  # a gateway that restarts, or a dropped connection: resume where we were
            if failures > retries:
                raise ApiError(0, f"the event stream broke off: {problem}")
            time.sleep(min(5.0, 0.25 * 2**failures))


__all__ = ["DEFAULT_API", "ApiError", "Client", "Login", "config_path", "load_login", "save_login"]
