-- Failed logins per account ("user:<name>") and per address ("addr:<ip>"), in
-- fixed windows; shared by every node.
CREATE TABLE auth_failures (
    key          text PRIMARY KEY,
    window_start timestamptz NOT NULL,
    failures     integer NOT NULL
);
