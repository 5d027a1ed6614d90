"""Seeing llmworker run: Prometheus metrics (``metrics``), the deployment-wide snapshot
that metrics, ``/v1/stats``, the dashboard and ``llmworker top`` read from Redis
(``snapshot``), provider health over every replica (``health``) and traces (``tracing``,
only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` asks for them)."""
