-- Issue 12: contracts around the metered usage (seeds 003 and 004): a recurring fee and
-- committed devices billed in advance per monthly or annual term, renewing by itself.
-- (0016 and 0017 are other branches'; versions need not be contiguous.)
--
-- Nothing here is updated: a contract is its requests, replayed by metering/terms.py into
-- terms and charges; a charge, once issued, is final. So the service role's default grants
-- (SELECT, INSERT) are all it needs (devmeter/service_role.sql).

-- One row per contract an account has had; an account has at most one not yet ended (the
-- service checks under the account's row lock). Policy, currency and zone are the ones it
-- started with: its dates and amounts are read in them for as long as it runs.
CREATE TABLE contracts (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id   bigint NOT NULL REFERENCES accounts (id),
    policy       text NOT NULL CHECK (policy IN ('calendar', 'anniversary')),
    currency     text NOT NULL,
    timezone     text NOT NULL,
    started_at   timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX contracts_account ON contracts (account_id, started_at, id);

-- Every request, in the order made: the start, changes of plan or committed devices, term
-- switches, cancellations. `effect` and the term values compared are what the request
-- decided when it was made (at once; at the end of the term it was made in; at the end of
-- the following one), kept so that a replay gives the same answer whatever the catalog says
-- later. A request still waiting for its term's end is a scheduled change.
CREATE TABLE contract_changes (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    contract_id   bigint NOT NULL REFERENCES contracts (id),
    kind          text NOT NULL CHECK (kind IN ('start', 'change', 'switch', 'cancel')),
    requested_at  timestamptz NOT NULL,
    effect        text NOT NULL
                  CHECK (effect IN ('now', 'restart', 'term_end', 'following_term_end')),
    -- start, switch: the term asked for.
    term          text CHECK (term IN ('monthly', 'annual')),
    -- start, change: the plan and committed devices per class ({"lte-m": 10}).
    plan          text,
    commitments   jsonb,
    -- cancel: the first day of the last month of service, when one was named.
    end_after     date CHECK (extract(day FROM end_after) = 1),
    value_before  numeric,
    value_after   numeric,
    -- Who asked: 'cli', 'operator', 'member:<id>', 'console:<id>'.
    requested_by  text NOT NULL,
    recorded_at   timestamptz NOT NULL DEFAULT now(),
    CHECK (
        (kind = 'start' AND term IS NOT NULL AND plan IS NOT NULL AND commitments IS NOT NULL)
        OR (kind = 'change' AND plan IS NOT NULL AND commitments IS NOT NULL)
        OR (kind = 'switch' AND term IS NOT NULL)
        OR (kind = 'cancel' AND term IS NULL AND plan IS NULL)
    )
);
CREATE INDEX contract_changes_contract ON contract_changes (contract_id, requested_at, id);

-- Charges billed apart from the month's statement: each term's fee in advance, an increase's
-- proration, a refund. `key` names what a charge is for (a term's start, a request), unique
-- per contract: the scheduler and `devmeter charges issue` insert ON CONFLICT DO NOTHING, so
-- two issuers of the same term make one charge. Taxed one by one (SPEC P3: at the rate in
-- force on the day its period starts); credit points pay it when it is issued (P4).
CREATE TABLE charges (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id       bigint NOT NULL REFERENCES accounts (id),
    contract_id      bigint NOT NULL REFERENCES contracts (id),
    change_id        bigint REFERENCES contract_changes (id),
    key              text NOT NULL,
    kind             text NOT NULL CHECK (kind IN ('term_fee', 'proration', 'refund')),
    plan             text NOT NULL,
    term             text NOT NULL CHECK (term IN ('monthly', 'annual')),
    description      text NOT NULL,
    period_start     timestamptz NOT NULL,
    period_end       timestamptz NOT NULL,
    -- Prorations and refunds: `part` of `whole` months or seconds.
    part             bigint,
    whole            bigint,
    unit             text CHECK (unit IN ('months', 'seconds')),
    currency         text NOT NULL,
    amount           numeric NOT NULL,
    tax_rate         numeric NOT NULL,
    tax              numeric NOT NULL,
    credits_applied  numeric NOT NULL DEFAULT 0,
    amount_due       numeric NOT NULL,
    issued_at        timestamptz NOT NULL,
    due_date         date NOT NULL,
    recorded_at      timestamptz NOT NULL DEFAULT now(),
    -- Which process issued it ("host:pid"), as statements.closed_by.
    issued_by        text NOT NULL,
    CHECK (period_start < period_end),
    CHECK ((kind = 'term_fee') = (change_id IS NULL)),
    UNIQUE (contract_id, key)
);
CREATE INDEX charges_account ON charges (account_id, issued_at, id);
CREATE INDEX charges_issued ON charges (issued_at);

CREATE TRIGGER contracts_final BEFORE UPDATE OR DELETE ON contracts
    FOR EACH ROW EXECUTE FUNCTION devmeter_refuse_change();
CREATE TRIGGER contract_changes_final BEFORE UPDATE OR DELETE ON contract_changes
    FOR EACH ROW EXECUTE FUNCTION devmeter_refuse_change();
CREATE TRIGGER charges_final BEFORE UPDATE OR DELETE ON charges
    FOR EACH ROW EXECUTE FUNCTION devmeter_refuse_change();
CREATE TRIGGER contracts_no_truncate BEFORE TRUNCATE ON contracts
    FOR EACH STATEMENT EXECUTE FUNCTION devmeter_refuse_change();
CREATE TRIGGER contract_changes_no_truncate BEFORE TRUNCATE ON contract_changes
    FOR EACH STATEMENT EXECUTE FUNCTION devmeter_refuse_change();
CREATE TRIGGER charges_no_truncate BEFORE TRUNCATE ON charges
    FOR EACH STATEMENT EXECUTE FUNCTION devmeter_refuse_change();

-- P4: credit points pay a charge as they pay a statement: a use names one or the other.
ALTER TABLE credit_ledger ADD COLUMN charge_id bigint REFERENCES charges (id);
ALTER TABLE credit_ledger
    DROP CONSTRAINT credit_ledger_check,
    ADD CONSTRAINT credit_ledger_entry CHECK (
        (kind = 'grant' AND points > 0 AND grant_id IS NULL AND statement_id IS NULL
            AND charge_id IS NULL)
        OR (kind = 'use' AND points < 0 AND grant_id IS NOT NULL AND expires_on IS NULL
            AND num_nonnulls(statement_id, charge_id) = 1)
        OR (kind = 'expiry' AND points < 0 AND grant_id IS NOT NULL AND statement_id IS NULL
            AND charge_id IS NULL AND expires_on IS NULL)
    );

-- The month's peak above the committed devices, billed in arrears on the statement.
ALTER TABLE statement_lines
    DROP CONSTRAINT statement_lines_kind_check,
    ADD CONSTRAINT statement_lines_kind_check
        CHECK (kind IN ('usage', 'base_fee', 'discount', 'adjustment', 'overage'));

-- The webhook pushes each charge too, as it pushes each closed statement: a delivery is of
-- one or the other, once per URL.
ALTER TABLE webhook_deliveries
    ALTER COLUMN statement_id DROP NOT NULL,
    ADD COLUMN charge_id bigint REFERENCES charges (id),
    ADD CONSTRAINT webhook_deliveries_one_subject CHECK (num_nonnulls(statement_id, charge_id) = 1),
    ADD CONSTRAINT webhook_deliveries_charge_id_url_key UNIQUE (charge_id, url);
