"""Generate the gRPC Python code in ``engine/api`` from ``proto/``.

Run ``python -m engine.serving.protogen`` after editing a .proto file; ``tests/test_protogen.py`` fails when
the committed code is stale. The generated ``*_grpc.py`` imports its messages as ``nba.v1``; we rewrite
that import to the package path so no ``sys.path`` tricks are needed.

``python -m engine.serving.protogen --release`` (when a version of the contract is released) also writes
its descriptors to ``proto/released/nba.v1.binpb``, what ``engine.serving.proto_compat`` checks later
changes against (proto/README.md).
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto"
OUT_DIR = ROOT / "engine" / "api"
CLIENT_DIR = ROOT / "proto" / "client" / "nba_client"  # the slim client package's copy (proto/client/)
PROTOS = ("nba/v1/nba.proto",)


def generate(package: str = "engine.api") -> dict[str, str]:
    """Run protoc and return {relative path: file text} of the code it produced, importing its messages
    from ``package``."""
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
            text = re.sub(r"^from nba\.v1 import", f"from {package}.nba.v1 import", text, flags=re.M)
            out[str(path.relative_to(tmp))] = text
        return out


def write(files: dict[str, str], out_dir: Path = OUT_DIR) -> None:
    for rel, text in files.items():
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    for pkg in (out_dir, out_dir / "nba", out_dir / "nba" / "v1"):
        (pkg / "__init__.py").touch()


def release() -> Path:
    """Record the contract in proto/ as the released one: its descriptor set in ``RELEASED``."""
    from engine.serving.proto_compat import RELEASED, descriptor_set

    RELEASED.parent.mkdir(parents=True, exist_ok=True)
    RELEASED.write_bytes(descriptor_set().SerializeToString(deterministic=True))
    return RELEASED


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    write(generate())
    write(generate("nba_client"), CLIENT_DIR)
    print(f"generated {', '.join(PROTOS)} into {OUT_DIR.relative_to(ROOT)} and {CLIENT_DIR.relative_to(ROOT)}",
          file=sys.stderr)
    if "--release" in args:
        print(f"released contract written to {release().relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
