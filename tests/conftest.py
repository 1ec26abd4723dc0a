import os

# Tests run on the CPU with 8 fake devices, so sharding is exercised on any machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

# The CLI commands' persistent compilation cache (diffjax.compile_cache): one fresh directory per
# test session, shared by the commands the tests start, never the user's ~/.cache.
if "DIFFJAX_COMPILATION_CACHE" not in os.environ:
    import tempfile

    os.environ["DIFFJAX_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="diffjax-jax-cache-")
