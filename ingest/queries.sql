-- Ingest writer queries. One batch = one transaction: stage with COPY, then set-based inserts.

-- name: create_stage
CREATE TEMP TABLE IF NOT EXISTS heartbeat_stage (
    ord           integer NOT NULL,
    time          timestamptz NOT NULL,
    device_id     text NOT NULL,
    account_id    bigint NOT NULL,
    device_class  text NOT NULL,
    state         text NOT NULL,
    seq           bigint NOT NULL,
    reporter      text NOT NULL,
    received_at   timestamptz NOT NULL
) ON COMMIT DELETE ROWS;

-- name: copy_stage
COPY heartbeat_stage (ord, time, device_id, account_id, device_class, state, seq, reporter,
                      received_at)
FROM STDIN (FORMAT BINARY);

-- name: copy_rejections
COPY rejected_heartbeats (received_at, topic, reason, detail, payload, account_id, device_id)
FROM STDIN (FORMAT BINARY);

-- name: apply_stage
-- Stores the batch's new heartbeats (a redelivered one hits the unique index and is skipped),
-- then derives state events from the new ones only, and moves devices' current state.
--
-- A heartbeat becomes a state event when it can change the device's timeline (D3):
--   * it is older than the device's latest known event (late / out of order): always, since it
--     may change history;
--   * otherwise when its state differs from the state just before it (the previous in-order
--     heartbeat of the batch, or the device's current state for the first one).
-- Devices are locked in key order so that two workers never deadlock. A device is its
-- account and its id (ids repeat across accounts).
WITH locked AS (
    SELECT d.id, d.account_id, d.device_class, d.state, d.state_at
    FROM devices d
    WHERE (d.account_id, d.id) IN (SELECT DISTINCT account_id, device_id FROM heartbeat_stage)
    ORDER BY d.account_id, d.id
    FOR UPDATE
),
inserted AS (
    INSERT INTO heartbeats (time, device_id, account_id, state, seq, reporter, received_at)
    SELECT DISTINCT ON (account_id, device_id, time, reporter, seq)
           time, device_id, account_id, state, seq, reporter, received_at
    FROM heartbeat_stage
    ORDER BY account_id, device_id, time, reporter, seq, ord
    ON CONFLICT (account_id, device_id, time, reporter, seq) DO NOTHING
    RETURNING time, device_id, account_id, state, seq, reporter
),
fresh AS (
    SELECT i.time, i.device_id, i.state, i.seq, i.reporter, l.account_id, l.device_class,
           l.state AS current_state, i.time >= l.state_at AS in_order
    FROM inserted i JOIN locked l ON l.account_id = i.account_id AND l.id = i.device_id
),
ordered AS (
    SELECT f.*,
           lag(f.state) OVER (PARTITION BY f.account_id, f.device_id
                              ORDER BY f.time, f.seq, f.reporter) AS previous_state
    FROM fresh f
    WHERE f.in_order
),
events AS (
    INSERT INTO device_state_events (time, device_id, account_id, device_class, state, source,
                                     seq)
    SELECT time, device_id, account_id, device_class, state,
           CASE WHEN reporter = device_id THEN 'heartbeat' ELSE 'gateway' END, seq
    FROM (
        SELECT * FROM ordered WHERE state <> coalesce(previous_state, current_state)
        UNION ALL
        SELECT f.*, NULL FROM fresh f WHERE NOT f.in_order
    ) changes
    ORDER BY time, seq, reporter
    RETURNING device_id
),
-- Per device of the batch: its latest heartbeat, and its latest in-order one (the state it is
-- in now). One aggregate, not a second CTE joined to this one: the planner, which cannot
-- estimate CTEs over the never-analysed stage table, took both for one row and compared every
-- device of a batch with every other (690 of 746 ms of a 2,000-heartbeat batch; bench rows).
seen AS (
    SELECT account_id, device_id, max(time) AS last_time,
           (array_agg(state ORDER BY time DESC, seq DESC, reporter DESC)
                FILTER (WHERE in_order))[1] AS state,
           max(time) FILTER (WHERE in_order) AS state_time
    FROM fresh
    GROUP BY account_id, device_id
),
moved AS (
    UPDATE devices d
    SET state = coalesce(s.state, d.state),
        state_at = coalesce(s.state_time, d.state_at),
        last_seen_at = greatest(d.last_seen_at, s.last_time)
    FROM seen s
    WHERE d.account_id = s.account_id AND d.id = s.device_id
    RETURNING d.id
)
SELECT (SELECT count(*) FROM inserted) AS heartbeats,
       (SELECT count(*) FROM events) AS events,
       (SELECT count(*) FROM moved) AS devices,
       (SELECT array_agg(account_id) FROM fresh WHERE NOT in_order) AS late_accounts,
       (SELECT array_agg(device_id) FROM fresh WHERE NOT in_order) AS late_devices,
       (SELECT array_agg(time) FROM fresh WHERE NOT in_order) AS late_times,
       (SELECT array_agg(state) FROM fresh WHERE NOT in_order) AS late_states;

-- name: select_directory
SELECT a.ref, d.id, d.account_id, d.device_class, d.gateway_id, d.registered_at
FROM devices d JOIN accounts a ON a.id = d.account_id;

-- name: select_directory_since
SELECT a.ref, d.id, d.account_id, d.device_class, d.gateway_id, d.registered_at
FROM devices d JOIN accounts a ON a.id = d.account_id
WHERE d.created_at >= %(since)s;

-- name: insert_successor_events
-- After late heartbeats (older than their device's latest event): the heartbeat that follows
-- each one must be on the timeline when its state differs, or the late one would wrongly stand
-- until the next recorded event. Skipped where an event already re-establishes the state.
INSERT INTO device_state_events (time, device_id, account_id, device_class, state, source, seq)
SELECT n.time, n.device_id, d.account_id, d.device_class, n.state,
       CASE WHEN n.reporter = n.device_id THEN 'heartbeat' ELSE 'gateway' END, n.seq
FROM (
    -- Two late heartbeats of one device at one instant (say, from the device and from its
    -- gateway) share their successor: one row each would insert it twice, as the NOT EXISTS
    -- below does not see this statement's own inserts.
    SELECT DISTINCT account_id, device_id, time, state
    FROM unnest(%(account_ids)s::bigint[], %(device_ids)s::text[], %(times)s::timestamptz[],
                %(states)s::text[])
         AS l (account_id, device_id, time, state)
) late
JOIN devices d ON d.account_id = late.account_id AND d.id = late.device_id
CROSS JOIN LATERAL (
    SELECT h.time, h.device_id, h.state, h.seq, h.reporter FROM heartbeats h
    WHERE h.account_id = late.account_id AND h.device_id = late.device_id
      AND h.time > late.time
    ORDER BY h.time, h.seq, h.reporter
    LIMIT 1
) n
WHERE n.state <> late.state
  AND NOT EXISTS (
      SELECT 1 FROM device_state_events e
      WHERE e.account_id = late.account_id AND e.device_id = n.device_id
        AND e.time > late.time AND e.time <= n.time
  );
