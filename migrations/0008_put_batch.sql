-- New objects of one-part puts, several users' at once (server/uploads.py
-- _put_batch), in one round trip. A function, because its two statements each
-- take their own snapshot (READ COMMITTED): the users rows are locked first, in
-- id order (as record_change locks them: no deadlock with a commit to a shared
-- object), and the put statement then sees every upload reservation committed
-- while it waited for those locks. In one statement the quota check read the
-- reservations as of before the wait.
--
-- At most one put per user and per upload id (each users row is updated once).
-- Puts whose id is taken or whose quota is short are left out of the result.

-- The bytes reserved against user u's quota: its own unfinished uploads of new
-- objects or of its objects, plus others' unfinished uploads to its (shared)
-- objects. Two indexed lookups rather than a scan of every upload row. One
-- definition for the declaration's check and the put's.
CREATE FUNCTION tessera_reserved(u bigint) RETURNS numeric
LANGUAGE sql STABLE AS $$
SELECT coalesce((SELECT sum(p.size) FROM uploads p
                 LEFT JOIN objects o ON o.id = p.object_id
                 WHERE p.user_id = u AND p.state = 'open' AND p.expires_at > now()
                   AND (p.object_id IS NULL OR o.owner_id = u)), 0)
     + coalesce((SELECT sum(p.size) FROM objects o
                 JOIN uploads p ON p.object_id = o.id AND p.state = 'open'
                 WHERE o.owner_id = u AND p.user_id <> u AND p.expires_at > now()), 0)
$$;

CREATE FUNCTION tessera_put_batch(
    p_user bigint[], p_upload text[], p_size bigint[], p_name bytea[], p_mtime bytea[],
    p_key bytea[], p_salt bytea[], p_pid bigint[], p_device text[], p_store_key text[],
    p_sha256 bytea[], p_part_salt bytea[], p_part_key bytea[], p_ttl double precision)
RETURNS TABLE (pid bigint, object_id bigint, change_seq bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
BEGIN
    PERFORM 1 FROM users WHERE id = ANY(p_user) ORDER BY id FOR NO KEY UPDATE;
    RETURN QUERY
    WITH i AS (
        SELECT * FROM unnest(p_user, p_upload, p_size, p_name, p_mtime, p_key, p_salt,
                             p_pid, p_device, p_store_key, p_sha256, p_part_salt,
                             p_part_key)
            AS i(user_id, upload, size, name, mtime, key, salt, pid, device, store_key,
                 sha256, part_salt, part_key)
        WHERE NOT EXISTS (SELECT 1 FROM uploads WHERE uploads.id = i.upload)),
    seq AS (
        UPDATE users u SET used = u.used + i.size, change_seq = u.change_seq + 1
        FROM i
        WHERE u.id = i.user_id AND u.used + tessera_reserved(u.id) + i.size <= u.quota
        RETURNING u.id AS user_id, u.change_seq AS seq),
    ok AS (SELECT i.*, seq.seq FROM i JOIN seq ON seq.user_id = i.user_id),
    obj AS (
        INSERT INTO objects (owner_id, kind, rev, size, enc_name, enc_mtime, enc_key, salt,
                             head_partition, origin)
        SELECT ok.user_id, 'file', 1, ok.size, ok.name, ok.mtime, ok.key, ok.salt, ok.pid,
               ok.device
        FROM ok
        RETURNING objects.id AS oid, objects.head_partition AS head),
    made AS (SELECT ok.*, obj.oid FROM ok JOIN obj ON obj.head = ok.pid),
    part AS (
        INSERT INTO partitions (id, object_id, rev, idx, store_key, size, sha256, salt, enc_key)
        SELECT made.pid, made.oid, 1, 0, made.store_key, made.size, made.sha256,
               made.part_salt, made.part_key
        FROM made),
    feed AS (
        INSERT INTO access_list (user_id, object_id, role, status, seq)
        SELECT made.user_id, made.oid, 'owner', 'active', made.seq FROM made),
    done AS (
        INSERT INTO uploads (id, user_id, device_id, kind, enc_name, enc_mtime, enc_key, salt,
                             declared_parts, size, state, expires_at,
                             result_object, result_rev, result_seq)
        SELECT made.upload, made.user_id, made.device, 'file', '', '', '', '', 1, made.size,
               'committed', now() + make_interval(secs => p_ttl), made.oid, 1, made.seq
        FROM made)
    SELECT made.pid, made.oid, made.seq FROM made;
END
$$;
