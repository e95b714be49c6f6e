-- Issue 10, items 8 and 9: payment methods (SPEC A2) and suspension (A3).
-- (0012 is another branch's; versions need not be contiguous.)

-- Every payment method an account has registered, oldest first; the one in force is the
-- latest (created_at, then id). Replacing one appends a row instead of updating the last: the
-- history says what was on file when, and the service role needs no UPDATE or DELETE here.
-- `reference` is an opaque token of the payment provider (e.g. `pm_...`), never card data:
-- metering/accounts.py refuses anything that looks like a card number before it gets here.
CREATE TABLE payment_methods (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts (id),
    kind        text NOT NULL CHECK (kind IN ('card', 'invoice', 'convenience_store')),
    reference   text NOT NULL CHECK (length(reference) BETWEEN 1 AND 200),
    -- The owner who set it through the API or the console; NULL when the operator did (CLI).
    member_id   bigint REFERENCES members (id),
    source      text NOT NULL CHECK (source IN ('api', 'console', 'cli')),
    created_at  timestamptz NOT NULL
);
CREATE INDEX payment_methods_account ON payment_methods (account_id, created_at DESC, id DESC);

-- Every suspension and resumption by the operator, with its instant and reason. The account's
-- current status stays in accounts.status (read on every registration and activation); this
-- is its history, appended in the same transaction as the status changes.
CREATE TABLE account_status_changes (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id  bigint NOT NULL REFERENCES accounts (id),
    status      text NOT NULL CHECK (status IN ('active', 'suspended')),
    reason      text CHECK (length(reason) BETWEEN 1 AND 500),
    source      text NOT NULL CHECK (source IN ('api', 'cli')),
    changed_at  timestamptz NOT NULL
);
CREATE INDEX account_status_changes_account
    ON account_status_changes (account_id, changed_at DESC, id DESC);

-- History is never rewritten, by any role (the service role has no UPDATE or DELETE anyway).
CREATE TRIGGER payment_methods_append_only BEFORE UPDATE OR DELETE ON payment_methods
    FOR EACH ROW EXECUTE FUNCTION devmeter_refuse_change();
CREATE TRIGGER payment_methods_no_truncate BEFORE TRUNCATE ON payment_methods
    FOR EACH STATEMENT EXECUTE FUNCTION devmeter_refuse_change();
CREATE TRIGGER account_status_changes_append_only
    BEFORE UPDATE OR DELETE ON account_status_changes
    FOR EACH ROW EXECUTE FUNCTION devmeter_refuse_change();
CREATE TRIGGER account_status_changes_no_truncate BEFORE TRUNCATE ON account_status_changes
    FOR EACH STATEMENT EXECUTE FUNCTION devmeter_refuse_change();
