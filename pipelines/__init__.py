"""The deployable stream pipelines: faust-streaming apps over Kafka (fleet mode).

They run the same processors as the embedded agent (:mod:`aegis_stream.processors`).
This folder is deliberately not installed into site-packages (a top-level package named
``pipelines`` would collide); ``aegis fleet worker`` loads it from the checkout or the
package's data.
"""
