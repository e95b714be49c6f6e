-- Tenant-scoped device identity (D1a) and device credentials at the broker.
--
-- A device id is unique within its account: two accounts may both have `pump-1`, and
-- nothing one account does reveals the other's ids (a registration never collides across
-- accounts). Everything that names a device therefore names its account too; the MQTT
-- identity and topic carry the account ref (docs/protocol.md, v2).

ALTER TABLE devices DROP CONSTRAINT devices_gateway_id_fkey;
ALTER TABLE devices DROP CONSTRAINT devices_pkey;
ALTER TABLE devices ADD CONSTRAINT devices_pkey PRIMARY KEY (account_id, id);
-- The primary key now starts with the account: the old (account_id, id) index is a copy.
DROP INDEX devices_account;
-- A gateway is bound only within its own account.
ALTER TABLE devices ADD CONSTRAINT devices_gateway_fkey
    FOREIGN KEY (account_id, gateway_id) REFERENCES devices (account_id, id);
DROP INDEX devices_gateway;
CREATE INDEX devices_gateway ON devices (account_id, gateway_id) WHERE gateway_id IS NOT NULL;

-- The device key in the form Mosquitto's password_file reads (`$7$<iterations>$<salt>$<hash>`,
-- PBKDF2-SHA512): the broker can check a key with it, nobody can connect with it. A table of
-- its own, not columns of `devices`: ingest updates every devices row it hears from, and a
-- wider row leaves less room on its page for those updates to stay HOT (measured: 96 % HOT
-- became 36 % with the hash in the row). Devices registered before keys were checked have no
-- row: they connect after `devices rotate-key`.
CREATE TABLE device_credentials (
    account_id     bigint NOT NULL,
    device_id      text NOT NULL,
    broker_hash    text NOT NULL
        CHECK (broker_hash ~ '^\$7\$[0-9]+\$[A-Za-z0-9+/=]+\$[A-Za-z0-9+/=]+$'),
    -- When the key last changed (registration or rotation).
    key_issued_at  timestamptz NOT NULL,
    -- The transaction that wrote the row: the broker sync reads only rows written since its
    -- last read (by transactions at or after that read's oldest running one), not the fleet.
    written_xact   xid8 NOT NULL DEFAULT pg_current_xact_id(),
    PRIMARY KEY (account_id, device_id),
    FOREIGN KEY (account_id, device_id) REFERENCES devices (account_id, id)
);
CREATE INDEX device_credentials_written ON device_credentials (written_xact);

-- Redelivered heartbeats are recognised per account now that ids repeat across accounts.
DROP INDEX heartbeats_dedup;
CREATE UNIQUE INDEX heartbeats_dedup ON heartbeats (account_id, device_id, time, reporter, seq);
DROP INDEX device_state_events_device_time;
CREATE INDEX device_state_events_device_time
    ON device_state_events (account_id, device_id, time DESC, id DESC);

-- Rejections name the account and device they are about when the topic names known ones,
-- so an account can see its own (GET /v1/rejections) and never another's.
ALTER TABLE rejected_heartbeats ADD COLUMN account_id bigint;
ALTER TABLE rejected_heartbeats ADD COLUMN device_id text;
CREATE INDEX rejected_heartbeats_account ON rejected_heartbeats (account_id, received_at)
    WHERE account_id IS NOT NULL;

-- What the broker needs to admit devices, one row per MQTT identity. The broker sync
-- (`devmeter broker`, `devmeter up`) renders Mosquitto's password and ACL files from it; EMQX
-- can query it directly (docs/protocol.md).
CREATE VIEW mqtt_device_credentials AS
SELECT a.ref || '/' || d.id AS username,
       c.broker_hash AS password_hash,
       a.ref AS account_ref,
       d.id AS device_id,
       d.device_class = 'gateway' AS is_gateway,
       c.written_xact
FROM device_credentials c
JOIN devices d ON d.account_id = c.account_id AND d.id = c.device_id
JOIN accounts a ON a.id = d.account_id;

-- Wakes the broker sync when credentials change. Per statement, so that a bulk import
-- sends one notification, not one per device (and NOTIFY folds repeats in a transaction).
CREATE FUNCTION devmeter_notify_credentials() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('devmeter_mqtt_credentials', '');
    RETURN NULL;
END;
$$;
CREATE TRIGGER device_credentials_changed
    AFTER INSERT OR UPDATE OR DELETE ON device_credentials
    FOR EACH STATEMENT EXECUTE FUNCTION devmeter_notify_credentials();

-- Heartbeats per device and hour, now per account and device.
DROP FUNCTION device_heartbeats_hourly(text, timestamptz, timestamptz);
DO $migration$
BEGIN
    IF to_regclass('heartbeats_hourly') IS NULL THEN
        -- Plain mode: grouped from the raw rows, through heartbeats_dedup.
        CREATE FUNCTION device_heartbeats_hourly(
            p_account_id bigint, p_device_id text, p_from timestamptz, p_to timestamptz
        ) RETURNS TABLE (hour timestamptz, heartbeats bigint, active bigint, last_at timestamptz)
        LANGUAGE sql STABLE AS $$
            SELECT date_trunc('hour', h.time, 'UTC') AS hour,
                   count(*) AS heartbeats,
                   count(*) FILTER (WHERE h.state = 'active') AS active,
                   max(h.time) AS last_at
            FROM heartbeats h
            WHERE h.account_id = p_account_id AND h.device_id = p_device_id
              AND h.time >= p_from AND h.time < p_to
            GROUP BY 1
            ORDER BY 1
        $$;
    ELSE
        -- TimescaleDB mode: the continuous aggregate (migration 0007).
        CREATE INDEX heartbeats_hourly_account_device
            ON heartbeats_hourly (account_id, device_id, hour);
        CREATE FUNCTION device_heartbeats_hourly(
            p_account_id bigint, p_device_id text, p_from timestamptz, p_to timestamptz
        ) RETURNS TABLE (hour timestamptz, heartbeats bigint, active bigint, last_at timestamptz)
        LANGUAGE sql STABLE AS $$
            SELECT h.hour, h.heartbeats, h.active, h.last_at
            FROM heartbeats_hourly h
            WHERE h.account_id = p_account_id AND h.device_id = p_device_id
              AND h.hour >= p_from AND h.hour < p_to
            ORDER BY h.hour
        $$;
    END IF;
END;
$migration$;
