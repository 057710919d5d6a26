"""Kafka for linewatch: the client helpers every service uses (``linewatch.kafka.io``) and the
local single-node KRaft broker run from the Maven Central jars (``linewatch.kafka.broker``).

The broker's data files sit beside them and ship with the package: ``pom.xml`` (what Maven
fetches), ``server.properties.template`` and ``log4j2.xml`` (rendered into the broker's home).
"""
