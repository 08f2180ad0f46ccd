-- Live push: every access-list change announces (user, seq) on one channel.
-- The payload is a hint, never data: sessions always read the rows.

CREATE FUNCTION tessera_notify_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('tessera_changes', NEW.user_id::text || ':' || NEW.seq::text);
    RETURN NULL;
END
$$;

CREATE TRIGGER access_list_notify
    AFTER INSERT OR UPDATE OF seq ON access_list
    FOR EACH ROW EXECUTE FUNCTION tessera_notify_change();
