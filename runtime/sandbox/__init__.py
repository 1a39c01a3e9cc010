"""The code sandbox: model-written Python under stacked isolation layers, and its gRPC server.

``runner`` (``run_python``, the limits, layers and results, ``LocalCodeRunner``), ``child`` (the
stdlib-only bootstrap each run starts in), ``landlock`` and ``seccomp`` (two of its kernel
layers) and ``server`` (``flowlane sandbox``: the gRPC service and ``RemoteCodeRunner``, its
client).

Nothing is imported here: the child imports ``child`` and ``landlock`` by file path under
``python -I -S`` (this package never runs there), and callers import the module they need.
"""
