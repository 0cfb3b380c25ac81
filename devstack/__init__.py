"""Local servers and the ``make run`` orchestration (not part of the installed product's API).

:mod:`devstack.servers` starts private PostgreSQL and Redis processes for tests, benchmarks
and ``make run``.
"""
