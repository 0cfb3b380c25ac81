-- The daemon's role: least privilege (reliability, "Security").
--   LOGIN REPLICATION to stream the slot; SELECT on the tracked tables only
--   (snapshots, backfills, verify). Nothing else: it cannot write to PostgreSQL.
-- Usage: psql -v role=cdc_daemon -v password="'…'" -f 10-cdc-daemon.sql <database>
\if :{?role}
\else
  \set role cdc_daemon
\endif
CREATE ROLE :"role" LOGIN REPLICATION PASSWORD :password;
GRANT USAGE ON SCHEMA public TO :"role";
GRANT SELECT ON public.tickets, public.agents TO :"role";
