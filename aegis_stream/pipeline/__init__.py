"""The event pipeline: ring records in, versioned events out, every loss counted.

Readers drain the kernel rings (``aegis_stream.kernel.ringbuf``), decode and normalise
records into :mod:`~aegis_stream.pipeline.schema` Structs (``normalise``), feed the
engine-independent :mod:`aegis_stream.processors`, and write batches to sinks
(``sinks``); ``metrics`` exports the statistics of every stage to Prometheus.
"""
