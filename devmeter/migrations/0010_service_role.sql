-- Evidence nobody can rewrite (issue 9, part 7). The service logs in as a role that owns
-- nothing (granted by `devmeter migrate` after every run, devmeter/service_role.sql); what its
-- privileges cannot say is written here.

-- A final statement is complete when the transaction that closed it commits: no line or peak
-- may be added to it afterwards, by any role. The closing transaction is recorded on the
-- statement and every insert of lines or peaks is compared with it.
ALTER TABLE statements
    ADD COLUMN closed_xact xid8 NOT NULL DEFAULT pg_current_xact_id();

-- Set by the database, not by the inserting code: a statement cannot name a transaction to
-- come as the one that "closed" it.
CREATE FUNCTION devmeter_stamp_closing_xact() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.closed_xact := pg_current_xact_id();
    RETURN NEW;
END;
$$;
CREATE TRIGGER statements_closing_xact BEFORE INSERT ON statements
    FOR EACH ROW EXECUTE FUNCTION devmeter_stamp_closing_xact();

-- Statement-level, after the row-level foreign-key checks (so the statement exists and is
-- visible): one query per INSERT or COPY however many lines the close writes. A statement that
-- is not visible here (another transaction's, not yet committed) is refused too.
CREATE FUNCTION devmeter_refuse_late_statement_rows() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    late bigint;
BEGIN
    SELECT n.statement_id INTO late
    FROM new_rows n LEFT JOIN statements s ON s.id = n.statement_id
    WHERE s.closed_xact IS DISTINCT FROM pg_current_xact_id()
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'devmeter: statement % is final: no % can be added after the '
                        'transaction that closed it', late, TG_TABLE_NAME
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NULL;
END;
$$;
CREATE TRIGGER statement_lines_closed AFTER INSERT ON statement_lines
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION devmeter_refuse_late_statement_rows();
CREATE TRIGGER statement_peaks_closed AFTER INSERT ON statement_peaks
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION devmeter_refuse_late_statement_rows();

-- TRUNCATE skips row triggers; 0004 refused it on statements only.
CREATE TRIGGER statement_lines_no_truncate BEFORE TRUNCATE ON statement_lines
    FOR EACH STATEMENT EXECUTE FUNCTION devmeter_refuse_change();
CREATE TRIGGER statement_peaks_no_truncate BEFORE TRUNCATE ON statement_peaks
    FOR EACH STATEMENT EXECUTE FUNCTION devmeter_refuse_change();

-- Plain mode: the scheduler and the importer create month partitions, which only the owner of
-- the time series may do (CREATE TABLE, ATTACH PARTITION, moving rows out of the default
-- partition). The function runs with its owner's rights, with a search_path that a caller's
-- temporary objects cannot shadow; only the service role is granted EXECUTE (by migrate).
DO $$
BEGIN
    IF to_regprocedure('devmeter_ensure_month_partitions(regclass, timestamptz, timestamptz)')
       IS NOT NULL THEN
        ALTER FUNCTION devmeter_ensure_month_partitions(regclass, timestamptz, timestamptz)
            SECURITY DEFINER SET search_path = public, pg_temp;
        REVOKE ALL ON FUNCTION
            devmeter_ensure_month_partitions(regclass, timestamptz, timestamptz) FROM PUBLIC;
    END IF;
END;
$$;
