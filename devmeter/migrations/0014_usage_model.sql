-- Issue 11: usage as a read. The active-device count of every account and class is kept as it
-- changes, in the transaction that stores the state event (a trigger, so ingest, the API, the
-- CLI and import keep it alike), instead of replaying the account's history on every read.
--
-- usage_steps: the net change of the Active count at each instant (M3: all events of one
--   instant applied together), derived from each device's timeline.
-- usage_buckets: per quarter hour (every time zone's offset is a whole number of quarter
--   hours, so no bucket straddles a local day or month), the highest count reached in it and
--   the first instant it was reached, and the count at its end. A month's peak is then the
--   count at its start (the last bucket before it) or the highest bucket in it: some three
--   thousand rows, whatever the history.
-- usage_classes: the classes an account has had events of, and since when (a class whose
--   devices never were Active still shows, with 0).

CREATE TABLE usage_steps (
    account_id    bigint NOT NULL,
    device_class  text NOT NULL,
    time          timestamptz NOT NULL,
    delta         integer NOT NULL,
    PRIMARY KEY (account_id, device_class, time)
);

CREATE TABLE usage_buckets (
    account_id    bigint NOT NULL,
    device_class  text NOT NULL,
    bucket        timestamptz NOT NULL,
    max_count     integer NOT NULL,
    max_at        timestamptz NOT NULL,
    count_after   integer NOT NULL,
    -- The bucket's latest step: an event after it extends the bucket without a recount.
    last_at       timestamptz NOT NULL,
    PRIMARY KEY (account_id, device_class, bucket)
);

CREATE TABLE usage_classes (
    account_id    bigint NOT NULL,
    device_class  text NOT NULL,
    first_at      timestamptz NOT NULL,
    PRIMARY KEY (account_id, device_class)
);

CREATE FUNCTION devmeter_usage_bucket(t timestamptz) RETURNS timestamptz
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT to_timestamp(floor(extract(epoch FROM t) / 900) * 900)
$$;

-- The bucket's figures from its steps and the count at its start.
CREATE FUNCTION devmeter_usage_recount(p_account bigint, p_class text, p_bucket timestamptz)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    before integer;
    r record;
BEGIN
    SELECT count_after INTO before FROM usage_buckets
    WHERE account_id = p_account AND device_class = p_class AND bucket < p_bucket
    ORDER BY bucket DESC LIMIT 1;
    before := coalesce(before, 0);
    SELECT max(c) AS max_count,
           (array_agg(time ORDER BY c DESC, time))[1] AS max_at,
           (array_agg(c ORDER BY time DESC))[1] AS count_after,
           max(time) AS last_at
    INTO r
    FROM (
        SELECT time, before + sum(delta) OVER (ORDER BY time) AS c
        FROM usage_steps
        WHERE account_id = p_account AND device_class = p_class
          AND time >= p_bucket AND time < p_bucket + interval '15 minutes'
    ) s;
    IF r.max_count IS NULL THEN
        -- No step left: the count runs through the bucket unchanged.
        DELETE FROM usage_buckets
        WHERE account_id = p_account AND device_class = p_class AND bucket = p_bucket;
    ELSE
        INSERT INTO usage_buckets AS b
            (account_id, device_class, bucket, max_count, max_at, count_after, last_at)
        VALUES (p_account, p_class, p_bucket, r.max_count, r.max_at, r.count_after, r.last_at)
        ON CONFLICT (account_id, device_class, bucket) DO UPDATE
        SET max_count = EXCLUDED.max_count, max_at = EXCLUDED.max_at,
            count_after = EXCLUDED.count_after, last_at = EXCLUDED.last_at;
    END IF;
END;
$$;

-- Add `p_delta` to the count from `p_time` on.
CREATE FUNCTION devmeter_usage_add(p_account bigint, p_class text, p_time timestamptz,
                                   p_delta integer)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    b timestamptz := devmeter_usage_bucket(p_time);
    cur usage_buckets%ROWTYPE;
    later boolean;
    now_count integer;
BEGIN
    IF p_delta = 0 THEN
        RETURN;
    END IF;
    INSERT INTO usage_steps AS s (account_id, device_class, time, delta)
    VALUES (p_account, p_class, p_time, p_delta)
    ON CONFLICT (account_id, device_class, time) DO UPDATE SET delta = s.delta + EXCLUDED.delta;
    DELETE FROM usage_steps
    WHERE account_id = p_account AND device_class = p_class AND time = p_time AND delta = 0;

    SELECT * INTO cur FROM usage_buckets
    WHERE account_id = p_account AND device_class = p_class AND bucket = b
    FOR UPDATE;
    SELECT EXISTS (
        SELECT 1 FROM usage_buckets
        WHERE account_id = p_account AND device_class = p_class AND bucket > b
    ) INTO later;
    IF cur.bucket IS NOT NULL AND p_time > cur.last_at THEN
        -- The common case: a step after the bucket's last one extends it.
        now_count := cur.count_after + p_delta;
        UPDATE usage_buckets
        SET count_after = now_count, last_at = p_time,
            max_count = greatest(max_count, now_count),
            max_at = CASE WHEN now_count > max_count THEN p_time ELSE max_at END
        WHERE account_id = p_account AND device_class = p_class AND bucket = b;
    ELSE
        PERFORM devmeter_usage_recount(p_account, p_class, b);
    END IF;
    IF later THEN
        -- A step before later buckets moves every count after it.
        UPDATE usage_buckets
        SET max_count = max_count + p_delta, count_after = count_after + p_delta
        WHERE account_id = p_account AND device_class = p_class AND bucket > b;
    END IF;
