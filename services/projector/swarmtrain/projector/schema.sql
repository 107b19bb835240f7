-- Read models. Written only by the projector; a schema change is a rebuild, not a migration.
CREATE TABLE IF NOT EXISTS projection_position (
    name      text PRIMARY KEY,
    position  bigint NOT NULL
);

CREATE TABLE IF NOT EXISTS users (
    user_id        text PRIMARY KEY,
    email          text NOT NULL UNIQUE,
    username       text NOT NULL,
    password_hash  text NOT NULL,
    created_at     timestamptz NOT NULL
);

CREATE TABLE IF NOT EXISTS datasets (
    dataset_id    text PRIMARY KEY,
    owner_id      text NOT NULL,
    name          text NOT NULL,
    uri           text NOT NULL,
    sha256        text NOT NULL,
    size_bytes    bigint NOT NULL,
    rows          integer NOT NULL,
    features      integer NOT NULL,
    classes       integer NOT NULL,
    label_column  text NOT NULL,
    created_at    timestamptz NOT NULL,
    format        text NOT NULL DEFAULT 'csv',      -- events.DataFormat
    shape         jsonb NOT NULL DEFAULT '[]',       -- one row's feature shape; []: an event from before shapes
    class_counts  jsonb NOT NULL DEFAULT '{}',       -- rows per class (empty: too many to show, or an older event)
    tokens        bigint NOT NULL DEFAULT 0,         -- text: the corpus's tokens
    tokenizer     jsonb,                             -- text: events.TokenizerSpec; NULL: not text
    target        text NOT NULL DEFAULT 'classification', -- events.Task the label is for
    target_range  jsonb NOT NULL DEFAULT '[]'        -- regression: [min, max] of the target
);
CREATE INDEX IF NOT EXISTS datasets_owner ON datasets (owner_id, created_at);

CREATE TABLE IF NOT EXISTS peers (
    peer_id     text PRIMARY KEY,
    name        text NOT NULL,
    device      text NOT NULL,
    online      boolean NOT NULL DEFAULT false,
    session_id  text,
    last_seen   timestamptz NOT NULL,
    specs       jsonb                      -- PeerSpecs of its latest registration; NULL: a peer older than specs
);

