-- Heartbeats the ingest worker refused (ingest/processor.py: Reason), kept for diagnosis:
-- a refused message is never silently dropped.
CREATE TABLE rejected_heartbeats (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at  timestamptz NOT NULL,
    topic        text NOT NULL,
    reason       text NOT NULL,
    detail       text NOT NULL,
    -- The payload as received, cut to 4 KiB.
    payload      bytea NOT NULL
);
CREATE INDEX rejected_heartbeats_received ON rejected_heartbeats (received_at);
CREATE INDEX rejected_heartbeats_reason ON rejected_heartbeats (reason, received_at);
