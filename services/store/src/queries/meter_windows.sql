-- A meter's values aggregated per window and group (OpenMeter's meter
-- query). Duplicated events count once (FINAL on customer, meter, source,
-- id). idlemeter-store fills the five parts in braces below from trusted
-- pieces, never from request text (see Store::query_meter): the window
-- start of a row, the subject or an empty string, the array of groupBy
-- values, the aggregate as text, and an optional subject filter; the
-- values are bound in the order their marks appear in the text. This
-- comment holds no placeholder mark and no braces: the client binds every
-- mark of the text, comments included.
SELECT
    {window} AS window_start_ms,
    {subject} AS subject_group,
    {groups} AS groups,
    {aggregate} AS value
FROM meter_values FINAL
WHERE customer = ? AND meter = ? AND time_ms >= ? AND time_ms < ?{filter}
GROUP BY window_start_ms, subject_group, groups
ORDER BY window_start_ms, subject_group, groups