CREATE TABLE IF NOT EXISTS sessions (
    session_id        text PRIMARY KEY,
    owner_id          text NOT NULL,
    dataset_id        text NOT NULL,
    strategy          text NOT NULL,
    num_peers         integer NOT NULL,
    status            text NOT NULL,
    model             jsonb NOT NULL,
    validation_split  double precision NOT NULL,
    seed              bigint NOT NULL,
    rounds            integer NOT NULL DEFAULT 1,
    on_peer_failure   text NOT NULL DEFAULT 'reassign',
    val_accuracy      double precision,         -- the session model's accuracy on the validation split
    created_at        timestamptz NOT NULL,
    started_at        timestamptz,
    ended_at          timestamptz,
    best_peer_id      text,
    best_val_accuracy double precision,
    model_uri         text,
    reason            text,
    parent_session_id text,                     -- lineage (init_from / fork): the parent session ...
    parent_round      integer,                  -- ... and its round (NULL: its final model)
    excluded_peers    jsonb NOT NULL DEFAULT '[]'::jsonb,  -- a fork's peers left out
    requirements      jsonb,                    -- Requirements; NULL: any peer
    queue             boolean NOT NULL DEFAULT false,
    queue_timeout_s   double precision,
    priority          integer NOT NULL DEFAULT 0,
    precision         text NOT NULL DEFAULT 'fp32',
    requested_seq     bigint NOT NULL DEFAULT 0, -- stream sequence of SessionRequested: queue order within a priority
    placement         text,                     -- SessionStarted's reason for its peers
    round_options     jsonb,                    -- fedopts.RoundOptionsSpec of the request
    search            jsonb,                    -- a search's SearchSpec; NULL: a sweep of one set per peer
    search_result     jsonb,                    -- its SearchConcluded (importances, the best trial)
    task              text NOT NULL DEFAULT 'classification', -- events.Task (the request's data.task)
    validation_dataset_id text                  -- the user's own validation set; NULL: validation_split
);
CREATE INDEX IF NOT EXISTS sessions_owner ON sessions (owner_id, created_at);
CREATE INDEX IF NOT EXISTS sessions_queue ON sessions (priority, requested_seq) WHERE status = 'queued';

CREATE TABLE IF NOT EXISTS session_peers (
    session_id       text NOT NULL,
    peer_id          text NOT NULL,
    status           text NOT NULL,          -- training, done, failed, stopped
    hyperparameters  jsonb NOT NULL,
    shard            integer,                  -- fedavg: the shard this peer trains
    epoch            integer NOT NULL DEFAULT 0,
    epochs           integer NOT NULL,
    loss             double precision,
    accuracy         double precision,
    val_loss         double precision,
    val_accuracy     double precision,
    samples_per_s    double precision,
    model_uri        text,
    model_sha256     text,
    reason           text,
    precision        text,                     -- what its latest heartbeat says it computed in
    PRIMARY KEY (session_id, peer_id)
);

CREATE TABLE IF NOT EXISTS heartbeats (
    seq            bigint PRIMARY KEY,       -- the event's stream sequence
    session_id     text NOT NULL,
    peer_id        text NOT NULL,
    epoch          integer NOT NULL,
    loss           double precision NOT NULL,
    accuracy       double precision NOT NULL,
    val_loss       double precision,
    val_accuracy   double precision,
    samples_per_s  double precision NOT NULL,
    occurred_at    timestamptz NOT NULL
);
-- one row per run and epoch: a beat stored again (a copy past the dedupe window, a peer that
-- re-sends) adds nothing
CREATE UNIQUE INDEX IF NOT EXISTS heartbeats_epoch ON heartbeats (session_id, peer_id, epoch);

-- fedavg: one row per closed round, and every update published for a round.
CREATE TABLE IF NOT EXISTS session_rounds (
    session_id      text NOT NULL,
    round           integer NOT NULL,
    closed_at       timestamptz NOT NULL,
    included        jsonb NOT NULL,          -- peer ids whose updates make the average
    left_out        jsonb NOT NULL,          -- participants awaited in vain
    rejected        jsonb NOT NULL DEFAULT '[]',  -- [{peer_id, reason}]
    num_samples     bigint NOT NULL,
    loss            double precision,        -- sample-weighted mean of the included updates' training loss
    accuracy        double precision,
    val_loss        double precision,        -- the averaged model on the validation split
    val_accuracy    double precision,
    average_uri     text,
    average_sha256  text,
    aggregator      text,                    -- the rule the peers applied (RoundAveraged)
    selected        jsonb,                   -- the peers whose updates the aggregate holds
    update_bytes    bigint,                  -- the bytes of the round's updates
    PRIMARY KEY (session_id, round)
);

CREATE TABLE IF NOT EXISTS round_updates (
    session_id   text NOT NULL,
    round        integer NOT NULL,
    peer_id      text NOT NULL,
    uri          text NOT NULL,
    sha256       text NOT NULL,
    num_samples  integer NOT NULL,
    loss         double precision NOT NULL,
    accuracy     double precision NOT NULL,
    occurred_at  timestamptz NOT NULL,
    PRIMARY KEY (session_id, round, peer_id)
);

-- Bookkeeping, beside the stream position and in the same transactions.
-- Every event id applied: a copy of an event stored again (after JetStream's two-minute dedupe
-- window) has a new stream sequence but the same id, and changes nothing.
CREATE TABLE IF NOT EXISTS applied_events (
    event_id  text PRIMARY KEY,
    seq       bigint NOT NULL              -- the stream sequence it was applied at
);

-- Events the projector could not apply (undecodable, or refused by PostgreSQL): parked here with
-- their error and raw bytes, and skipped; `swarmtrain deadletters retry` applies them again.
CREATE TABLE IF NOT EXISTS dead_letters (
    seq         bigint PRIMARY KEY,        -- the event's stream sequence
    subject     text NOT NULL,
    event_id    text,                      -- when it could be read
    type        text,
    error       text NOT NULL,
    data        bytea NOT NULL,            -- the message as stored in the stream
    first_seen  timestamptz NOT NULL DEFAULT now(),
    last_tried  timestamptz NOT NULL DEFAULT now(),
    attempts    integer NOT NULL DEFAULT 1
);

CREATE TABLE IF NOT EXISTS session_trials (
    session_id       text NOT NULL,
    trial            integer NOT NULL,
    attempt          integer NOT NULL,
    peer_id          text NOT NULL,
    status           text NOT NULL,            -- running, done, pruned, failed (its run did: it runs again)
    params           jsonb NOT NULL,
    hyperparameters  jsonb NOT NULL,
    model            jsonb NOT NULL,
    epoch            integer NOT NULL DEFAULT 0,
    epochs           integer NOT NULL,
    value            double precision,         -- the search's metric: its latest heartbeat's, then its PeerDone's
    curve            jsonb NOT NULL DEFAULT '[]'::jsonb,  -- [[epoch, value], ...] as its heartbeats reported them
    rung             integer,                  -- pruned: the epoch it was stopped at
    reason           text,
    started_at       timestamptz NOT NULL,
    ended_at         timestamptz,
    train_seconds    double precision,
    PRIMARY KEY (session_id, trial)
);
