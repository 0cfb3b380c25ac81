-- The daemon's role: least privilege (reliability, "Security").
--   LOGIN REPLICATION to stream the slot; SELECT on the tracked tables only
--   (snapshots, backfills, verify), and on agents only column by column: never
--   password_hash (it never leaves PostgreSQL). Nothing else: it cannot write to PostgreSQL.
--   Columns added to agents later are granted by the migrations' event trigger
--   (or by SELECT cdc_sync_column_lists() where it could not be installed).
-- Usage: psql -v role=cdc_daemon -v password="'…'" -f 10-cdc-daemon.sql <database>
\if :{?role}
\else
  \set role cdc_daemon
\endif
CREATE ROLE :"role" LOGIN REPLICATION PASSWORD :password;
GRANT USAGE ON SCHEMA public TO :"role";
GRANT SELECT ON public.tickets TO :"role";
SELECT format('GRANT SELECT (%s) ON public.agents TO %I',
              string_agg(quote_ident(attname), ', ' ORDER BY attnum), :'role')
FROM pg_attribute
WHERE attrelid = 'public.agents'::regclass AND attnum > 0 AND NOT attisdropped
  AND attname <> 'password_hash'
\gexec
