"""Model provisioning's command line: ``commands`` (``flowlane models``: import, list, verify).

The provisioning itself (known names, atomic imports, verification) is ``flowlane.kit.models``,
shared with the learner."""
