-- Monthly peak of Active devices (SPEC M1-M3), or distinct Active devices for the classes in
-- `distinct` (M6), in PostgreSQL: the twin of metering.peak.compute_peaks, held to the same
-- answers by tests/integration/test_peak_sql.py.

-- name: select_class_peaks
-- Every (account, class) with an event before `end`, for all `account_ids` at once (a month
-- close runs every account of one time zone in one statement): the peak, the first instant it
-- is reached, and the devices Active at that instant. One statement, so the peak and its
-- evidence come from one snapshot. Each device's events are sorted once.
WITH steps AS MATERIALIZED (
    -- Each event with the change it makes to its device's state and the instant the device's
    -- next event takes over (`until`, NULL for the rest of the month).
    -- History at or before the month's start collapses into its first instant: a device's state
    -- then is its latest event at or before `start` (D3, M2). Ties at one instant go to the
    -- higher id (D3); `active DESC` puts Inactive last only to settle exact duplicates, as
    -- compute_peaks does. Changes telescope: an instant's changes add up to its net change
    -- whatever their order within it (M3), and an event overtaken at its own instant holds for
    -- no time at all.
    -- Device ids are unique across accounts, so sorting by device first, in "C" (equality is
    -- all a partition needs), lets the sort decide most comparisons on a prefix of the id:
    -- twice as fast as account first.
    SELECT account_id, device_id, device_class, instant, active,
           active::int - coalesce(lag(active) OVER by_device, false)::int AS change,
           lag(active) OVER by_device IS NULL AS first_event,
           lead(instant) OVER by_device AS until
    FROM (
        SELECT account_id, device_id, device_class, time, id, state = 'active' AS active,
               greatest(time, %(start)s::timestamptz) AS instant
        FROM device_state_events
        WHERE account_id = ANY(%(account_ids)s::bigint[]) AND time < %(end)s::timestamptz
    ) month_events
    WINDOW by_device AS (
        PARTITION BY device_id COLLATE "C", account_id ORDER BY time, id, active DESC
    )
),
counts AS (
    -- The default RANGE frame sums every row up to and including the row's instant, so each
    -- row shows the count once its whole instant is applied (M3). Rows that change nothing
    -- are left out, except one per device so that a class never Active still shows up.
    SELECT account_id, device_class, instant,
           sum(change) OVER by_instant AS active_count
    FROM steps
    WHERE change <> 0 OR first_event
    WINDOW by_class AS (PARTITION BY account_id, device_class COLLATE "C"),
           by_instant AS (by_class ORDER BY instant)
),
peaks AS (
    -- The maximum and the first instant it is reached; a class never Active peaks at 0 at the
    -- month's start.
    SELECT account_id, device_class, peak,
           min(instant) FILTER (WHERE active_count = peak) AS peak_at
    FROM (
        SELECT account_id, device_class, instant, active_count,
               max(active_count) OVER (PARTITION BY account_id, device_class COLLATE "C")
                   AS peak
        FROM counts
    ) ranked
    GROUP BY account_id, device_class, peak
),
firsts AS (
    -- Distinct classes (M6): each device's first instant Active in the month, if any. A row
    -- says what the device is from its instant until the next row's; one overtaken at its own
    -- instant holds for no time, so a device switched on and off at one instant was never
    -- Active (M3). The constant condition lets the planner skip this when `distinct` is empty.
    SELECT account_id, device_class, device_id,
           min(instant) FILTER (WHERE active AND (until IS NULL OR until > instant))
               AS first_active
    FROM steps
    WHERE cardinality(%(distinct)s::text[]) > 0
      AND device_class = ANY(%(distinct)s::text[])
    GROUP BY account_id, device_class, device_id
)
SELECT p.account_id, p.device_class, p.peak::int AS peak,
       CASE WHEN p.peak > 0 THEN p.peak_at ELSE %(start)s::timestamptz END AS peak_at,
       coalesce(array_agg(s.device_id) FILTER (WHERE s.device_id IS NOT NULL), '{}')
           AS device_ids
FROM peaks p
LEFT JOIN steps s
       ON s.account_id = p.account_id AND s.device_class = p.device_class
      AND s.active AND s.instant <= p.peak_at AND (s.until IS NULL OR s.until > p.peak_at)
WHERE p.device_class <> ALL(%(distinct)s::text[])
GROUP BY p.account_id, p.device_class, p.peak, p.peak_at
UNION ALL
-- The count of a distinct class reaches its final value when the last of its devices first
-- becomes Active; a class none of whose devices was Active counts 0 at the month's start.
SELECT account_id, device_class, count(first_active)::int,
       coalesce(max(first_active), %(start)s::timestamptz),
       coalesce(array_agg(device_id) FILTER (WHERE first_active IS NOT NULL), '{}')
FROM firsts
GROUP BY account_id, device_class
ORDER BY account_id, device_class;

-- name: select_planner_settings
SELECT current_setting('work_mem') AS work_mem, current_setting('jit') AS jit;

-- name: set_local_planner_settings
SELECT set_config('work_mem', %(work_mem)s, true), set_config('jit', %(jit)s, true);
