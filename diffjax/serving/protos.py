"""Regenerate the checked-in gRPC stubs: `python -m diffjax.serving.protos [--check]`.

Uses grpcio-tools (pinned in the `test` extra, so regeneration is byte-for-byte reproducible);
--check compares a fresh generation with the checked-in files and exits 1 on any difference.
"""

from __future__ import annotations

import filecmp
import os
import sys
import tempfile

PROTO = "diffjax/serving/sampling.proto"
OUTPUTS = ("sampling_pb2.py", "sampling_pb2.pyi", "sampling_pb2_grpc.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def generate(out_root: str) -> list[str]:
    """Write the stubs under out_root/diffjax/serving/; returns their paths."""
    from grpc_tools import protoc

    args = [
        "protoc",
        f"-I{ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        os.path.join(ROOT, PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return [os.path.join(out_root, os.path.dirname(PROTO), name) for name in OUTPUTS]


def differences() -> list[str]:
    """Checked-in stubs that differ from a fresh generation."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(tmp)
        here = os.path.join(ROOT, os.path.dirname(PROTO))
        return [
            os.path.basename(f)
            for f in fresh
            if not os.path.exists(os.path.join(here, os.path.basename(f)))
            or not filecmp.cmp(f, os.path.join(here, os.path.basename(f)), shallow=False)
        ]


def main(argv: list[str]) -> int:
    if "--check" in argv:
        diff = differences()
        print("stubs up to date" if not diff else f"stale stubs: {diff}")
        return 1 if diff else 0
    for path in generate(ROOT):
        print("wrote", os.path.relpath(path, ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
