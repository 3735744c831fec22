-- The current status of each facility: its newest transition. Never goes back in seq.
CREATE TABLE facility_status (
    facility_id   text        PRIMARY KEY,
    region_id     text        NOT NULL,
    status        text        NOT NULL CHECK (status IN ('ONLINE', 'OFFLINE')),
    open_sessions integer     NOT NULL,
    since         timestamptz NOT NULL,
    seq           bigint      NOT NULL,
    emitted_at    timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX facility_status_region ON facility_status (region_id);

-- Every transition once: (facility_id, seq) is unique, so a replay adds nothing.
CREATE TABLE facility_transitions (
    facility_id     text        NOT NULL,
    seq             bigint      NOT NULL,
    region_id       text        NOT NULL,
    status          text        NOT NULL CHECK (status IN ('ONLINE', 'OFFLINE')),
    open_sessions   integer     NOT NULL,
    since           timestamptz NOT NULL,
    emitted_at      timestamptz NOT NULL,
    kafka_partition integer     NOT NULL,
    kafka_offset    bigint      NOT NULL,
    PRIMARY KEY (facility_id, seq)
);
CREATE INDEX facility_transitions_since ON facility_transitions (facility_id, since);

-- Each transition with the time the next one ended it (NULL: still current).
CREATE VIEW facility_intervals AS
SELECT facility_id, region_id, status, seq, since AS started,
       lead(since) OVER (PARTITION BY facility_id ORDER BY seq) AS ended
FROM facility_transitions;

-- Seconds a facility was ONLINE within [t0, t1): "how long was facility X online yesterday".
CREATE FUNCTION online_seconds(facility text, t0 timestamptz, t1 timestamptz)
RETURNS double precision LANGUAGE sql STABLE
-- Resolve the view in the schema the migration ran in, whatever the caller's search_path.
SET search_path FROM CURRENT AS $$
    SELECT coalesce(sum(extract(epoch FROM
               least(coalesce(ended, now()), t1) - greatest(started, t0))), 0)::double precision
    FROM facility_intervals
    WHERE facility_id = facility AND status = 'ONLINE'
      AND started < t1 AND coalesce(ended, now()) > t0
$$;
