"""Print one extra's requirements from pyproject.toml, one per line, self-references expanded.

The gateway image is layered on the rollout image and installs only what its extra adds; an
extra such as ``gateway = ["flowlane[rollout,sandbox]", ...]`` names other extras, whose
requirements are listed too (pip skips the ones already installed).
Usage: python extra_requirements.py PYPROJECT EXTRA
"""

import re
import sys
import tomllib

with open(sys.argv[1], "rb") as file:
    extras = tomllib.load(file)["project"]["optional-dependencies"]
todo, seen, requirements = [sys.argv[2]], set(), []
while todo:
    name = todo.pop()
    if name in seen:
        continue
    seen.add(name)
    for requirement in extras[name]:
        match = re.fullmatch(r"flowlane\[(.+)\]", requirement.replace(" ", ""))
        if match:
            todo.extend(match.group(1).split(","))
        elif requirement not in requirements:
            requirements.append(requirement)
print("\n".join(requirements))
