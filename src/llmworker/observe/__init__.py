"""Seeing llmworker run:

- ``snapshot``  the deployment as Redis holds it, read in one round trip: what the
                metrics' gauges, ``/v1/stats``, the dashboard and ``top`` show
- ``metrics``   Prometheus metrics (``GET /metrics``)
- ``health``    provider health over every replica, counted in Redis
- ``tracing``   traces, only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` asks for them
- ``top``       ``llmworker top``: the client side, which needs no server package

The dashboard's page is ``web/dashboard.*``, served by ``pages.py``. Nothing is imported
here: ``llmworker top`` loads this package without the server's dependencies.
"""
