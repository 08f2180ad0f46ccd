-- Access tokens issued before a password change are refused for every device
-- but the one that changed it (issue time vs password_changed_at).
ALTER TABLE users ADD COLUMN password_changed_at timestamptz;
ALTER TABLE users ADD COLUMN password_changed_by text;
