"""The serving gateway behind ``flowlane serve``: an agent behind an OpenAI-compatible HTTP API.

``gateway`` (the design, the HTTP server and ``serve``), ``app`` (the ASGI app and its handlers),
``config`` (``GatewayConfig``), ``admission`` (what a request passes before its agent runs),
``runs`` (one request's agent run: budgets, errors, cancellation), ``streaming`` (the SSE body),
``protocol`` (the pure OpenAI request and response translation), ``metrics`` (Prometheus series
and per-request token usage) and ``sandbox`` (where a served agent's python tool runs: a
supervised sandbox server child that dies with the gateway, or remote sandbox pods).
"""
