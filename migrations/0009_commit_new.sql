-- The commit of an upload that makes a new object (server/uploads.py
-- _commit_new), in one round trip where a transaction took seven: lock the
-- upload row, charge the quota, insert the object, its partitions and the
-- owner's access-list row (whose trigger notifies), close the upload.
--
-- outcome: 'committed' (this call wrote it), 'won' (another commit of the same
-- upload got there first: its result), 'aborted' (no upload row) or 'quota'
-- (the object no longer fits). The last two write nothing.
CREATE FUNCTION tessera_commit_new(
    p_upload text, p_user bigint, p_kind text, p_size bigint, p_name bytea, p_mtime bytea,
    p_key bytea, p_salt bytea, p_device text, p_ids bigint[], p_idx integer[],
    p_store_keys text[], p_sizes integer[], p_sha256 bytea[], p_part_salts bytea[],
    p_part_keys bytea[], p_ttl double precision)
RETURNS TABLE (outcome text, object_id bigint, rev integer, seq bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    st record;
    oid bigint;
    s bigint;
BEGIN
    SELECT u.state, u.result_object, u.result_rev, u.result_seq INTO st
    FROM uploads u WHERE u.id = p_upload FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'aborted'::text, NULL::bigint, NULL::integer, NULL::bigint;
        RETURN;
    END IF;
    IF st.state = 'committed' THEN
        RETURN QUERY SELECT 'won'::text, st.result_object, st.result_rev, st.result_seq;
        RETURN;
    END IF;
    -- The quota first, so a refusal has written nothing.
    UPDATE users u SET used = u.used + p_size
    WHERE u.id = p_user AND (p_size <= 0 OR u.used + p_size <= u.quota);
    IF NOT FOUND THEN
        RETURN QUERY SELECT 'quota'::text, NULL::bigint, NULL::integer, NULL::bigint;
        RETURN;
    END IF;
    INSERT INTO objects (owner_id, kind, rev, size, enc_name, enc_mtime, enc_key, salt,
                         head_partition, origin)
    VALUES (p_user, p_kind, 1, p_size, p_name, p_mtime, p_key, p_salt, p_ids[1], p_device)
    RETURNING objects.id INTO oid;
    INSERT INTO partitions (id, object_id, rev, idx, store_key, size, sha256, salt, enc_key,
                            next)
    SELECT t.id, oid, 1, t.idx, t.store_key, t.size, t.sha256, t.salt, t.enc_key, t.nxt
    FROM unnest(p_ids, p_idx, p_store_keys, p_sizes, p_sha256, p_part_salts, p_part_keys,
                array_append(p_ids[2:], NULL::bigint))
         AS t(id, idx, store_key, size, sha256, salt, enc_key, nxt)
    WHERE t.id IS NOT NULL;
    WITH next AS (
        UPDATE users u SET change_seq = u.change_seq + 1 WHERE u.id = p_user
        RETURNING u.change_seq)
    INSERT INTO access_list (user_id, object_id, role, status, seq)
    SELECT p_user, oid, 'owner', 'active', next.change_seq FROM next
    RETURNING access_list.seq INTO s;
    UPDATE uploads u SET state = 'committed', result_object = oid, result_rev = 1,
           result_seq = s, expires_at = now() + make_interval(secs => p_ttl)
    WHERE u.id = p_upload;
    DELETE FROM upload_parts p WHERE p.upload_id = p_upload;
    RETURN QUERY SELECT 'committed'::text, oid, 1, s;
END
$$;
