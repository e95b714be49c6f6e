-- Heartbeats per device and hour (see the TimescaleDB variant, a continuous aggregate).
-- Plain mode has no rollup table: the same function groups the raw rows of the asked hours,
-- through heartbeats_dedup (device_id, time, ...). Once raw heartbeats pass their retention,
-- their hours are gone here too.
CREATE FUNCTION device_heartbeats_hourly(p_device_id text, p_from timestamptz, p_to timestamptz)
RETURNS TABLE (hour timestamptz, heartbeats bigint, active bigint, last_at timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT date_trunc('hour', h.time, 'UTC') AS hour,
           count(*) AS heartbeats,
           count(*) FILTER (WHERE h.state = 'active') AS active,
           max(h.time) AS last_at
    FROM heartbeats h
    WHERE h.device_id = p_device_id AND h.time >= p_from AND h.time < p_to
    GROUP BY 1
    ORDER BY 1
$$;
