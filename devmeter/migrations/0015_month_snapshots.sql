-- Issue 11: a close that does not grow with history. Each close keeps which devices were Active
-- at the end of the month it closed; the next close starts from there and reads only its own
-- month's events, not the account's whole history. A snapshot that a late event (older than
-- its boundary, stored after it was taken) could have changed is not used: that close reads
-- the history, as before.
CREATE TABLE month_snapshots (
    account_id  bigint NOT NULL REFERENCES accounts (id),
    -- The first instant of the month that follows the closed one, in the account's zone.
    boundary    timestamptz NOT NULL,
    taken_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, boundary)
);

-- The devices Active just before the boundary (after every event before it). Inactive devices
-- are not listed: a device without a row starts the month Inactive, as one with no history.
CREATE TABLE device_month_states (
    account_id    bigint NOT NULL,
    boundary      timestamptz NOT NULL,
    device_id     text NOT NULL,
    device_class  text NOT NULL,
    PRIMARY KEY (account_id, boundary, device_id)
);
