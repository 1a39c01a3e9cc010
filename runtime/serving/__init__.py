"""The serving gateway behind ``flowlane serve``: an agent behind an OpenAI-compatible HTTP API.

``gateway`` (the ASGI app, its config and ``serve``), ``protocol`` (the pure OpenAI request and
response translation), ``metrics`` (Prometheus series and per-request token usage) and
``sandbox`` (where a served agent's python tool runs: a supervised sandbox server child or remote
sandbox pods).
"""
