"""What a Cloud TPU is: accelerator types, the target (name, zone, project, slices) and the gcloud
commands that create, describe and delete it. Pure functions: each returns argv lists and raises
LaunchError on a bad argument, before any gcloud call. Used by launch.tpu and launch.supervise.

Multislice: N slices (`--num-slices N`, N >= 2) are one queued resource, created with
`gcloud compute tpus queued-resources create NAME --node-count=N --node-prefix=NAME`; its nodes
(one TPU VM slice each) are named NAME-0 .. NAME-(N-1) (the TPU API's MultisliceParams: "If
node_count = 3 and node_id_prefix = "np", node ids of nodes created will be "np-0", "np-1",
"np-2""). Every per-node command (setup, run, logs, stop, ssh) goes to each of those names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

GCLOUD = "gcloud"


class LaunchError(ValueError):
    """A bad launcher argument; reported as `launch.tpu: error: ...` before any gcloud call."""


# ---------------------------------------------------------------------------------------------
# Accelerator types.


@dataclass(frozen=True)
class Generation:
    """One TPU generation: its accelerator-type prefix, the sizes gcloud accepts, and hosts."""

    prefix: str
    sizes: tuple[int, ...]
    runtime: str  # default runtime (software) version for JAX
    single_host_max: int  # sizes up to this run on one TPU VM host
    per_host: int  # size units (TensorCores or chips) per host in multi-host slices
    multislice: bool = True  # Multislice: "TPU type (v4 or later)"

    def hosts(self, size: int) -> int:
        return 1 if size <= self.single_host_max else size // self.per_host


def _powers_of_two(lo: int, hi: int) -> tuple[int, ...]:
    out, n = [], lo
    while n <= hi:
        out.append(n)
        n *= 2
    return tuple(out)


# The size after the dash counts TensorCores for v2, v3, v4 and v5p (2 per chip, 4 chips per
# host: 8 per host) and chips for v5e ("v5litepod") and v6e (up to 8 chips on one host, 4 chips
# per host in larger slices). Runtime versions: the Cloud TPU "TPU software versions" page.
# TPU7x (Ironwood) is not listed: the Cloud TPU pages' banner says the Cloud TPU API (what
# `gcloud compute tpus tpu-vm` / `queued-resources` drive) is not supported on TPU7x and later,
# which are made through GKE or Compute Engine, and no Google page found gave its sizes here.
GENERATIONS: dict[str, Generation] = {
    "v2": Generation("v2", (8, 32, 128, 256, 512), "tpu-ubuntu2204-base", 8, 8, multislice=False),
    "v3": Generation("v3", (8, 32, 64, 128, 256, 512, 1024, 2048), "tpu-ubuntu2204-base", 8, 8, multislice=False),
    "v4": Generation("v4", _powers_of_two(8, 4096) + (1536,), "tpu-ubuntu2204-base", 8, 8),
    "v5litepod": Generation("v5litepod", (1, 4, 8, 16, 32, 64, 128, 256), "v2-alpha-tpuv5-lite", 8, 4),
    "v5p": Generation("v5p", _powers_of_two(8, 8192) + (12288,), "v2-alpha-tpuv5", 8, 8),
    "v6e": Generation("v6e", (1, 4, 8, 16, 32, 64, 128, 256), "v2-alpha-tpuv6e", 8, 4),
}
ALIASES = {"v5e": "v5litepod"}  # "v5e-32" is how people say it; gcloud wants "v5litepod-32"


@dataclass(frozen=True)
class Accelerator:
    type: str  # as gcloud wants it, e.g. "v4-32", "v5litepod-32"
    generation: Generation
    size: int

    @property
    def hosts(self) -> int:
        return self.generation.hosts(self.size)

    @property
    def multi_host(self) -> bool:
        return self.hosts > 1


def allowed_accelerator_types() -> str:
    rows = [f"{g.prefix}-{{{','.join(map(str, sorted(g.sizes)))}}}" for g in GENERATIONS.values()]
    return "; ".join(rows) + " (v5e-N means v5litepod-N)"


def parse_accelerator(text: str | None) -> Accelerator:
    """'v4-32' -> Accelerator; anything gcloud would not accept raises LaunchError."""
    if not text:
        raise LaunchError(f"--accelerator-type is required; allowed: {allowed_accelerator_types()}")
    match = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text.strip().lower())
    if match is None:
        raise LaunchError(f"--accelerator-type {text!r} is not GENERATION-SIZE; allowed: {allowed_accelerator_types()}")
    prefix, size = ALIASES.get(match.group(1), match.group(1)), int(match.group(2))
    generation = GENERATIONS.get(prefix)
    if generation is None:
        raise LaunchError(
            f"--accelerator-type {text!r}: unknown TPU generation {match.group(1)!r}; allowed: {allowed_accelerator_types()}"
        )
    if size not in generation.sizes:
        raise LaunchError(
            f"--accelerator-type {text!r}: {prefix} has no size {size}; allowed: "
            f"{prefix}-{{{','.join(map(str, sorted(generation.sizes)))}}}"
        )
    return Accelerator(f"{prefix}-{size}", generation, size)


# ---------------------------------------------------------------------------------------------
# The target: name, zone, project, slices.

ZONE_ENV = ("DIFFJAX_TPU_ZONE", "CLOUDSDK_COMPUTE_ZONE")
NAME_ENV = "DIFFJAX_TPU_NAME"
NAME_RE = r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?"


@dataclass(frozen=True)
class Target:
    name: str
    zone: str
    project: str | None = None
    num_slices: int = 1  # >= 2: a multislice queued resource whose nodes are NAME-0 .. NAME-(N-1)
    internal_ip: bool = False  # ssh / scp through the workers' internal IPs (gcloud --internal-ip)

    def flags(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

    @property
    def multislice(self) -> bool:
        return self.num_slices > 1

    @property
    def nodes(self) -> list[str]:
        """The TPU VM node names: NAME, or NAME-0 .. NAME-(N-1) as gcloud's --node-prefix makes them."""
        return [f"{self.name}-{i}" for i in range(self.num_slices)] if self.multislice else [self.name]


