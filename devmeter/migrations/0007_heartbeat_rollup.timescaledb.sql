-- Heartbeats per device and hour: a device's connectivity as the API and console show it, and
-- what remains of it once raw heartbeats pass their retention (the rollup has none).
-- A continuous aggregate, real-time (materialized_only = false: hours not yet materialized are
-- counted from the raw rows). Its policy refreshes the last 31 days every 30 minutes: only
-- invalidated and new hours cost anything, and a stop of the background jobs shorter than that
-- loses nothing. The heartbeats already stored when this is created are materialized once by
-- `devmeter migrate` (migrate.py: a refresh cannot run inside this migration's transaction).
CREATE MATERIALIZED VIEW heartbeats_hourly
WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
SELECT time_bucket(INTERVAL '1 hour', time) AS hour,
       account_id,
       device_id,
       count(*) AS heartbeats,
       count(*) FILTER (WHERE state = 'active') AS active,
       max(time) AS last_at
FROM heartbeats
GROUP BY hour, account_id, device_id
WITH NO DATA;

CREATE INDEX heartbeats_hourly_device ON heartbeats_hourly (device_id, hour);

SELECT add_continuous_aggregate_policy('heartbeats_hourly',
    start_offset => INTERVAL '31 days',
    end_offset => INTERVAL '1 hour',
    schedule_interval => INTERVAL '30 minutes',
    if_not_exists => TRUE);

-- The one interface both storage modes give (plain mode computes it from the raw rows).
CREATE FUNCTION device_heartbeats_hourly(p_device_id text, p_from timestamptz, p_to timestamptz)
RETURNS TABLE (hour timestamptz, heartbeats bigint, active bigint, last_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT h.hour, h.heartbeats, h.active, h.last_at
    FROM heartbeats_hourly h
    WHERE h.device_id = p_device_id AND h.hour >= p_from AND h.hour < p_to
    ORDER BY h.hour
$$;
