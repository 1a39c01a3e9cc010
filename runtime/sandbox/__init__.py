"""The code sandbox: model-written Python under stacked isolation layers, and its gRPC server.

``runner`` (``run_python``, ``LocalCodeRunner``), ``layers`` (the isolation layers and
``Isolation``), ``limits`` (``SandboxLimits``), ``result`` (``SandboxResult`` and how a run's end
is classified), ``process_control`` (the per-run uid, killing what a run leaves),
``child_launch`` (what the child is prepared with, what it reports back), ``child`` (the
stdlib-only bootstrap each run starts in), ``landlock`` and ``seccomp`` (two of its kernel
layers) and ``server`` (``flowlane sandbox``: the gRPC service and ``RemoteCodeRunner``, its
client).

Nothing is imported here: the child imports ``child`` and ``landlock`` by file path under
``python -I -S`` (this package never runs there), and callers import the module they need.
"""
