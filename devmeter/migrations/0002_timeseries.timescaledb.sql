-- TimescaleDB mode: the time series become hypertables.
-- Raw heartbeats are many and short-lived: daily chunks, compressed after a week, dropped by the
-- retention policy that `devmeter migrate` sets from DEVMETER_HEARTBEAT_RETENTION_DAYS.
-- State events are few and are billing evidence: weekly chunks, compressed once their month is
-- long closed (late inserts into compressed chunks are supported), never dropped.

SELECT create_hypertable('device_state_events', 'time',
                         chunk_time_interval => INTERVAL '7 days', if_not_exists => TRUE);
SELECT create_hypertable('heartbeats', 'time',
                         chunk_time_interval => INTERVAL '1 day', if_not_exists => TRUE);

ALTER TABLE heartbeats SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'device_id',
    timescaledb.compress_orderby = 'time DESC'
);
SELECT add_compression_policy('heartbeats', compress_after => INTERVAL '7 days',
                              if_not_exists => TRUE);

ALTER TABLE device_state_events SET (
    timescaledb.compress,
    timescaledb.compress_segmentby = 'account_id',
    timescaledb.compress_orderby = 'time, id'
);
SELECT add_compression_policy('device_state_events', compress_after => INTERVAL '90 days',
                              if_not_exists => TRUE);
