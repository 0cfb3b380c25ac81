"""The CDC daemon: PostgreSQL logical replication (pgoutput) into Redis."""
