-- The quota check sums a user's unfinished uploads on every declaration:
-- index only the open ones (committed rows stay a day for idempotent retries).
CREATE INDEX uploads_open_user ON uploads (user_id) WHERE state = 'open';
CREATE INDEX uploads_open_object ON uploads (object_id) WHERE state = 'open';
