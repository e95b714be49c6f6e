-- Closed months (SPEC C1, M5): one final statement per account and month, its priced lines
-- and the evidence for each class's peak. Only final statements are stored; the open month's
-- preliminary figures are computed on demand and never written.

CREATE TABLE statements (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id       bigint NOT NULL REFERENCES accounts (id),
    -- The billing month, as its first day; its bounds are in the account's time zone.
    month            date NOT NULL CHECK (extract(day FROM month) = 1),
    timezone         text NOT NULL,
    period_start     timestamptz NOT NULL,
    period_end       timestamptz NOT NULL,
    plan             text NOT NULL,
    currency         text NOT NULL,
    subtotal         numeric NOT NULL,
    tax_rate         numeric NOT NULL DEFAULT 0,
    tax              numeric NOT NULL DEFAULT 0,
    credits_applied  numeric NOT NULL DEFAULT 0,
    amount_due       numeric NOT NULL,
    due_date         date NOT NULL,
    status           text NOT NULL DEFAULT 'final' CHECK (status = 'final'),
    closed_at        timestamptz NOT NULL DEFAULT now(),
    -- Which process closed it ("host:pid"), for the operator reading two schedulers' logs.
    closed_by        text NOT NULL,
    CHECK (period_start < period_end),
    -- Idempotent close: a second close of the same month cannot add a second statement.
    UNIQUE (account_id, month)
);
CREATE INDEX statements_month ON statements (month, account_id);

CREATE TABLE statement_lines (
    statement_id  bigint NOT NULL REFERENCES statements (id),
    line_no       integer NOT NULL CHECK (line_no >= 1),
    kind          text NOT NULL CHECK (kind IN ('usage', 'base_fee', 'discount', 'adjustment')),
    device_class  text,
    description   text NOT NULL,
    quantity      integer NOT NULL,
    unit_price    numeric NOT NULL,
    amount        numeric NOT NULL,
    tier          integer,
    tier_from     integer,
    tier_to       integer,
    PRIMARY KEY (statement_id, line_no)
);

-- The final peak per class and the exact devices that made it up, so that a disputed bill
-- can be answered with device ids rather than a number.
CREATE TABLE statement_peaks (
    statement_id  bigint NOT NULL REFERENCES statements (id),
    device_class  text NOT NULL,
    peak          integer NOT NULL CHECK (peak >= 0),
    peak_at       timestamptz NOT NULL,
    device_ids    text[] NOT NULL,
    PRIMARY KEY (statement_id, device_class),
    CHECK (cardinality(device_ids) = peak)
);

-- M5: a final statement never changes. Corrections are adjustment lines on a later
-- statement (C2), never edits of this one.
CREATE FUNCTION devmeter_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'devmeter: % rows are final and never change', TG_TABLE_NAME
        USING ERRCODE = 'restrict_violation';
END;
$$;
CREATE TRIGGER statements_final BEFORE UPDATE OR DELETE ON statements
    FOR EACH ROW EXECUTE FUNCTION devmeter_refuse_change();
CREATE TRIGGER statement_lines_final BEFORE UPDATE OR DELETE ON statement_lines
    FOR EACH ROW EXECUTE FUNCTION devmeter_refuse_change();
CREATE TRIGGER statement_peaks_final BEFORE UPDATE OR DELETE ON statement_peaks
    FOR EACH ROW EXECUTE FUNCTION devmeter_refuse_change();
-- TRUNCATE bypasses row triggers; refuse it too.
CREATE TRIGGER statements_no_truncate BEFORE TRUNCATE ON statements
    FOR EACH STATEMENT EXECUTE FUNCTION devmeter_refuse_change();

-- A failed close of one account is recorded and retried by the scheduler; it does not stop
-- the other accounts. Rows are removed when the month closes.
CREATE TABLE close_failures (
    account_id    bigint NOT NULL REFERENCES accounts (id),
    month         date NOT NULL,
    attempts      integer NOT NULL DEFAULT 1,
    last_error    text NOT NULL,
    last_attempt  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, month)
);

-- Webhook pushes of closed statements to the billing system (C3): one delivery per statement
-- and target, retried with back-off; every attempt is logged.
CREATE TABLE webhook_deliveries (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    statement_id     bigint NOT NULL REFERENCES statements (id),
    url              text NOT NULL,
    idempotency_key  text NOT NULL,
    status           text NOT NULL DEFAULT 'pending'
                     CHECK (status IN ('pending', 'delivered', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    delivered_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    UNIQUE (statement_id, url)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';

CREATE TABLE webhook_attempts (
    delivery_id   bigint NOT NULL REFERENCES webhook_deliveries (id),
    attempt       integer NOT NULL,
    attempted_at  timestamptz NOT NULL,
    status_code   integer,
    error         text,
    duration_ms   integer NOT NULL,
    PRIMARY KEY (delivery_id, attempt)
);
