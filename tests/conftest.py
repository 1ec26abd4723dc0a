import os

# Tests run on the CPU; several tests fake 8 devices for sharding.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
