-- The service role's privileges: what the API, ingest worker, scheduler and every command but
-- `devmeter migrate` may do. Not a migration: `devmeter migrate` (as the owner) runs it after
-- the migrations on every run, in one transaction, so a table a later migration adds is covered
-- by the next migrate, and a privilege dropped from this file is taken back.
-- `{role}` is the service role's name (DEVMETER_SERVICE_ROLE), quoted by the runner.

-- name: grant_service_role
-- Start from nothing, so that what follows is all the role holds.
REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role};
REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {role};
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA public FROM {role};
REVOKE CREATE ON SCHEMA public FROM {role};
GRANT USAGE ON SCHEMA public TO {role};

-- Read everything, add to everything. No UPDATE, DELETE or TRUNCATE unless granted below: state
-- events, heartbeats, statements with their lines and peaks, webhook attempts, rejected
-- heartbeats are evidence, only ever appended to.
GRANT SELECT, INSERT ON ALL TABLES IN SCHEMA public TO {role};
-- The migration runner's own records are read-only for the service.
REVOKE INSERT ON devmeter_meta, devmeter_schema_migrations FROM {role};

-- Current state, not history; each line says who changes it (found by reading the code).
-- accounts: an account's plan and status (A3 suspension, P6 plan change).
-- devices: state, state_at, last_seen_at (ingest, set-state, import); key rotation.
-- api_keys: revoked_at (an owner revoking a key).
-- webhook_deliveries: status, attempts, next_attempt_at (the delivery's own bookkeeping; every
--   attempt itself is appended to webhook_attempts).
-- close_failures: a failed close counts its attempts and is removed once the month closes.
-- device_credentials: a device's broker hashes (Mosquitto's, NATS's), replaced when its key is
--   rotated.
-- console_sessions: last use and sign-out; expired sessions are deleted.
-- idempotency_keys: a claimed key gets its response; expired keys are deleted.
GRANT UPDATE ON accounts, devices, device_credentials, api_keys, webhook_deliveries,
    close_failures, console_sessions, idempotency_keys TO {role};
GRANT DELETE ON close_failures, console_sessions, idempotency_keys TO {role};
-- usage_steps, usage_buckets, usage_classes (migration 0014), usage_days (0019): the
--   maintained usage figures, derived from the state events by their trigger and rebuilt by
--   bulk writers; not evidence.
--   Granted once they exist: a migrate to an earlier target version stops before them.
DO $$
BEGIN
    IF to_regclass('usage_steps') IS NOT NULL THEN
        GRANT UPDATE, DELETE ON usage_steps, usage_buckets, usage_classes TO {role};
    END IF;
    IF to_regclass('usage_days') IS NOT NULL THEN
        GRANT UPDATE, DELETE ON usage_days TO {role};
    END IF;
END
$$;

-- Identity columns and device_state_events.id draw from sequences.
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role};
-- Includes devmeter_ensure_month_partitions (SECURITY DEFINER, EXECUTE revoked from PUBLIC)
-- and device_heartbeats_hourly.
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO {role};
