"""Bazel's entry point for one pytest file: `pytest_main.py tests/test_x.py [pytest args]`.

tests/BUILD makes one py_test per test file; each runs this with its file as the argument, from
the runfiles tree, so the tests import the `diffjax` that Bazel built (//:diffjax).
"""

import importlib.util
import os
import sys

import pytest


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: pytest_main.py TEST_FILE [pytest args]", file=sys.stderr)
        return 2
    # No .pytest_cache in the (read-only) runfiles tree; test logs go to Bazel's outputs.
    args = ["-q", "-ra", "-p", "no:cacheprovider", *argv]
    # Which diffjax the tests get: Bazel's runfiles tree (//:diffjax), not an installed copy.
    spec = importlib.util.find_spec("diffjax")
    print(f"pytest_main: diffjax from {spec.origin if spec else None}", flush=True)
    xml = os.environ.get("XML_OUTPUT_FILE")
    if xml:
        args.append(f"--junitxml={xml}")
    return int(pytest.main(args))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