END;
$$;

-- A state event changes its device's state from its instant to the device's next event: the
-- count moves by the difference there, and back at the next event (D3, M3).
CREATE FUNCTION devmeter_usage_on_event() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    prev text;
    next_time timestamptz;
    x integer;
BEGIN
    IF current_setting('devmeter.usage_bulk', true) = 'on' THEN
        RETURN NULL;  -- a bulk writer rebuilds the accounts it touched (devmeter_usage_rebuild)
    END IF;
    -- DO NOTHING takes no lock on an existing row, so writers of one class do not queue here;
    -- the rare earlier event moves first_at with a lock.
    INSERT INTO usage_classes (account_id, device_class, first_at)
    VALUES (NEW.account_id, NEW.device_class, NEW.time)
    ON CONFLICT (account_id, device_class) DO NOTHING;
    UPDATE usage_classes SET first_at = NEW.time
    WHERE account_id = NEW.account_id AND device_class = NEW.device_class
      AND first_at > NEW.time;
    -- The device's timeline as recorded before this event: every writer locks the device's
    -- row before adding its events, so ids follow the order events of one device are recorded
    -- in, and the rows a statement adds after this one are left to their own turn.
    SELECT state INTO prev FROM device_state_events
    WHERE account_id = NEW.account_id AND device_id = NEW.device_id
      AND time <= NEW.time AND id < NEW.id
    ORDER BY time DESC, id DESC LIMIT 1;
    x := (NEW.state = 'active')::integer - (coalesce(prev, 'inactive') = 'active')::integer;
    IF x = 0 THEN
        RETURN NULL;
    END IF;
    SELECT time INTO next_time FROM device_state_events
    WHERE account_id = NEW.account_id AND device_id = NEW.device_id
      AND time > NEW.time AND id < NEW.id
    ORDER BY time LIMIT 1;
    PERFORM devmeter_usage_add(NEW.account_id, NEW.device_class, NEW.time, x);
    IF next_time IS NOT NULL THEN
        PERFORM devmeter_usage_add(NEW.account_id, NEW.device_class, next_time, -x);
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER device_state_events_usage AFTER INSERT ON device_state_events
    FOR EACH ROW EXECUTE FUNCTION devmeter_usage_on_event();

-- The account's figures from all its events at once: for bulk writers (import), repairs and
-- the tests that hold the trigger's figures to it.
CREATE FUNCTION devmeter_usage_rebuild(p_account bigint) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM usage_steps WHERE account_id = p_account;
    DELETE FROM usage_buckets WHERE account_id = p_account;
    DELETE FROM usage_classes WHERE account_id = p_account;
    INSERT INTO usage_classes (account_id, device_class, first_at)
    SELECT account_id, device_class, min(time) FROM device_state_events
    WHERE account_id = p_account GROUP BY account_id, device_class;
    INSERT INTO usage_steps (account_id, device_class, time, delta)
    SELECT account_id, device_class, time, sum(d)::integer
    FROM (
        SELECT account_id, device_class, time,
               a - coalesce(lag(a) OVER (PARTITION BY device_id ORDER BY time), 0) AS d
        FROM (
            -- Each device's state after each instant: its last event there.
            SELECT DISTINCT ON (device_id, time) device_id, account_id, device_class, time,
                   (state = 'active')::integer AS a
            FROM device_state_events
            WHERE account_id = p_account
            ORDER BY device_id, time, id DESC
        ) per_instant
    ) deltas
    WHERE d <> 0
    GROUP BY account_id, device_class, time
    HAVING sum(d) <> 0;
    INSERT INTO usage_buckets
        (account_id, device_class, bucket, max_count, max_at, count_after, last_at)
    SELECT account_id, device_class, devmeter_usage_bucket(time), max(c),
           (array_agg(time ORDER BY c DESC, time))[1],
           (array_agg(c ORDER BY time DESC))[1], max(time)
    FROM (
        SELECT account_id, device_class, time,
               sum(delta) OVER (PARTITION BY device_class ORDER BY time) AS c
        FROM usage_steps WHERE account_id = p_account
    ) running
    GROUP BY account_id, device_class, devmeter_usage_bucket(time);
END;
$$;

-- Existing accounts: from their history, once.
SELECT devmeter_usage_rebuild(id) FROM accounts;
