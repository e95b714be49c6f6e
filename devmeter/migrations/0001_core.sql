-- Accounts, members and their API keys, devices.
-- Identifiers are text chosen by people (account refs, device ids) or generated; devices are
-- addressed by id alone on MQTT topics, so device ids are unique across all accounts.

CREATE TABLE accounts (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ref           text NOT NULL UNIQUE CHECK (ref ~ '^[a-z0-9][a-z0-9_-]{0,62}$'),
    name          text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    plan          text NOT NULL,
    country       text NOT NULL CHECK (country ~ '^[A-Z]{2}$'),
    timezone      text NOT NULL,
    signed_up_on  date NOT NULL,
    status        text NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'suspended')),
    created_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE members (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts (id),
    name        text NOT NULL,
    email       text,
    role        text NOT NULL CHECK (role IN ('owner', 'manager', 'developer')),
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- A1: one owner per account, the first member.
CREATE UNIQUE INDEX members_one_owner ON members (account_id) WHERE role = 'owner';

CREATE TABLE api_keys (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    member_id   bigint NOT NULL REFERENCES members (id),
    account_id  bigint NOT NULL REFERENCES accounts (id),
    -- The first characters of the key, so a person can tell keys apart in a list.
    prefix      text NOT NULL,
    -- SHA-256 of the whole key: keys are 256-bit random, so a slow password hash buys nothing.
    key_hash    bytea NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX api_keys_member ON api_keys (member_id);

CREATE TABLE devices (
    id             text PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
    account_id     bigint NOT NULL REFERENCES accounts (id),
    device_class   text NOT NULL,
    name           text,
    gateway_id     text REFERENCES devices (id),
    key_prefix     text NOT NULL,
    key_hash       bytea NOT NULL UNIQUE,
    registered_at  timestamptz NOT NULL,
    -- The state of the device's latest event by event time (D3) and that event's time.
    state          text NOT NULL CHECK (state IN ('active', 'inactive')),
    state_at       timestamptz NOT NULL,
    last_seen_at   timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX devices_account ON devices (account_id, id);
CREATE INDEX devices_gateway ON devices (gateway_id) WHERE gateway_id IS NOT NULL;

-- D2: a registered device is never deleted, whatever code or person tries.
CREATE FUNCTION devmeter_refuse_delete() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'devmeter: rows of % are never deleted', TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END;
$$;
CREATE TRIGGER devices_never_deleted BEFORE DELETE ON devices
    FOR EACH ROW EXECUTE FUNCTION devmeter_refuse_delete();

-- Time series. `{{time_partitioning}}` is filled in by the migration runner: empty for
-- TimescaleDB (the table becomes a hypertable in the next migration) and
-- `PARTITION BY RANGE (time)` for plain PostgreSQL. Columns, keys and so every query are
-- the same in both modes.

CREATE SEQUENCE device_state_events_id_seq AS bigint;

-- Every change of a device's state, from any source (D3). The billing evidence: append-only,
-- no retention policy.
CREATE TABLE device_state_events (
    time          timestamptz NOT NULL,
    -- Breaks ties between events of one device at the same instant: the later-recorded wins.
    id            bigint NOT NULL DEFAULT nextval('device_state_events_id_seq'),
    device_id     text NOT NULL,
    account_id    bigint NOT NULL,
    -- Copied from the device (a class never changes) so that peaks need no join.
    device_class  text NOT NULL,
    state         text NOT NULL CHECK (state IN ('active', 'inactive')),
    source        text NOT NULL CHECK (source IN (
                      'registration', 'console', 'api', 'cli', 'heartbeat', 'gateway',
                      'import', 'timeout')),
    received_at   timestamptz NOT NULL DEFAULT now(),
    seq           bigint
) {{time_partitioning}};
ALTER SEQUENCE device_state_events_id_seq OWNED BY device_state_events.id;
CREATE INDEX device_state_events_account_time ON device_state_events (account_id, time);
CREATE INDEX device_state_events_device_time ON device_state_events (device_id, time DESC, id DESC);

-- Raw heartbeats as received, one row per device per message (a gateway's message gives a row
-- for itself and one per child). `reporter` is who published it: the device or its gateway.
CREATE TABLE heartbeats (
    time         timestamptz NOT NULL,
    device_id    text NOT NULL,
    account_id   bigint NOT NULL,
    state        text NOT NULL CHECK (state IN ('active', 'inactive')),
    seq          bigint NOT NULL,
    reporter     text NOT NULL,
    received_at  timestamptz NOT NULL
) {{time_partitioning}};
-- A redelivered message (same device, time, reporter, seq) is stored once.
CREATE UNIQUE INDEX heartbeats_dedup ON heartbeats (device_id, time, reporter, seq);
CREATE INDEX heartbeats_account_time ON heartbeats (account_id, time);
