"""Generate the Python gRPC stubs from ``api/*.proto``: one command, byte-for-byte reproducible.

The stubs are committed so that a rollout or sandbox image needs no protoc at run time; a test
regenerates them into a temporary folder and fails when the committed files drift from the protos.
protoc writes ``import learner_pb2`` into the service stubs, which only works with ``api/`` on
``sys.path``; we rewrite those to package-relative imports so they work as ``flowlane.api``.
"""

from __future__ import annotations

import re
import tempfile
from importlib import resources
from pathlib import Path

from flowlane.api.errors import FlowlaneError

API_DIR = Path(__file__).resolve().parent

# `import learner_pb2 as learner__pb2` -> `from . import learner_pb2 as learner__pb2`
_BARE_PB2_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)


def proto_files(proto_dir: Path = API_DIR) -> list[Path]:
    return sorted(proto_dir.glob("*.proto"))


def generated_names(proto_dir: Path = API_DIR) -> list[str]:
    """The file names ``generate_protos`` writes for the protos in ``proto_dir``."""
    names = []
    for proto in proto_files(proto_dir):
        names += [f"{proto.stem}_pb2.py", f"{proto.stem}_pb2.pyi", f"{proto.stem}_pb2_grpc.py"]
    return sorted(names)


def generate_protos(out_dir: Path = API_DIR, proto_dir: Path = API_DIR) -> list[Path]:
    """Run protoc (grpcio-tools) on every ``*.proto`` in ``proto_dir``; return the files written.

    Files are passed by their bare names relative to ``proto_dir`` so that the descriptors
    embedded in the stubs do not depend on where the repository is checked out.
    """
    try:
        from grpc_tools import protoc
    except ImportError:
        raise FlowlaneError(
            "grpcio-tools is not installed: install the dev extra (pip install -e '.[dev]')"
        ) from None
    protos = proto_files(proto_dir)
    if not protos:
        raise FlowlaneError(f"no .proto files in {proto_dir}")
    well_known = resources.files("grpc_tools") / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="flowlane-protoc-") as tmp:
        args = [
            "grpc_tools.protoc",
            f"--proto_path={proto_dir}",
            f"--proto_path={well_known}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(p.name for p in protos),
        ]
        code = protoc.main(args)
        if code != 0:
            raise FlowlaneError(f"protoc failed (exit {code}) on {', '.join(p.name for p in protos)}: "
                                "fix the .proto errors printed above")
        written = []
        for produced in sorted(Path(tmp).iterdir()):
            text = produced.read_text()
            if produced.name.endswith("_pb2_grpc.py"):
                text = _BARE_PB2_IMPORT.sub(r"from . import \1 as \2", text)
            target = out_dir / produced.name
            target.write_text(text)
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate_protos():
        print(path)
