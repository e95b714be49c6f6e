-- Sequence-gap reconciliation (`devmeter ingest gaps`). Read-only.

-- name: select_seq_gaps
-- Every device numbers its messages (`seq`); a gateway's message gives rows for its children
-- with the gateway's seq and reporter = the gateway, so sequences are per (device, reporter).
-- Over the heartbeats since %(since)s (by heartbeat time), each distinct seq is paired with the
-- one before it (lag, in seq order); a step of more than one is a gap, previous+1 .. seq-1
-- missing. DISTINCT: a seq stored twice (same seq, another ts) is one message here. What
-- cannot show: messages missing before the first or after the last seq in the window, and a
-- counter that restarted from 0 (its numbers overlap the old ones).
WITH seqs AS (
    SELECT DISTINCT device_id, reporter, seq
    FROM heartbeats
    WHERE account_id = %(account_id)s AND time >= %(since)s
), stepped AS (
    SELECT device_id, reporter, seq,
           lag(seq) OVER (PARTITION BY device_id, reporter ORDER BY seq) AS previous
    FROM seqs
)
SELECT device_id,
       reporter,
       sum(seq - previous - 1)::bigint AS missing,
       array_agg(ARRAY[previous + 1, seq - 1] ORDER BY seq) AS gaps
FROM stepped
WHERE seq > previous + 1
GROUP BY device_id, reporter
ORDER BY device_id, reporter;
