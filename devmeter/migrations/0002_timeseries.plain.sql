-- Plain PostgreSQL mode: the time series are partitioned by calendar month (UTC).
-- A default partition catches any row whose month has no partition yet, so no insert ever fails;
-- devmeter_ensure_month_partitions() creates months ahead (called by `devmeter migrate`, the
-- scheduler and the importer) and moves rows out of the default partition when it does.

CREATE TABLE device_state_events_default PARTITION OF device_state_events DEFAULT;
CREATE TABLE heartbeats_default PARTITION OF heartbeats DEFAULT;

CREATE FUNCTION devmeter_ensure_month_partitions(
    parent regclass, from_time timestamptz, to_time timestamptz
) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    month_start timestamptz := date_trunc('month', from_time, 'UTC');
    month_end   timestamptz;
    part_name   text;
    created     integer := 0;
BEGIN
    -- Serialises partition creation per table across sessions.
    PERFORM pg_advisory_xact_lock(hashtext('devmeter_ensure_month_partitions'), parent::oid::integer);
    WHILE month_start < to_time LOOP
        month_end := month_start + INTERVAL '1 month';
        part_name := format('%s_p%s', parent::text, to_char(month_start AT TIME ZONE 'UTC', 'YYYYMM'));
        IF to_regclass(part_name) IS NULL THEN
            EXECUTE format('CREATE TABLE %I (LIKE %s INCLUDING DEFAULTS INCLUDING CONSTRAINTS)',
                           part_name, parent);
            EXECUTE format(
                'WITH moved AS (DELETE FROM %I WHERE time >= %L AND time < %L RETURNING *) '
                'INSERT INTO %I SELECT * FROM moved',
                parent::text || '_default', month_start, month_end, part_name);
            EXECUTE format('ALTER TABLE %s ATTACH PARTITION %I FOR VALUES FROM (%L) TO (%L)',
                           parent, part_name, month_start, month_end);
            created := created + 1;
        END IF;
        month_start := month_end;
    END LOOP;
    RETURN created;
END;
$$;
