-- The services' role (what the writer library connects as): DML only.
--   No DDL, no REPLICATION, no TRUNCATE; sequences for ticket numbers and history ids.
-- Usage: psql -v role=cdc_service -v password="'…'" -f 20-cdc-service.sql <database>
\if :{?role}
\else
  \set role cdc_service
\endif
CREATE ROLE :"role" LOGIN PASSWORD :password;
GRANT USAGE ON SCHEMA public TO :"role";
GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO :"role";
REVOKE ALL ON public.alembic_version FROM :"role";
GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO :"role";
