-- The buyer's details as the invoice was issued (issue "What finance
-- expects of a billing system"): the customer record's name, tax id and
-- billing email at the close, one per line, frozen with the invoice so that
-- a later change of the record never changes an issued document. Empty for
-- customers without a record and for invoices issued before. One ALTER;
-- the migration runner treats "column already exists" as applied.
ALTER TABLE invoices
    ADD COLUMN buyer String DEFAULT '';
