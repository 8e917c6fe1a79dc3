"""Generate the gRPC Python code in ``engine/api`` from ``proto/``.

Run ``python -m engine.serving.protogen`` after editing a .proto file; ``tests/test_protogen.py`` fails when
the committed code is stale. The generated ``*_grpc.py`` imports its messages as ``nba.v1``; we rewrite
that import to the package path so no ``sys.path`` tricks are needed.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "engine" / "api"
PROTOS = ("nba/v1/nba.proto",)


def generate() -> dict[str, str]:
    """Run protoc and return {relative path: file text} of the code it produced."""
    import grpc_tools
    from grpc_tools import protoc

    include = Path(grpc_tools.__file__).parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "protoc",
            f"-I{PROTO_DIR}",
            f"-I{include}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *PROTOS,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError("protoc failed")
        out = {}
        for path in sorted(Path(tmp).rglob("*.py*")):
            text = path.read_text()
            text = re.sub(r"^from nba\.v1 import", "from engine.api.nba.v1 import", text, flags=re.M)
            out[str(path.relative_to(tmp))] = text
        return out


def write(files: dict[str, str]) -> None:
    for rel, text in files.items():
        target = OUT_DIR / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    for pkg in (OUT_DIR, OUT_DIR / "nba", OUT_DIR / "nba" / "v1"):
        (pkg / "__init__.py").touch()


def main() -> int:
    write(generate())
    print(f"generated {', '.join(PROTOS)} into {OUT_DIR.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
