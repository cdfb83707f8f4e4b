-- 0005: when a device first uploaded KeyPackages (SPEC §12.29). That first upload is
-- what announces the device (DEVICE_ADDED) so members can add it to their MLS groups;
-- later top-ups must not announce it again. NULL: never uploaded.
-- (Numbered 0005: 0004 is taken by the admin sessions' migration on another branch.)
ALTER TABLE sessions ADD COLUMN key_packages_since_us INTEGER;
