-- 0005 (PostgreSQL): when a device first uploaded KeyPackages; see 0005_devices.sqlite.sql.
ALTER TABLE sessions ADD COLUMN key_packages_since_us BIGINT;