def resolve_target(
    name: str | None,
    zone: str | None,
    project: str | None,
    environ: Mapping[str, str] | None = None,
    *,
    num_slices: int | None = None,
    internal_ip: bool = False,
) -> Target:
    environ = os.environ if environ is None else environ
    name = name or environ.get(NAME_ENV)
    if not name:
        raise LaunchError(f"--name is required (or set {NAME_ENV}): the TPU VM's name")
    if not re.fullmatch(NAME_RE, name):
        raise LaunchError(f"--name {name!r}: lowercase letters, digits and '-', starting with a letter")
    zone = zone or next((environ[k] for k in ZONE_ENV if environ.get(k)), None)
    if not zone:
        raise LaunchError(
            f"--zone is required (or set {' or '.join(ZONE_ENV)}), e.g. us-central2-b for v4, us-west4-a for v5e"
        )
    if not re.fullmatch(r"[a-z]+(-[a-z]+)*\d+-[a-z]", zone):
        raise LaunchError(f"--zone {zone!r} is not a zone name like us-central2-b")
    slices = 1 if num_slices is None else num_slices
    if slices < 1:
        raise LaunchError(f"--num-slices {slices}: the number of TPU slices, 1 or more")
    if slices > 1 and not re.fullmatch(NAME_RE, f"{name}-{slices - 1}"):
        raise LaunchError(
            f"--name {name!r} is too long for --num-slices {slices}: its nodes are {name}-0 .. {name}-{slices - 1}"
        )
    return Target(name, zone, project or environ.get("CLOUDSDK_CORE_PROJECT") or None, slices, internal_ip)


# ---------------------------------------------------------------------------------------------
# Create flags passed through to gcloud, checked here first.

LABEL_KEY_RE = r"[a-z][a-z0-9_-]{0,62}"
LABEL_VALUE_RE = r"[a-z0-9_-]{0,63}"
_RESOURCE_NAME = r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?"
_API_PREFIX = r"(https://(www|compute)\.googleapis\.com/compute/(v1|beta|alpha)/)?"


def parse_labels(text: str) -> str:
    """'team=ml,run=ddpm' -> the same, checked against GCP's label rules (ASCII subset).

    Keys: 1-63 characters, a lowercase letter first, then lowercase letters, digits, '_' and '-';
    values: 0-63 of the same characters; at most 64 labels, each key once.
    """
    pairs = text.split(",") if text else []
    if not pairs:
        raise LaunchError("--labels is empty: give KEY=VALUE[,KEY=VALUE...]")
    seen: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise LaunchError(f"--labels {text!r}: {pair!r} is not KEY=VALUE")
        if not re.fullmatch(LABEL_KEY_RE, key):
            raise LaunchError(
                f"--labels {text!r}: key {key!r} must start with a lowercase letter and have only lowercase "
                "letters, digits, '_' and '-' (1-63 characters)"
            )
        if not re.fullmatch(LABEL_VALUE_RE, value):
            raise LaunchError(
                f"--labels {text!r}: value {value!r} of {key!r} may have only lowercase letters, digits, "
                "'_' and '-' (0-63 characters)"
            )
        if key in seen:
            raise LaunchError(f"--labels {text!r}: key {key!r} is given twice")
        seen[key] = value
    if len(seen) > 64:
        raise LaunchError(f"--labels: {len(seen)} labels; a resource takes at most 64")
    return ",".join(f"{k}={v}" for k, v in seen.items())


