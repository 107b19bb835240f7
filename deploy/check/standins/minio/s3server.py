"""The `minio` stand-in of `make compose-check`: moto's S3, behind a check of every request's signature.

moto alone accepts any signature, so a wrongly presigned URL would pass; here every request must be
signed (AWS Signature V4, in the Authorization header or a presigned URL's query) with the
MINIO_ROOT_USER / MINIO_ROOT_PASSWORD pair, and a presigned URL must not have expired; a signed
payload hash must match the body. Anything else gets a 403, as MinIO answers. Listens on :9000,
MinIO's port; /minio/health/live answers without a signature, as MinIO's does.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import io
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote, unquote

from moto.server import create_backend_app
from werkzeug.serving import run_simple

ACCESS_KEY = os.environ["MINIO_ROOT_USER"]
SECRET_KEY = os.environ["MINIO_ROOT_PASSWORD"]
UNSIGNED = "UNSIGNED-PAYLOAD"

Environ = dict[str, Any]
StartResponse = Callable[..., Any]


class Refused(Exception):
    pass


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def _pairs(query: str) -> list[tuple[str, str]]:
    out = []
    for part in query.split("&") if query else []:
        key, _, value = part.partition("=")
        out.append((unquote(key.replace("+", "%20")), unquote(value.replace("+", "%20"))))
    return out


def _canonical_query(pairs: Iterable[tuple[str, str]]) -> str:
    enc = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in pairs)
    return "&".join(f"{k}={v}" for k, v in enc)


def _header(environ: Environ, name: str) -> str:
    if name == "host":
        return str(environ.get("HTTP_HOST", ""))
    if name == "content-type":
        return str(environ.get("CONTENT_TYPE", ""))
    if name == "content-length":
        return str(environ.get("CONTENT_LENGTH", ""))
    return str(environ.get("HTTP_" + name.upper().replace("-", "_"), ""))


def verify(environ: Environ) -> None:
    """Raise Refused unless the request is signed (SigV4) with the root credentials."""
    raw = str(environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ.get("PATH_INFO", "/"))
    path, _, query = raw.partition("?")
    pairs = _pairs(query)
    params = dict(pairs)
    auth = _header(environ, "authorization")
    if auth:
        if not auth.startswith("AWS4-HMAC-SHA256 "):
            raise Refused("only AWS Signature V4 is accepted")
        fields = dict(p.strip().split("=", 1) for p in auth[len("AWS4-HMAC-SHA256 ") :].split(","))
        credential, signed, signature = fields["Credential"], fields["SignedHeaders"], fields["Signature"]
        amz_date = _header(environ, "x-amz-date")
        payload = _header(environ, "x-amz-content-sha256") or UNSIGNED
        canonical_pairs = pairs
    elif "X-Amz-Signature" in params:
        credential, signed = params["X-Amz-Credential"], params["X-Amz-SignedHeaders"]
        signature = params["X-Amz-Signature"]
        amz_date = params["X-Amz-Date"]
        start = dt.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
        if dt.datetime.now(dt.UTC) > start + dt.timedelta(seconds=int(params.get("X-Amz-Expires", "0"))):
            raise Refused("presigned URL expired")
        payload = UNSIGNED
        canonical_pairs = [(k, v) for k, v in pairs if k != "X-Amz-Signature"]
    else:
        raise Refused("unsigned request")
    access_key, date, region, service, terminal = credential.split("/")
    if access_key != ACCESS_KEY:
        raise Refused(f"unknown access key {access_key}")
    names = signed.split(";")
    headers = "".join(f"{n}:{' '.join(_header(environ, n).split())}\n" for n in names)
    method = str(environ["REQUEST_METHOD"])
    canonical = "\n".join([method, path, _canonical_query(canonical_pairs), headers, signed, payload])
    scope = f"{date}/{region}/{service}/{terminal}"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(("AWS4" + SECRET_KEY).encode(), date), region), service), terminal)
    if not hmac.compare_digest(hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest(), signature):
        raise Refused("SignatureDoesNotMatch")
    if payload not in (UNSIGNED,) and not payload.startswith("STREAMING-"):
        body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        if hashlib.sha256(body).hexdigest() != payload:
            raise Refused("XAmzContentSHA256Mismatch")
        environ["wsgi.input"] = io.BytesIO(body)


App = Callable[[Environ, StartResponse], Iterable[bytes]]


def checked(app: App) -> App:
    def wsgi(environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "").startswith("/minio/health/"):
            start_response("200 OK", [("Content-Length", "0")])
            return [b""]
        try:
            verify(environ)
        except (Refused, KeyError, ValueError) as exc:
            what = f"{environ['REQUEST_METHOD']} {environ.get('PATH_INFO')}"
            print(f"refused {what}: {exc!r}", file=sys.stderr, flush=True)
            body = f"<Error><Code>AccessDenied</Code><Message>{exc}</Message></Error>".encode()
            start_response("403 Forbidden", [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
            return [body]
        return app(environ, start_response)

    return wsgi


if __name__ == "__main__":
    os.environ.setdefault("S3_IGNORE_SUBDOMAIN_BUCKETNAME", "true")
    run_simple("0.0.0.0", int(os.environ.get("S3_PORT", "9000")), checked(create_backend_app("s3")), threaded=True)
