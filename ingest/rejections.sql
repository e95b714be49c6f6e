-- Reading the quarantine (rejected_heartbeats) back: GET /v1/rejections, `devmeter rejections
-- list`, the console's page and the API's /metrics. Only ingest/writer.py writes it.
--
-- An account's rows are read through rejected_heartbeats_account (account_id, received_at)
-- WHERE account_id IS NOT NULL, newest first; rows with no account (unknown topics and
-- devices) are the operator's and are read only by the *_unattributed queries.

-- name: select_account_rejections
-- One page, newest first. The cursor is the last row of the previous page: rows strictly
-- before it in (received_at, id) order. `received_at <= after_at` repeats the row comparison's
-- first column so that it is an index condition; ties on received_at are ordered by id.
SELECT id, received_at, topic, reason, detail, account_id, device_id, payload
FROM rejected_heartbeats
WHERE account_id = %(account_id)s
  AND (%(reason)s::text IS NULL OR reason = %(reason)s)
  AND (%(device_id)s::text IS NULL OR device_id = %(device_id)s)
  AND (%(since)s::timestamptz IS NULL OR received_at >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR received_at < %(until)s)
  AND (%(after_at)s::timestamptz IS NULL
       OR (received_at <= %(after_at)s AND (received_at, id) < (%(after_at)s, %(after_id)s)))
ORDER BY received_at DESC, id DESC
LIMIT %(limit)s;

-- name: count_account_rejections_by_reason
-- Per reason, over the filter window (device, since, until; not the reason filter, so the
-- other reasons stay visible), counting at most the newest %(cap)s rows: `beyond` says
-- whether older ones were left out. Bounded however much an account's fleet got refused.
SELECT reason,
       count(*) FILTER (WHERE n <= %(cap)s) AS rejections,
       bool_or(n > %(cap)s) AS beyond
FROM (
    SELECT reason, row_number() OVER (ORDER BY received_at DESC) AS n
    FROM rejected_heartbeats
    WHERE account_id = %(account_id)s
      AND (%(device_id)s::text IS NULL OR device_id = %(device_id)s)
      AND (%(since)s::timestamptz IS NULL OR received_at >= %(since)s)
      AND (%(until)s::timestamptz IS NULL OR received_at < %(until)s)
    ORDER BY received_at DESC
    LIMIT %(cap)s + 1
) newest
GROUP BY reason;

-- name: select_unattributed_rejections
-- The operator's rows: topics that name no registered device. Through rejected_heartbeats_
-- received (received_at), newest first.
SELECT id, received_at, topic, reason, detail, account_id, device_id, payload
FROM rejected_heartbeats
WHERE account_id IS NULL
  AND (%(reason)s::text IS NULL OR reason = %(reason)s)
  AND (%(since)s::timestamptz IS NULL OR received_at >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR received_at < %(until)s)
  AND (%(after_at)s::timestamptz IS NULL
       OR (received_at <= %(after_at)s AND (received_at, id) < (%(after_at)s, %(after_id)s)))
ORDER BY received_at DESC, id DESC
LIMIT %(limit)s;

-- name: count_unattributed_rejections_by_reason
SELECT reason,
       count(*) FILTER (WHERE n <= %(cap)s) AS rejections,
       bool_or(n > %(cap)s) AS beyond
FROM (
    SELECT reason, row_number() OVER (ORDER BY received_at DESC) AS n
    FROM rejected_heartbeats
    WHERE account_id IS NULL
      AND (%(since)s::timestamptz IS NULL OR received_at >= %(since)s)
      AND (%(until)s::timestamptz IS NULL OR received_at < %(until)s)
    ORDER BY received_at DESC
    LIMIT %(cap)s + 1
) newest
GROUP BY reason;

-- name: select_all_rejections
-- The operator's view of everything, every account's and the unattributed, newest first
-- (`devmeter rejections list` without --account). Through rejected_heartbeats_received.
SELECT id, received_at, topic, reason, detail, account_id, device_id, payload
FROM rejected_heartbeats
WHERE (%(reason)s::text IS NULL OR reason = %(reason)s)
  AND (%(since)s::timestamptz IS NULL OR received_at >= %(since)s)
  AND (%(until)s::timestamptz IS NULL OR received_at < %(until)s)
  AND (%(after_at)s::timestamptz IS NULL
       OR (received_at <= %(after_at)s AND (received_at, id) < (%(after_at)s, %(after_id)s)))
ORDER BY received_at DESC, id DESC
LIMIT %(limit)s;

-- name: count_all_rejections_by_reason
SELECT reason,
       count(*) FILTER (WHERE n <= %(cap)s) AS rejections,
       bool_or(n > %(cap)s) AS beyond
FROM (
    SELECT reason, row_number() OVER (ORDER BY received_at DESC) AS n
    FROM rejected_heartbeats
    WHERE (%(since)s::timestamptz IS NULL OR received_at >= %(since)s)
      AND (%(until)s::timestamptz IS NULL OR received_at < %(until)s)
    ORDER BY received_at DESC
    LIMIT %(cap)s + 1
) newest
GROUP BY reason;

-- name: count_rejections_by_reason
-- Every rejection ever stored, per reason, for /metrics. Rows are never deleted by the
-- service (it may not), so these totals only grow: a Prometheus counter. An index-only scan
-- of rejected_heartbeats_reason (reason, received_at).
SELECT reason, count(*) AS rejections
FROM rejected_heartbeats
GROUP BY reason;
