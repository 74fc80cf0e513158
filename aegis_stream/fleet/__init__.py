"""Fleet streaming: decisions of many hosts over Apache Kafka.

``topics`` names the topics, keys and record headers; ``broker`` runs a local single-node
KRaft broker fetched from Maven Central (tests, the demo, development); ``sink`` is the
agent's Kafka sink (denies never lost: spooled while the broker is away); ``tail`` and
``ship`` are the consumers and the offline shipper.  The faust-streaming fleet worker
lives in ``pipelines/`` and runs the same :mod:`aegis_stream.processors` as the agent.
"""
