-- A device's id, account and class never change (D4: prices differ by class). State events copy
-- the class, and the month close reads each device's account and class from this row, so a
-- change would re-bill a device's history under another class: refused.
CREATE FUNCTION devmeter_refuse_identity_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'devmeter: a device''s id, account and class never change (device %)', OLD.id
        USING ERRCODE = 'restrict_violation';
END;
$$;
CREATE TRIGGER devices_identity_fixed BEFORE UPDATE OF id, account_id, device_class ON devices
    FOR EACH ROW
    WHEN (OLD.id IS DISTINCT FROM NEW.id
          OR OLD.account_id IS DISTINCT FROM NEW.account_id
          OR OLD.device_class IS DISTINCT FROM NEW.device_class)
    EXECUTE FUNCTION devmeter_refuse_identity_change();
