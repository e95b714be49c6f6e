-- Issue 11 (reads stay lean): events stored while a close was committing could not be seen by
-- its late-event trigger, so every read of the following month looked for them again in the
-- events received around that close (a BRIN range over all accounts' events, re-planned across
-- every partition: 4-8 ms a read). Once the margin after a close has passed, no such event can
-- still arrive; the scheduler then notes them in late_events once and records the sweep here,
-- and reads of that account only look at late_events. Append-only, as statements are.
CREATE TABLE racing_sweeps (
    statement_id  bigint PRIMARY KEY REFERENCES statements (id),
    swept_at      timestamptz NOT NULL DEFAULT now(),
    noted         integer NOT NULL
);