def check_network(flag: str, value: str, kind: str) -> str:
    """A network / subnetwork: its name, or projects/P/global/networks/N (regions/R/subnetworks/N)."""
    scope = r"global/networks/" if kind == "networks" else r"regions/[a-z]+(-[a-z]+)*\d+/subnetworks/"
    if not re.fullmatch(rf"{_API_PREFIX}(projects/[a-z0-9][-a-z0-9.:]*[a-z0-9]/{scope})?{_RESOURCE_NAME}", value):
        example = "my-vpc" if kind == "networks" else "my-subnet or projects/P/regions/us-central2/subnetworks/my-subnet"
        raise LaunchError(f"{flag} {value!r} is not a {kind[:-1]} name (lowercase letters, digits, '-'), e.g. {example}")
    return value


def check_service_account(value: str) -> str:
    if not re.fullmatch(r"[a-z0-9][-a-z0-9._+]*@[a-z0-9][-a-z0-9.]*\.[a-z]{2,}", value):
        raise LaunchError(
            f"--service-account {value!r} is not a service account email, e.g. NAME@PROJECT.iam.gserviceaccount.com"
        )
    return value


def create_flags(
    *,
    network: str | None = None,
    subnetwork: str | None = None,
    service_account: str | None = None,
    internal_ips: bool = False,
    reserved: bool = False,
    labels: str | None = None,
) -> list[str]:
    """The pass-through gcloud flags of `create` (tpu-vm and queued-resources take the same)."""
    out = []
    if network is not None:
        out.append(f"--network={check_network('--network', network, 'networks')}")
    if subnetwork is not None:
        out.append(f"--subnetwork={check_network('--subnetwork', subnetwork, 'subnetworks')}")
    if service_account is not None:
        out.append(f"--service-account={check_service_account(service_account)}")
    if internal_ips:
        out.append("--internal-ips")
    if reserved:
        out.append("--reserved")
    if labels is not None:
        out.append(f"--labels={parse_labels(labels)}")
    return out


# ---------------------------------------------------------------------------------------------
# Create, describe, delete.


def create_commands(
    target: Target,
    accelerator: Accelerator,
    *,
    runtime_version: str | None = None,
    spot: bool = False,
    preemptible: bool = False,
    queued: bool = False,
    extra: Sequence[str] = (),
) -> list[list[str]]:
    """`extra`: flags from create_flags (already checked); --reserved is checked against --spot here."""
    if spot and preemptible:
        raise LaunchError("--spot and --preemptible exclude each other (spot is the newer kind)")
    if "--reserved" in extra and (spot or preemptible):
        raise LaunchError(f"--reserved and --{'spot' if spot else 'preemptible'} exclude each other")
    if target.multislice and not queued:
        raise LaunchError(
            f"--num-slices {target.num_slices} needs --queued: a multislice TPU is one queued resource "
            "(gcloud compute tpus queued-resources create --node-count)"
        )
    if target.multislice and not accelerator.generation.multislice:
        raise LaunchError(f"--num-slices {target.num_slices}: multislice needs TPU v4 or later, not {accelerator.type}")
    if queued and preemptible:
        raise LaunchError("--preemptible is not available for queued resources; use --spot")
    runtime = runtime_version or accelerator.generation.runtime
    if queued:
        nodes = (
            [f"--node-count={target.num_slices}", f"--node-prefix={target.name}"]
            if target.multislice
            else [f"--node-id={target.name}"]
        )
        cmd = [GCLOUD, "compute", "tpus", "queued-resources", "create", target.name, *nodes]
        cmd += [*target.flags(), f"--accelerator-type={accelerator.type}", f"--runtime-version={runtime}"]
    else:
        cmd = [GCLOUD, "compute", "tpus", "tpu-vm", "create", target.name, *target.flags()]
        cmd += [f"--accelerator-type={accelerator.type}", f"--version={runtime}"]
    cmd += ["--spot"] * spot + ["--preemptible"] * preemptible + list(extra)
    return [cmd]


def describe_command(target: Target, queued: bool = False) -> list[str]:
    """One line on stdout: the TPU VM's state (READY, PREEMPTED, ...) or the queued resource's
    (ACTIVE, SUSPENDED, ...); gcloud exits non-zero with NOT_FOUND when there is none."""
    if queued or target.multislice:
        return [
            *[GCLOUD, "compute", "tpus", "queued-resources", "describe", target.name],
            *target.flags(),
            "--format=value(state.state)",
        ]
    return [GCLOUD, "compute", "tpus", "tpu-vm", "describe", target.name, *target.flags(), "--format=value(state)"]


def delete_commands(target: Target, queued: bool = False) -> list[list[str]]:
    """A multislice TPU is always a queued resource: deleting it (--force) deletes every node."""
    if queued or target.multislice:  # --force deletes the TPU VMs the queued resource made, too
        return [
            [GCLOUD, "compute", "tpus", "queued-resources", "delete", target.name, *target.flags(), "--force", "--quiet"]
        ]
    return [[GCLOUD, "compute", "tpus", "tpu-vm", "delete", target.name, *target.flags(), "--quiet"]]
