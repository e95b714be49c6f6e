-- An operator can send a failed delivery again (`devmeter webhooks retry`). Attempt numbers
-- keep counting (they key webhook_attempts); the retry gets a fresh allowance of attempts,
-- counted from the attempts made before it.
ALTER TABLE webhook_deliveries ADD COLUMN attempts_before_retry integer NOT NULL DEFAULT 0;
