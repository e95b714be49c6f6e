-- Device keys at NATS (issue 11, item 4): the JetStream ingest path admits devices by NATS's
-- own users and permissions, and nats-server reads a password in clear or as bcrypt, not as
-- the PBKDF2 `$7$` hash Mosquitto reads (migration 0009). Registration and rotation store a
-- bcrypt hash of the key beside it, in the same row and transaction (metering/registry.py).
--
-- In device_credentials, not devices: the reason 0009 gave (ingest's HOT updates of devices)
-- holds for this column too. Nullable: the key is never stored, so a device registered before
-- this migration has no bcrypt hash until its key is rotated; until then it connects to
-- Mosquitto only, and the NATS sync counts it (ingest/nats_auth.py).
ALTER TABLE device_credentials
    ADD COLUMN nats_hash text
        CHECK (nats_hash ~ '^\$2[ab]\$[0-9]{2}\$[./A-Za-z0-9]{53}$');

-- A bcrypt hash must never outlive the key it was made from. A writer that replaces the
-- Mosquitto hash without giving a new bcrypt one (a release before this migration, still
-- running during an upgrade, rotating a key) would otherwise leave the old key valid at NATS:
-- the row then has no bcrypt hash, and the device is refused at NATS until its next rotation.
CREATE FUNCTION devmeter_drop_stale_nats_hash() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.broker_hash IS DISTINCT FROM OLD.broker_hash
       AND NEW.nats_hash IS NOT DISTINCT FROM OLD.nats_hash THEN
        NEW.nats_hash := NULL;
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER device_credentials_nats_hash_current BEFORE UPDATE ON device_credentials
    FOR EACH ROW EXECUTE FUNCTION devmeter_drop_stale_nats_hash();

-- What NATS needs to admit devices, one row per device user (named as the MQTT identity,
-- `<account>/<device>`). `password_hash` is NULL for a device without a bcrypt hash yet: the
-- sync leaves it out of nats-server's users and counts it. Writes to device_credentials wake
-- the sync on the same channel as Mosquitto's (trigger device_credentials_changed, 0009).
CREATE VIEW nats_device_credentials AS
SELECT a.ref || '/' || d.id AS username,
       c.nats_hash AS password_hash,
       a.ref AS account_ref,
       d.id AS device_id,
       d.device_class = 'gateway' AS is_gateway,
       c.written_xact
FROM device_credentials c
JOIN devices d ON d.account_id = c.account_id AND d.id = c.device_id
JOIN accounts a ON a.id = d.account_id;
