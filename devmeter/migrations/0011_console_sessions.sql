-- Issue 9, part 8: console sessions, "state since", idempotent device registration.

-- Console sessions. The browser holds a random token (256 bits) in its cookie; only its
-- SHA-256 is stored, so a copy of this table signs nobody in. A session belongs to the API key
-- it was opened with: revoking that key ends it (the lookup joins the live key), and signing out
-- sets revoked_at, so a copied cookie stops working at once. Two expiries: idle (last_used_at
-- plus the idle timeout, checked at lookup) and absolute (expires_at, fixed at sign-in).
CREATE TABLE console_sessions (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    token_hash    bytea NOT NULL UNIQUE CHECK (length(token_hash) = 32),
    api_key_id    bigint NOT NULL REFERENCES api_keys (id),
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    revoked_at    timestamptz
);
CREATE INDEX console_sessions_api_key ON console_sessions (api_key_id);
CREATE INDEX console_sessions_expires ON console_sessions (expires_at);

-- "State since": when the device entered its current state. `state_at` is the time of the
-- device's latest event or in-order heartbeat (the D3 ordering guard every writer compares
-- with), so for a device that heartbeats it moves with every batch, like "last seen". A
-- trigger keeps state_since, so that no writer (API, console, CLI, importer, ingest) has to:
-- on a change of state it takes the new state_at. For ingest that is the latest heartbeat of
-- the batch that changed the state (a batch spans at most DEVMETER_INGEST_BATCH_AGE_MS of
-- arrivals). Not indexed: the devices row stays eligible for HOT updates (migration 0005).
ALTER TABLE devices ADD COLUMN state_since timestamptz;

CREATE FUNCTION devmeter_track_state_since() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.state_since := coalesce(NEW.state_since, NEW.state_at);
    ELSE
        NEW.state_since := NEW.state_at;
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER devices_state_since_insert BEFORE INSERT ON devices
    FOR EACH ROW EXECUTE FUNCTION devmeter_track_state_since();
-- Only when the state changes: ingest rewrites most rows in every batch with the same state.
CREATE TRIGGER devices_state_since_update BEFORE UPDATE OF state ON devices
    FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state)
    EXECUTE FUNCTION devmeter_track_state_since();

-- Existing devices: the first event of the last run of events in the current state (D3 order:
-- time, then id); a device whose events all say its state: its first event.
UPDATE devices d
SET state_since = coalesce(
    (SELECT min(e.time) FROM device_state_events e
     WHERE e.account_id = d.account_id AND e.device_id = d.id
       AND e.time > coalesce(
           (SELECT max(o.time) FROM device_state_events o
            WHERE o.account_id = d.account_id AND o.device_id = d.id AND o.state <> d.state
              AND o.time <= d.state_at),
           '-infinity')
       AND e.time <= d.state_at),
    d.state_at);
ALTER TABLE devices ALTER COLUMN state_since SET NOT NULL;

-- Idempotency-Key of POST /v1/devices (Stripe's rule): the same key with the same request
-- replays the first response; with another request it is a conflict. Per account, kept 24 h.
-- The row is written in the transaction that registers the device, so a refused or failed
-- request leaves no row (retrying runs it again) and a concurrent request with the same key
-- waits on the unique key, then replays. `response` is the first response body WITHOUT the
-- device key: a device key is shown once and stored only as a hash (D1).
CREATE TABLE idempotency_keys (
    account_id    bigint NOT NULL REFERENCES accounts (id),
    key           text NOT NULL CHECK (length(key) BETWEEN 1 AND 255),
    request_hash  bytea NOT NULL,
    -- NULL only inside the transaction that claimed the key; committed with the response.
    status        integer,
    response      jsonb,
    created_at    timestamptz NOT NULL DEFAULT now(),
    expires_at    timestamptz NOT NULL,
    PRIMARY KEY (account_id, key)
);
CREATE INDEX idempotency_keys_expires ON idempotency_keys (expires_at);
