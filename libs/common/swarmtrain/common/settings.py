"""Typed settings read from the environment once, through a cached getter."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import msgspec


def _state_dir() -> str:
    return str(Path(os.environ.get("XDG_STATE_HOME", Path.home() / ".local" / "state")) / "swarmtrain")


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    nats_url: str = "nats://127.0.0.1:4222"
    """NATS server URL(s), comma separated (SWARMTRAIN_NATS_URL)."""
    nats_user: str | None = None
    """NATS user name, if the server requires one (SWARMTRAIN_NATS_USER)."""
    nats_password: str | None = None
    """NATS password (SWARMTRAIN_NATS_PASSWORD)."""
    nats_nkey_seed: str | None = None
    """NATS nkey seed (SU...) this process authenticates with (SWARMTRAIN_NATS_NKEY_SEED); made by
    ``swarmtrain nats-config``."""
    nats_inbox_prefix: str = "_INBOX"
    """Prefix of this process's reply subjects (SWARMTRAIN_NATS_INBOX_PREFIX); with generated
    credentials ``_INBOX.<identity>``, the only inbox its NATS user may subscribe to."""
    peer_id: str | None = None
    """A peer's id, fixed by its NATS credential (SWARMTRAIN_PEER_ID); unset, a peer keeps one per
    name in its state folder."""
    database_url: str = "postgresql://postgres@127.0.0.1:5432/swarmtrain"
    """PostgreSQL DSN for the read models (SWARMTRAIN_DATABASE_URL)."""
    blob_url: str = "file://" + str(Path(_state_dir()) / "blobs")
    """Where datasets and models live: file:///path or s3://bucket[/prefix] (SWARMTRAIN_BLOB_URL)."""
    s3_endpoint: str = "127.0.0.1:9000"
    """S3/MinIO endpoint host:port (SWARMTRAIN_S3_ENDPOINT)."""
    s3_access_key: str | None = None
    """S3 access key (SWARMTRAIN_S3_ACCESS_KEY)."""
    s3_secret_key: str | None = None
    """S3 secret key (SWARMTRAIN_S3_SECRET_KEY)."""
    s3_secure: bool = False
    """Use HTTPS for S3 (SWARMTRAIN_S3_SECURE)."""
    s3_region: str | None = None
    """S3 region (SWARMTRAIN_S3_REGION)."""
    blob_max_download_mb: int = 1024
    """Largest object any process reads from the blob store or a signed URL, in MiB; a bigger or
    endless one is refused without filling the disk (SWARMTRAIN_BLOB_MAX_DOWNLOAD_MB)."""
    blob_signing_secret: str | None = None
    """HMAC secret of the object-scoped URLs the gateway serves at /blobs for a file:// store; the
    signer (scheduler) and the gateway share it (SWARMTRAIN_BLOB_SIGNING_SECRET)."""
    blob_public_url: str | None = None
    """Base URL at which peers reach the gateway's /blobs routes; unset, http://<host>:<port>
    (SWARMTRAIN_BLOB_PUBLIC_URL)."""
    blob_url_ttl_s: int = 86400
    """Lifetime of a signed or presigned blob URL handed to a peer, in seconds (SWARMTRAIN_BLOB_URL_TTL_S)."""
    transfer_retry_s: float = 30.0
    """How long a peer tries a failed transfer again, with backoff, before it gives up (at least a
    supervised restart of the gateway or the object store; never past the URL's expiry), in seconds
    (SWARMTRAIN_TRANSFER_RETRY_S)."""
    jwt_secret: str | None = None
    """HMAC secret for access tokens (SWARMTRAIN_JWT_SECRET); required by the gateway."""
    token_ttl_s: int = 3600
    """Access-token lifetime in seconds (SWARMTRAIN_TOKEN_TTL_S)."""
    host: str = "127.0.0.1"
    """Gateway bind address (SWARMTRAIN_HOST)."""
    port: int = 8000
    """Gateway port (SWARMTRAIN_PORT)."""
    max_upload_mb: int = 200
    """Largest dataset upload accepted, in MiB (SWARMTRAIN_MAX_UPLOAD_MB)."""
    max_uncompressed_mb: int = 2048
    """Most an uploaded archive (an .npz, a zip or tar of images) may hold uncompressed, in MiB:
    its members' declared sizes together, and what is read of them (SWARMTRAIN_MAX_UNCOMPRESSED_MB);
    a zip bomb is a 400."""
    max_archive_members: int = 100_000
    """Most members an uploaded archive may hold (SWARMTRAIN_MAX_ARCHIVE_MEMBERS)."""
    max_image_pixels: int = 16_777_216
    """Most pixels one uploaded image may have, read from its header before its pixels are
    decoded (SWARMTRAIN_MAX_IMAGE_PIXELS)."""
    jwt_issuer: str = "swarmtrain"
    """``iss`` of the access tokens the gateway issues, and the only one it accepts (SWARMTRAIN_JWT_ISSUER)."""
    jwt_audience: str = "swarmtrain-api"
    """``aud`` of the access tokens the gateway issues, and the only one it accepts (SWARMTRAIN_JWT_AUDIENCE)."""
    argon2_time_cost: int = 3
    """argon2id passes per password hash (SWARMTRAIN_ARGON2_TIME_COST); the default and
    ``argon2_memory_kib`` are RFC 9106's second recommended option."""
    argon2_memory_kib: int = 65536
    """argon2id memory per password hash, in KiB (SWARMTRAIN_ARGON2_MEMORY_KIB)."""
    signin_max_failures: int = 5
    """Failed sign-ins for one email within ``signin_window_s`` before the gateway answers 429
    (SWARMTRAIN_SIGNIN_MAX_FAILURES); counted in memory, per gateway process."""
    signin_max_failures_per_address: int = 20
    """Failed sign-ins from one client address within ``signin_window_s`` before 429
    (SWARMTRAIN_SIGNIN_MAX_FAILURES_PER_ADDRESS)."""
    signin_window_s: float = 300.0
    """The sliding window of the sign-in throttle, in seconds (SWARMTRAIN_SIGNIN_WINDOW_S)."""
    max_num_peers: int = 256
    """Most peers one session may ask for (SWARMTRAIN_MAX_NUM_PEERS)."""
    max_epochs: int = 1000
    """Most epochs one peer may train in a session; for fedavg, local epochs x rounds (SWARMTRAIN_MAX_EPOCHS)."""
    max_rounds: int = 500
    """Most fedavg rounds in a session (SWARMTRAIN_MAX_ROUNDS)."""
    max_model_params: int = 200_000_000
    """Most trainable parameters a requested model may have (SWARMTRAIN_MAX_MODEL_PARAMS); a model
    must also fit the memory of an online peer (its GPU's, or its host's), from the contract's costs."""
    max_active_sessions: int = 5
    """Most queued or running sessions one user may have at once; more is 429 (SWARMTRAIN_MAX_ACTIVE_SESSIONS)."""
    max_streams_per_user: int = 8
    """Most live event streams (SSE) one user may hold open on one gateway (SWARMTRAIN_MAX_STREAMS_PER_USER)."""
    presence_interval_s: float = 1.0
    """How often a peer beats presence (SWARMTRAIN_PRESENCE_INTERVAL_S)."""
    peer_timeout_s: float = 6.0
    """Silence after which the scheduler marks a peer offline (SWARMTRAIN_PEER_TIMEOUT_S)."""
    round_timeout_s: float = 600.0
    """fedavg: a round's deadline before any round time is known (SWARMTRAIN_ROUND_TIMEOUT_S)."""
    round_factor: float = 3.0
    """fedavg: later deadlines are this x the longest round seen (SWARMTRAIN_ROUND_FACTOR)."""
    round_min_s: float = 10.0
    """fedavg: the shortest adaptive round deadline (SWARMTRAIN_ROUND_MIN_S)."""
    stream_replicas: int = 1
    """Copies JetStream keeps of each stream (SWARMTRAIN_STREAM_REPLICAS): 1 on one NATS server, 3 on a
    three-node cluster (``swarmtrain nats-config --cluster 3``), which then survives the loss of a node."""
    restart_limit: int = 5
    """``swarmtrain up``: most restarts of one process within ``restart_window_s`` before the stack
    gives up (SWARMTRAIN_RESTART_LIMIT)."""
    restart_window_s: float = 60.0
    """``swarmtrain up``: the sliding window of the restart budget, in seconds (SWARMTRAIN_RESTART_WINDOW_S)."""
    state_dir: str = msgspec.field(default_factory=_state_dir)
    """Where a peer keeps its stable id (SWARMTRAIN_STATE_DIR)."""
    torch_threads: int = 0
    """Torch intra-op threads per peer; 0 = torch's default (SWARMTRAIN_TORCH_THREADS)."""
    log_level: str = "info"
    """debug, info, warning or error (SWARMTRAIN_LOG_LEVEL)."""
    log_format: str = "auto"
    """auto (console on a terminal, JSON otherwise), console or json (SWARMTRAIN_LOG_FORMAT)."""
    metrics_port: int = 0
    """Port on which the projector, scheduler or a peer serves Prometheus metrics at /metrics; 0 = off
    (SWARMTRAIN_METRICS_PORT). The gateway serves its own at GET /metrics/prometheus."""
    metrics_host: str = "0.0.0.0"
    """Address the ``metrics_port`` server listens on (SWARMTRAIN_METRICS_HOST); ``swarmtrain up``
    keeps its processes' on loopback."""


PREFIX = "SWARMTRAIN_"


def from_env(environ: dict[str, str] | None = None) -> Settings:
    """Each setting from ``SWARMTRAIN_<NAME>``, or read from the file named by ``SWARMTRAIN_<NAME>_FILE``
    (for secrets: docker secrets, mounted files); the variable itself wins over the file."""
    env = os.environ if environ is None else environ
    raw: dict[str, str] = {}
    for name in Settings.__struct_fields__:
        key = PREFIX + name.upper()
        if env.get(key, "") != "":
            raw[name] = env[key]
        elif env.get(key + "_FILE", "") != "":
            try:
                raw[name] = Path(env[key + "_FILE"]).read_text().strip()
            except OSError as exc:
                raise SystemExit(f"{key}_FILE: cannot read {env[key + '_FILE']}: {exc.strerror}") from None
    try:
        return msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        raise SystemExit(f"invalid setting: {exc} (environment variables start with {PREFIX})") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return from_env()
