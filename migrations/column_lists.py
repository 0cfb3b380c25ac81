"""Columns that never leave PostgreSQL: publication column lists, column grants, and the
event triggers that keep both in step with ``ALTER TABLE``.

A tracked table with ``excluded_columns`` (``agents.password_hash``, :mod:`schema.keys`) is
published with a column list of every other column (PostgreSQL 15+), so the excluded
values are never decoded into the replication stream; the daemon's role is granted
``SELECT`` on those columns only. A column list is fixed, though: a column added later is
not published by itself, and a column in the list cannot be dropped. So the migration
installs two event triggers on ``ALTER TABLE``:

- ``ddl_command_start``, when the statement names the table: its publication entries lose
  their column list for the duration of the statement (so ``DROP COLUMN`` is allowed);
  which publications had one is remembered in a transaction-local setting;
- ``ddl_command_end``: every such entry gets its list back, recomputed from the table's
  columns now (a new column is published, a dropped one is gone), and every role holding
  column-level ``SELECT`` on the table is granted the new columns (never the excluded ones).

Both run inside the ``ALTER TABLE``'s own transaction, before any row of the table can be
written with the new definition, so nothing excluded is ever published. Event triggers need
a superuser to create; without one the migration warns and ``SELECT public.cdc_sync_column_lists()``
does the ``ddl_command_end`` part by hand (see the README).
"""

from __future__ import annotations

from schema.keys import TRACKED_TABLES


def _excluded_values() -> str:
    rows = [
        f"('{t.schema}.{t.name}', ARRAY[{', '.join(repr(c) for c in sorted(t.excluded_columns))}])"
        for t in TRACKED_TABLES
        if t.excluded_columns
    ]
    return ", ".join(rows)


def protected_tables() -> list[tuple[str, str, list[str]]]:
    """(schema, table, excluded columns) of every tracked table with excluded columns."""
    return [
        (t.schema, t.name, sorted(t.excluded_columns)) for t in TRACKED_TABLES if t.excluded_columns
    ]


