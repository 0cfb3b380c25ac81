"""The support desk's ticket API without dual writes: see :mod:`examples.support_api.app`."""
