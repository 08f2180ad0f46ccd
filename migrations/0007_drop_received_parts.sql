-- uploads.received_parts was counted on every stored part and never read:
-- upload_parts.received is the truth. One statement less per part.
ALTER TABLE uploads DROP COLUMN received_parts;
