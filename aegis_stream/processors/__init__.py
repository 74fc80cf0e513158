"""Engine-independent stream processors.

Plain classes over an event stream: no trio, no Kafka, no clock of their own.  Each
takes its inputs (and the time, ``now`` in seconds on whatever clock the engine runs)
as arguments, returns what it emits, and keeps its state explicit and serialisable
(``snapshot()`` -> msgspec-encodable, ``restore()``), so the same logic runs embedded
in the trio agent (:mod:`aegis_stream.pipeline`) and in the faust-streaming fleet
pipelines over Kafka (``pipelines/`` at the repository root, a table per processor state).

* :mod:`~aegis_stream.processors.degraded` -- one protection state
  ``enforcing|auditing|degraded|blind`` with reasons, from hooks, mode, ring fill, consumer
  lag/progress, drops.
* :mod:`~aegis_stream.processors.slo` -- drop-ratio SLO per event class with multi-window
  burn-rate alerts (Google SRE workbook style).
* :mod:`~aegis_stream.processors.explain` -- the exact explanation of a decision from its
  generation record.
* :mod:`~aegis_stream.processors.sampling` -- deterministic 1-in-N sampling.
"""
