-- Device registry queries (accounts, members, API keys, devices, state events).

-- name: insert_account
INSERT INTO accounts (ref, name, plan, country, timezone, signed_up_on)
VALUES (%(ref)s, %(name)s, %(plan)s, %(country)s, %(timezone)s, %(signed_up_on)s)
ON CONFLICT (ref) DO NOTHING
RETURNING id, ref, name, plan, country, timezone, signed_up_on, status, created_at;

-- name: insert_signup_plan
-- P6: the sign-up plan is the first of the plan history, in force from the sign-up day.
INSERT INTO plan_changes (account_id, plan, effective_at, changed_by)
VALUES (%(account_id)s, %(plan)s, (%(signed_up_on)s::date::timestamp AT TIME ZONE %(timezone)s),
        'sign-up');

-- name: insert_member
INSERT INTO members (account_id, name, email, role)
VALUES (%(account_id)s, %(name)s, %(email)s, %(role)s)
RETURNING id, account_id, name, email, role, created_at;

-- name: insert_api_key
INSERT INTO api_keys (member_id, account_id, prefix, key_hash)
VALUES (%(member_id)s, %(account_id)s, %(prefix)s, %(key_hash)s)
RETURNING id;

-- name: select_account_by_ref
SELECT id, ref, name, plan, country, timezone, signed_up_on, status, created_at
FROM accounts WHERE ref = %(ref)s;

-- name: select_account_by_id
SELECT id, ref, name, plan, country, timezone, signed_up_on, status, created_at
FROM accounts WHERE id = %(id)s;

-- name: select_device_for_update
SELECT d.id, d.account_id, a.ref AS account_ref, d.device_class, d.name, d.gateway_id,
       d.key_prefix, d.registered_at, d.state, d.state_at, d.last_seen_at,
       d.state_since
FROM devices d JOIN accounts a ON a.id = d.account_id
WHERE d.account_id = %(account_id)s AND d.id = %(id)s
FOR UPDATE OF d;

-- name: select_device_accounts
-- The accounts that have a device with this id (operator commands given an id alone).
SELECT d.account_id, a.ref AS account_ref
FROM devices d JOIN accounts a ON a.id = d.account_id
WHERE d.id = %(id)s
ORDER BY a.ref
LIMIT 2;

-- name: insert_device
INSERT INTO devices (id, account_id, device_class, name, gateway_id, key_prefix, key_hash,
                     registered_at, state, state_at)
VALUES (%(id)s, %(account_id)s, %(device_class)s, %(name)s, %(gateway_id)s, %(key_prefix)s,
        %(key_hash)s, %(registered_at)s, 'active', %(registered_at)s)
ON CONFLICT (account_id, id) DO NOTHING
RETURNING id;

-- name: insert_state_event
INSERT INTO device_state_events (time, device_id, account_id, device_class, state, source, seq)
VALUES (%(time)s, %(device_id)s, %(account_id)s, %(device_class)s, %(state)s, %(source)s, %(seq)s);

-- name: update_device_state
-- D3: the current state follows the latest event by event time, so an older event never
-- overwrites a newer one.
UPDATE devices SET state = %(state)s, state_at = %(time)s
WHERE account_id = %(account_id)s AND id = %(device_id)s AND state_at <= %(time)s;

-- name: update_device_key
UPDATE devices SET key_prefix = %(key_prefix)s, key_hash = %(key_hash)s
WHERE account_id = %(account_id)s AND id = %(id)s;

-- name: upsert_device_credential
-- The key as the brokers check it (Mosquitto's PBKDF2, NATS's bcrypt); a trigger wakes the
-- broker syncs when this commits.
INSERT INTO device_credentials (account_id, device_id, broker_hash, nats_hash, key_issued_at)
VALUES (%(account_id)s, %(id)s, %(broker_hash)s, %(nats_hash)s, %(at)s)
ON CONFLICT (account_id, device_id)
DO UPDATE SET broker_hash = EXCLUDED.broker_hash, nats_hash = EXCLUDED.nats_hash,
              key_issued_at = EXCLUDED.key_issued_at, written_xact = pg_current_xact_id();

-- name: select_devices_of_account
SELECT d.id, d.account_id, a.ref AS account_ref, d.device_class, d.name, d.gateway_id,
       d.key_prefix, d.registered_at, d.state, d.state_at, d.last_seen_at,
       d.state_since
FROM devices d JOIN accounts a ON a.id = d.account_id
WHERE d.account_id = %(account_id)s
ORDER BY d.id;

-- name: select_state_events_of_device
SELECT time, state, source, seq, received_at
FROM device_state_events
WHERE account_id = %(account_id)s AND device_id = %(device_id)s
ORDER BY time, id;

-- name: search_devices
SELECT d.id, d.account_id, a.ref AS account_ref, d.device_class, d.name, d.gateway_id,
       d.key_prefix, d.registered_at, d.state, d.state_at, d.last_seen_at,
       d.state_since
FROM devices d JOIN accounts a ON a.id = d.account_id
WHERE d.account_id = %(account_id)s
  AND (%(state)s::text IS NULL OR d.state = %(state)s)
  AND (%(device_class)s::text IS NULL OR d.device_class = %(device_class)s)
  AND (%(gateway_id)s::text IS NULL OR d.gateway_id = %(gateway_id)s)
  AND (%(pattern)s::text IS NULL OR d.id ILIKE %(pattern)s OR d.name ILIKE %(pattern)s)
  AND (%(after)s::text IS NULL OR d.id > %(after)s)
ORDER BY d.id
LIMIT %(limit)s;

-- name: select_device
SELECT d.id, d.account_id, a.ref AS account_ref, d.device_class, d.name, d.gateway_id,
       d.key_prefix, d.registered_at, d.state, d.state_at, d.last_seen_at,
       d.state_since
FROM devices d JOIN accounts a ON a.id = d.account_id
WHERE d.id = %(id)s AND d.account_id = %(account_id)s;

-- Payment methods and account status (SPEC A2, A3; migration 0013).

-- name: select_current_payment_method
-- The method in force is the latest registered (the table is append-only history).
SELECT p.id, a.ref AS account_ref, p.kind, p.reference, p.member_id, p.source, p.created_at
FROM payment_methods p JOIN accounts a ON a.id = p.account_id
WHERE p.account_id = %(account_id)s
ORDER BY p.created_at DESC, p.id DESC
LIMIT 1;

-- name: insert_payment_method
INSERT INTO payment_methods (account_id, kind, reference, member_id, source, created_at)
VALUES (%(account_id)s, %(kind)s, %(reference)s, %(member_id)s, %(source)s, %(at)s)
RETURNING id;

-- name: select_account_for_update
-- Locked, so that two suspensions (or a suspension and a resumption) of one account are
-- applied one after the other and each records a change only if it made one.
SELECT id, ref, name, plan, country, timezone, signed_up_on, status, created_at
FROM accounts WHERE ref = %(ref)s
FOR UPDATE;

-- name: update_account_status
UPDATE accounts SET status = %(status)s WHERE id = %(account_id)s;

-- name: insert_account_status_change
INSERT INTO account_status_changes (account_id, status, reason, source, changed_at)
VALUES (%(account_id)s, %(status)s, %(reason)s, %(source)s, %(at)s);

-- name: select_account_status_changes
SELECT status, reason, source, changed_at
FROM account_status_changes
WHERE account_id = %(account_id)s
ORDER BY changed_at DESC, id DESC
LIMIT %(limit)s;
