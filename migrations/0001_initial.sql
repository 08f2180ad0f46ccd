-- Tessera schema, version 1: DESIGN.md's data model.
-- Names, times and keys of objects and partitions are client ciphertext.

CREATE TABLE users (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    username      text NOT NULL UNIQUE,
    password_hash text NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    quota         bigint NOT NULL CHECK (quota >= 0),
    used          bigint NOT NULL DEFAULT 0 CHECK (used >= 0),
    -- The per-user change counter: every change to an object the user can see
    -- takes seq = ++change_seq under this row's lock (gap-free feed).
    change_seq    bigint NOT NULL DEFAULT 0
);

CREATE TABLE devices (
    user_id    bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    id         text NOT NULL,
    name       text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL DEFAULT now(),
    last_seen  timestamptz NOT NULL DEFAULT now(),
    acked      bigint NOT NULL DEFAULT 0,
    revoked_at timestamptz,
    PRIMARY KEY (user_id, id)
);

CREATE TABLE refresh_tokens (
    hash       bytea PRIMARY KEY,           -- sha256 of the opaque token
    user_id    bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    device_id  text,
    family     uuid NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    spent_at   timestamptz,
    revoked_at timestamptz
);
CREATE INDEX refresh_tokens_family ON refresh_tokens (family);
CREATE INDEX refresh_tokens_user ON refresh_tokens (user_id);

CREATE TABLE objects (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    owner_id       bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    kind           text NOT NULL CHECK (kind IN ('file', 'dir')),
    rev            integer NOT NULL CHECK (rev >= 1),
    status         text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'deleted')),
    size           bigint NOT NULL DEFAULT 0 CHECK (size >= 0),
    enc_name       bytea NOT NULL,
    enc_mtime      bytea NOT NULL,
    enc_key        bytea NOT NULL,
    salt           bytea NOT NULL,
    head_partition bigint,
    origin         text,                    -- device that made the latest revision
    created_at     timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX objects_owner ON objects (owner_id, id);

-- Partition ids are taken from the sequence before the data is copied, so the
-- store key exists before the row does (see uploads commit).
CREATE SEQUENCE partitions_id_seq AS bigint;

CREATE TABLE partitions (
    id        bigint PRIMARY KEY,
    object_id bigint NOT NULL REFERENCES objects (id) ON DELETE CASCADE,
    rev       integer NOT NULL,
    idx       integer NOT NULL CHECK (idx >= 0),
    store_key text NOT NULL UNIQUE,
    size      integer NOT NULL CHECK (size > 0),
    sha256    bytea NOT NULL CHECK (length(sha256) = 32),
    salt      bytea NOT NULL,
    enc_key   bytea NOT NULL,
    next      bigint,                      -- the seed's linked list; idx makes order cheap
    UNIQUE (object_id, rev, idx)
);

-- The linking table and the change feed.
CREATE TABLE access_list (
    user_id    bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    object_id  bigint NOT NULL REFERENCES objects (id) ON DELETE CASCADE,
    role       text NOT NULL DEFAULT 'owner' CHECK (role IN ('owner', 'editor', 'viewer')),
    status     text NOT NULL CHECK (status IN ('active', 'deleted')),
    updated_at timestamptz NOT NULL DEFAULT now(),
    seq        bigint NOT NULL,
    PRIMARY KEY (user_id, object_id)
);
CREATE UNIQUE INDEX access_list_feed ON access_list (user_id, seq);

CREATE TABLE uploads (
    id             text PRIMARY KEY,
    user_id        bigint NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    device_id      text,
    object_id      bigint REFERENCES objects (id) ON DELETE CASCADE,
    base_rev       integer,
    kind           text NOT NULL CHECK (kind IN ('file', 'dir')),
    enc_name       bytea NOT NULL,
    enc_mtime      bytea NOT NULL,
    enc_key        bytea NOT NULL,
    salt           bytea NOT NULL,
    declared_parts integer NOT NULL,
    received_parts integer NOT NULL DEFAULT 0,
    size           bigint NOT NULL,
    state          text NOT NULL DEFAULT 'open' CHECK (state IN ('open', 'committed')),
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz NOT NULL,
    -- The outcome of the commit, so a retried commit gets the same answer.
    result_object  bigint,
    result_rev     integer,
    result_seq     bigint
);
CREATE INDEX uploads_user ON uploads (user_id);
CREATE INDEX uploads_expiry ON uploads (expires_at);

CREATE TABLE upload_parts (
    upload_id text NOT NULL REFERENCES uploads (id) ON DELETE CASCADE,
    idx       integer NOT NULL CHECK (idx >= 0),
    size      integer NOT NULL CHECK (size > 0),
    sha256    bytea NOT NULL,
    enc_key   bytea NOT NULL,
    salt      bytea NOT NULL,
    received  boolean NOT NULL DEFAULT false,
    PRIMARY KEY (upload_id, idx)
);

-- Store objects to delete once nobody can be downloading them any more
-- (partitions superseded by a new revision or a delete).
CREATE TABLE garbage (
    store_key    text PRIMARY KEY,
    delete_after timestamptz NOT NULL
);
CREATE INDEX garbage_due ON garbage (delete_after);
