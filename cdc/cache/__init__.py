"""I/O with Redis for the apply path: the pipelined
connection (:mod:`.wire`), the fenced sink that applies a batch with its checkpoint
(:mod:`.sink`) and the checkpoint's format in ``cdc:state`` (:mod:`.checkpoint`).
May import the pure stages, ``cdc.errors`` and ``schema``; never PostgreSQL."""