def functions_sql() -> str:
    """The functions (any owner may create them)."""
    excluded = _excluded_values()
    return f"""
CREATE OR REPLACE FUNCTION public.cdc_protected_tables()
RETURNS TABLE (rel regclass, excluded text[])
LANGUAGE sql STABLE SET search_path = pg_catalog AS $f$
    SELECT to_regclass(t.name), t.excluded
    FROM (VALUES {excluded}) AS t(name, excluded)
    WHERE to_regclass(t.name) IS NOT NULL
$f$;

CREATE OR REPLACE FUNCTION public.cdc_published_columns(rel regclass, excluded text[])
RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog AS $f$
    SELECT string_agg(quote_ident(a.attname), ', ' ORDER BY a.attnum)
    FROM pg_attribute a
    WHERE a.attrelid = rel AND a.attnum > 0 AND NOT a.attisdropped
      AND a.attgenerated = '' AND a.attname <> ALL (excluded)
$f$;

-- Give every publication entry of a protected table its column list back (recomputed),
-- and grant new columns to the roles that hold column-level SELECT on the table.
CREATE OR REPLACE FUNCTION public.cdc_sync_column_lists(extra_publications text[] DEFAULT '{{}}')
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
DECLARE
    t record;
    p record;
    g record;
    cols text;
BEGIN
    FOR t IN SELECT * FROM public.cdc_protected_tables() LOOP
        cols := public.cdc_published_columns(t.rel, t.excluded);
        FOR p IN
            SELECT DISTINCT pub.pubname FROM pg_publication pub
            WHERE pub.pubname = ANY (extra_publications)
               OR EXISTS (SELECT 1 FROM pg_publication_rel pr
                          WHERE pr.prpubid = pub.oid AND pr.prrelid = t.rel
                            AND pr.prattrs IS NOT NULL)
        LOOP
            EXECUTE format('ALTER PUBLICATION %I DROP TABLE %s', p.pubname, t.rel);
            EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s (%s)', p.pubname, t.rel, cols);
        END LOOP;
        FOR g IN
            SELECT DISTINCT acl.grantee
            FROM pg_attribute a, aclexplode(a.attacl) acl
            WHERE a.attrelid = t.rel AND a.attnum > 0 AND NOT a.attisdropped
              AND acl.privilege_type = 'SELECT' AND acl.grantee <> 0
              AND NOT has_table_privilege(acl.grantee, t.rel, 'SELECT')
        LOOP
            EXECUTE format('GRANT SELECT (%s) ON %s TO %I', cols, t.rel,
                           (SELECT rolname FROM pg_roles WHERE oid = g.grantee));
        END LOOP;
    END LOOP;
END
$f$;

-- Publications whose entry for a protected table has a column list.
CREATE OR REPLACE FUNCTION public.cdc_listed_publications(rel regclass)
RETURNS text[]
LANGUAGE sql STABLE SET search_path = pg_catalog AS $f$
    SELECT coalesce(array_agg(pub.pubname::text), '{{}}')
    FROM pg_publication pub JOIN pg_publication_rel pr ON pr.prpubid = pub.oid
    WHERE pr.prrelid = rel AND pr.prattrs IS NOT NULL
$f$;

CREATE OR REPLACE FUNCTION public.cdc_column_lists_start()
RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
DECLARE
    t record;
    pubs text[];
    lifted text[] := '{{}}';
    pub text;
BEGIN
    FOR t IN SELECT * FROM public.cdc_protected_tables() LOOP
        -- Only statements that can name the table (cheap test before any catalog work).
        CONTINUE WHEN position(lower((SELECT c.relname::text FROM pg_class c
                                      WHERE c.oid = t.rel)) IN lower(current_query())) = 0;
        pubs := public.cdc_listed_publications(t.rel);
        FOREACH pub IN ARRAY pubs LOOP
            EXECUTE format('ALTER PUBLICATION %I DROP TABLE %s', pub, t.rel);
            EXECUTE format('ALTER PUBLICATION %I ADD TABLE %s', pub, t.rel);
            lifted := lifted || pub;
        END LOOP;
    END LOOP;
    IF cardinality(lifted) > 0 THEN
        PERFORM set_config('cdc.lifted_publications', array_to_string(lifted, ','), true);
    END IF;
END
$f$;

CREATE OR REPLACE FUNCTION public.cdc_column_lists_end()
RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $f$
DECLARE
    lifted text := coalesce(current_setting('cdc.lifted_publications', true), '');
BEGIN
    IF lifted = '' AND NOT EXISTS (
        SELECT 1 FROM pg_event_trigger_ddl_commands() c
        WHERE c.objid IN (SELECT rel FROM public.cdc_protected_tables())
    ) THEN
        RETURN;
    END IF;
    PERFORM set_config('cdc.lifted_publications', '', true);
    PERFORM public.cdc_sync_column_lists(string_to_array(nullif(lifted, ''), ','));
END
$f$;
"""


TRIGGERS_SQL = """
CREATE EVENT TRIGGER cdc_column_lists_start ON ddl_command_start
    WHEN TAG IN ('ALTER TABLE') EXECUTE FUNCTION public.cdc_column_lists_start();
CREATE EVENT TRIGGER cdc_column_lists_end ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE') EXECUTE FUNCTION public.cdc_column_lists_end();
"""

DROP_SQL = """
DROP EVENT TRIGGER IF EXISTS cdc_column_lists_start;
DROP EVENT TRIGGER IF EXISTS cdc_column_lists_end;
DROP FUNCTION IF EXISTS public.cdc_column_lists_start();
DROP FUNCTION IF EXISTS public.cdc_column_lists_end();
DROP FUNCTION IF EXISTS public.cdc_sync_column_lists(text[]);
DROP FUNCTION IF EXISTS public.cdc_listed_publications(regclass);
DROP FUNCTION IF EXISTS public.cdc_published_columns(regclass, text[]);
DROP FUNCTION IF EXISTS public.cdc_protected_tables();
"""
