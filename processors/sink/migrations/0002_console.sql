-- The operator console's reads: uptime computed in SQL from the transition history, and the
-- sessions open now (who is online).

-- A facility's time in [t0, t1) as spans of one status each, clipped to the range and to
-- now: the newest transition before t0 (the state the range starts in), then those inside.
-- region: only rows of that region (the one the caller was authorised for); NULL: all.
-- Time before the facility's first transition is in no span (unknown, not OFFLINE).
-- Two index range scans on (facility_id, since), whatever the length of the history.
CREATE FUNCTION facility_spans(facility text, region text, t0 timestamptz, t1 timestamptz)
RETURNS TABLE (status text, started timestamptz, ended timestamptz)
LANGUAGE sql STABLE
SET search_path FROM CURRENT AS $$
    SELECT status, greatest(since, t0), least(coalesce(next, now()), t1)
    FROM (
        SELECT status, since, lead(since) OVER (ORDER BY seq) AS next
        FROM ((SELECT status, since, seq FROM facility_transitions
               WHERE facility_id = facility AND (region IS NULL OR region_id = region) AND since < t0 ORDER BY since DESC, seq DESC LIMIT 1)
              UNION ALL
              (SELECT status, since, seq FROM facility_transitions
               WHERE facility_id = facility AND (region IS NULL OR region_id = region) AND since >= t0 AND since < t1)) r
    ) s
    WHERE least(coalesce(next, now()), t1) > greatest(since, t0)
$$;

-- ms since the epoch, as the API speaks.
CREATE FUNCTION epoch_ms(t timestamptz) RETURNS bigint LANGUAGE sql IMMUTABLE
AS $$ SELECT (extract(epoch FROM t) * 1000)::bigint $$;

-- One row per calendar day of [t0, t1) in time zone tz (an IANA name such as
-- 'Europe/Berlin'; days of 23 or 25 hours where the clock changes): seconds ONLINE, seconds
-- the history covers (known), and the OFFLINE spans within the day as [from_ms, to_ms]
-- pairs. known < the day's length: before the facility's first transition, or in the future.
CREATE FUNCTION facility_days(facility text, region text, t0 timestamptz, t1 timestamptz, tz text)
RETURNS TABLE (day date, online_seconds double precision, known_seconds double precision, outages jsonb)
LANGUAGE sql STABLE
SET search_path FROM CURRENT AS $$
    WITH days AS (
        SELECT d::date AS day,
               greatest(d AT TIME ZONE tz, t0) AS d0,
               least((d + interval '1 day') AT TIME ZONE tz, t1) AS d1
        FROM generate_series((t0 AT TIME ZONE tz)::date::timestamp,
                             ((t1 AT TIME ZONE tz) - interval '1 microsecond')::date::timestamp,
                             interval '1 day') AS d
    ), spans AS (
        SELECT * FROM facility_spans(facility, region, t0, t1)
    )
    SELECT days.day,
           coalesce(sum(extract(epoch FROM least(s.ended, days.d1) - greatest(s.started, days.d0)))
                    FILTER (WHERE s.status = 'ONLINE'), 0)::double precision,
           coalesce(sum(extract(epoch FROM least(s.ended, days.d1) - greatest(s.started, days.d0)))
                    FILTER (WHERE s.status IS NOT NULL), 0)::double precision,
           coalesce(jsonb_agg(jsonb_build_array(epoch_ms(greatest(s.started, days.d0)), epoch_ms(least(s.ended, days.d1)))
                              ORDER BY s.started) FILTER (WHERE s.status = 'OFFLINE'), '[]'::jsonb)
    FROM days LEFT JOIN spans s ON s.started < days.d1 AND s.ended > days.d0
    GROUP BY days.day
    ORDER BY days.day
$$;

-- Per region of `regions`: seconds ONLINE and seconds known of all its facilities from t0
-- until now ("the region's uptime over the last 24 h" = online / known). Set-based, one
-- pass over the transitions since t0 (a per-facility lookup of the state before t0 cost
-- 40 s at 50,000 facilities): transitions alternate, so the state before a facility's first
-- transition since t0 is the opposite of it (unknown for its first transition ever, seq 1),
-- and a facility without a transition since t0 was in its current state all along.
CREATE FUNCTION region_uptime(regions text[], t0 timestamptz)
RETURNS TABLE (region_id text, online_seconds double precision, known_seconds double precision)
LANGUAGE sql STABLE
SET search_path FROM CURRENT AS $$
    WITH f AS (
        SELECT facility_id, region_id, status, since FROM facility_status WHERE region_id = ANY(regions)
    ), w AS (
        SELECT t.facility_id, t.status, t.since, t.seq,
               lead(t.since) OVER (PARTITION BY t.facility_id ORDER BY t.seq) AS next,
               row_number() OVER (PARTITION BY t.facility_id ORDER BY t.seq) AS n
        FROM facility_transitions t JOIN f ON f.facility_id = t.facility_id AND f.region_id = t.region_id
        WHERE t.since >= t0
    ), spans AS (
        SELECT facility_id, status, since AS s, coalesce(next, now()) AS e FROM w
        UNION ALL
        SELECT facility_id, CASE status WHEN 'ONLINE' THEN 'OFFLINE' ELSE 'ONLINE' END, t0, since
        FROM w WHERE n = 1 AND seq > 1
        UNION ALL
        SELECT f.facility_id, f.status, t0, now() FROM f
        WHERE f.since < t0 AND NOT EXISTS (SELECT 1 FROM w WHERE w.facility_id = f.facility_id)
    )
    SELECT f.region_id,
           coalesce(sum(extract(epoch FROM spans.e - spans.s)) FILTER (WHERE spans.status = 'ONLINE'), 0)::double precision,
           coalesce(sum(extract(epoch FROM spans.e - spans.s)), 0)::double precision
    FROM spans JOIN f USING (facility_id)
    WHERE spans.e > spans.s
    GROUP BY f.region_id
$$;

-- The sessions open now, one row per session, from the processor's sessions changelog
-- (compacted, written transactionally with the session events: a row appears when a session
-- opens or moves and goes with its tombstone). Keyed as the changelog is: partition and key.
-- last_beat: the newest BEAT of the session the sink has read from `heartbeats`.
CREATE TABLE open_sessions (
    kafka_partition integer     NOT NULL,
    session_key     bytea       NOT NULL,
    session_id      text        NOT NULL,
    user_id         text        NOT NULL,
    facility_id     text        NOT NULL,
    region_id       text        NOT NULL,
    opened_at       timestamptz NOT NULL,
    last_beat       timestamptz NOT NULL,
    kafka_offset    bigint      NOT NULL,
    PRIMARY KEY (kafka_partition, session_key)
);
CREATE INDEX open_sessions_facility ON open_sessions (facility_id);
CREATE INDEX open_sessions_owner ON open_sessions (session_id, user_id);
