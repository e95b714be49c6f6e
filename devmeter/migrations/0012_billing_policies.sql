-- Issue 10: what the customer owes. Plan history (P6), credit points (P4), adjustment lines
-- for late heartbeats (C2). Statements closed before this migration keep their bytes: nothing
-- here rewrites a statement row, and `format_version` tells the export which columns they had.

-- P6: every plan an account has been on, with the instant it took effect. A month is priced at
-- the plan in force at its first instant; `accounts.plan` stays the plan in force now (what the
-- service enforces at once). The sign-up plan is the first row, in force from the first instant
-- of the sign-up day, so the sign-up month is priced at it even though it began earlier.
CREATE TABLE plan_changes (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id    bigint NOT NULL REFERENCES accounts (id),
    plan          text NOT NULL,
    effective_at  timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    -- Who asked: 'sign-up', 'cli', 'operator', 'member:<id>', 'console:<id>'.
    changed_by    text NOT NULL
);
CREATE INDEX plan_changes_account ON plan_changes (account_id, effective_at, id);

INSERT INTO plan_changes (account_id, plan, effective_at, changed_by)
SELECT id, plan, (signed_up_on::timestamp AT TIME ZONE timezone), 'sign-up'
FROM accounts;

-- P4: the credit point ledger. A grant adds points (positive), a use or an expiry takes them
-- (negative) from one grant, so a grant's remainder is its points plus its entries. The
-- balance is the sum of an account's entries; closes lock the account row while they take
-- points, which keeps it from going negative when two closes race.
CREATE TABLE credit_ledger (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id    bigint NOT NULL REFERENCES accounts (id),
    kind          text NOT NULL CHECK (kind IN ('grant', 'use', 'expiry')),
    -- In points: 1 point = 1 minor unit of the account's currency (1 JPY, 1 US cent).
    points        bigint NOT NULL,
    -- When it happened: a grant's instant (may be given), a use's close, an expiry's first
    -- instant after its last day.
    entry_at      timestamptz NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    grant_id      bigint REFERENCES credit_ledger (id),
    -- Grants only: the last day (inclusive, in the account's time zone) the points pay for.
    expires_on    date,
    reason        text CHECK (length(reason) <= 500),
    statement_id  bigint REFERENCES statements (id),
    CHECK (
        (kind = 'grant' AND points > 0 AND grant_id IS NULL AND statement_id IS NULL)
        OR (kind = 'use' AND points < 0 AND grant_id IS NOT NULL AND statement_id IS NOT NULL
            AND expires_on IS NULL)
        OR (kind = 'expiry' AND points < 0 AND grant_id IS NOT NULL AND statement_id IS NULL
            AND expires_on IS NULL)
    )
);
CREATE INDEX credit_ledger_account ON credit_ledger (account_id, id);
CREATE INDEX credit_ledger_grant ON credit_ledger (grant_id) WHERE grant_id IS NOT NULL;
-- A grant expires once.
CREATE UNIQUE INDEX credit_ledger_one_expiry ON credit_ledger (grant_id) WHERE kind = 'expiry';
CREATE TRIGGER credit_ledger_final BEFORE UPDATE OR DELETE ON credit_ledger
    FOR EACH ROW EXECUTE FUNCTION devmeter_refuse_change();

-- C2: an adjustment line names the closed month and class it corrects, the quantities billed
-- and corrected, and the tax rate of the month it corrects (it is taxed like that month).
ALTER TABLE statement_lines
    ADD COLUMN corrects_month date CHECK (extract(day FROM corrects_month) = 1),
    ADD COLUMN billed_quantity integer,
    ADD COLUMN corrected_quantity integer,
    ADD COLUMN tax_rate numeric,
    ADD CONSTRAINT statement_lines_adjustment CHECK (
        (kind = 'adjustment') = (corrects_month IS NOT NULL)
    );

-- The export's shape for a statement: 1 = closed before this migration (its bytes are kept
-- as they were), 2 = with tax rate and adjustment columns. Existing rows get 1, new ones 2.
ALTER TABLE statements ADD COLUMN format_version smallint NOT NULL DEFAULT 1;
ALTER TABLE statements ALTER COLUMN format_version SET DEFAULT 2;

-- Late events (C2): an event stored for a month already closed is noted as it is stored, so
-- the account's next close (and its preliminary usage) finds the closed months to recompute
-- without reading the month's events. Rare by nature; one indexed lookup per state event.
CREATE TABLE late_events (
    account_id   bigint NOT NULL,
    event_time   timestamptz NOT NULL,
    received_at  timestamptz NOT NULL
);
CREATE INDEX late_events_account ON late_events (account_id, received_at);

CREATE FUNCTION devmeter_note_late_event() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (
        SELECT 1 FROM statements s
        WHERE s.account_id = NEW.account_id AND s.period_end > NEW.time
    ) THEN
        INSERT INTO late_events (account_id, event_time, received_at)
        VALUES (NEW.account_id, NEW.time, NEW.received_at);
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER device_state_events_late AFTER INSERT ON device_state_events
    FOR EACH ROW EXECUTE FUNCTION devmeter_note_late_event();

-- An event stored while a close was committing cannot see that close's statement: the close
-- also reads the events received around its previous close, through this small index.
CREATE INDEX device_state_events_received ON device_state_events USING brin (received_at);
