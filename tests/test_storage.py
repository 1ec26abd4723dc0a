"""Every user path goes through diffjax.storage (etils.epath): checked in the source."""

from __future__ import annotations

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_local_file_api_on_user_paths():
    """User paths go through diffjax.storage (etils.epath): no os.path / open / os.makedirs /
    os.replace / pathlib in diffjax/ except on paths the code made itself, each marked `# local:`
    with the reason, and the modules that only ever touch the package's own files."""
    own_files_only = {"serving/protos.py", "compile_cache.py", "configuration.py", "interop/__init__.py", "storage.py"}
    pattern = re.compile(r"\bos\.path\.|(?<![\w.])open\(|os\.makedirs|os\.replace|\bpathlib\b|os\.listdir|os\.rename")
    offenders = []
    for root, _, files in os.walk(os.path.join(ROOT, "diffjax")):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, os.path.join(ROOT, "diffjax"))
            if not name.endswith(".py") or rel in own_files_only or "_pb2" in name:
                continue
            for number, line in enumerate(open(path), 1):
                code = line.split("#", 1)[0]
                if pattern.search(code) and "# local:" not in line:
                    offenders.append(f"{rel}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
