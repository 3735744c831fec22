-- facility_status is updated in place, once per transition of a facility. With full pages
-- (fillfactor 100) the new version of a row lands on another page, and PostgreSQL then
-- writes a new entry into both of the table's indexes for every transition (3% of the
-- updates were HOT under `presence bench sink`). Half of each page kept free lets the new
-- version go next to the old one: a HOT update, no index entry, the dead version pruned
-- in place on a later visit. 50, not 70-90: a row is ~110 bytes, so half a page holds
-- ~35 new versions, enough for bursts and for dead versions a long console read keeps
-- alive. The cost is a table twice as large, one row per facility.
-- Existing pages fill to the new setting as rows move; nothing is rewritten here.
ALTER TABLE facility_status SET (fillfactor = 50);
