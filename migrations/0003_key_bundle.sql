-- The client's key bundle: the user's master key wrapped by a key derived from
-- the password (client side). Opaque to the server; lets a new device log in.
ALTER TABLE users ADD COLUMN key_bundle bytea;
