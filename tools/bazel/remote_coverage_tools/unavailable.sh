#!/bin/sh
# Offline stand-in: `bazel coverage` needs Bazel's real remote_coverage_tools (network).
echo "remote_coverage_tools is an offline stub: run 'bazel coverage' without --config=offline" >&2
exit 1
