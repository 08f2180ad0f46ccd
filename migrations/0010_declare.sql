-- A declaration (server/uploads.py Uploads.create) in one round trip where a
-- transaction took five. A function for the reason tessera_put_batch is one:
-- the payer's row is locked first, and the checks then take a snapshot of
-- their own, which sees every reservation committed while the lock was awaited.
--
-- outcome: 'declared' (the upload and its parts are inserted), or the first
-- limit it hits, with nothing written: 'open_uploads' (too many unfinished
-- uploads), 'staged_bytes' (they would hold too many bytes) or 'quota'. The
-- other columns are the figures the limits were judged on. A taken upload id
-- raises unique_violation.
CREATE FUNCTION tessera_declare(
    p_id text, p_user bigint, p_payer bigint, p_device text, p_object bigint, p_base integer,
    p_kind text, p_name bytea, p_mtime bytea, p_key bytea, p_salt bytea, p_size bigint,
    p_ttl double precision, p_sizes integer[], p_sha256 bytea[], p_part_keys bytea[],
    p_part_salts bytea[], p_replaced bigint, p_max_open bigint, p_max_staged bigint)
RETURNS TABLE (outcome text, n bigint, bytes numeric, quota bigint, used bigint,
               reserved numeric)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    a record;
    verdict text;
BEGIN
    PERFORM 1 FROM users u WHERE u.id = p_payer FOR NO KEY UPDATE;
    SELECT mine.n, mine.bytes, u.quota, u.used, tessera_reserved(u.id) AS reserved INTO a
    FROM users u,
         LATERAL (SELECT count(*) AS n, coalesce(sum(o.size), 0) AS bytes
                  FROM uploads o
                  WHERE o.user_id = p_user AND o.state = 'open' AND o.expires_at > now()) mine
    WHERE u.id = p_payer;
    IF a.n >= p_max_open THEN
        verdict := 'open_uploads';
    ELSIF a.bytes + p_size > p_max_staged THEN
        verdict := 'staged_bytes';
    ELSIF a.used + a.reserved - p_replaced + p_size > a.quota THEN
        verdict := 'quota';
    ELSE
        WITH up AS (
            INSERT INTO uploads (id, user_id, device_id, object_id, base_rev, kind, enc_name,
                                 enc_mtime, enc_key, salt, declared_parts, size, expires_at)
            VALUES (p_id, p_user, p_device, p_object, p_base, p_kind, p_name, p_mtime, p_key,
                    p_salt, cardinality(p_sizes), p_size, now() + make_interval(secs => p_ttl))
            RETURNING uploads.id)
        INSERT INTO upload_parts (upload_id, idx, size, sha256, enc_key, salt)
        SELECT up.id, t.i - 1, t.size, t.sha, t.key, t.salt
        FROM up, unnest(p_sizes, p_sha256, p_part_keys, p_part_salts)
                 WITH ORDINALITY AS t(size, sha, key, salt, i);
        verdict := 'declared';
    END IF;
    RETURN QUERY SELECT verdict, a.n, a.bytes, a.quota, a.used, a.reserved;
END
$$;
