"""DiffJAX: diffusion models in JAX.

Noise processes, losses, jit-compiled samplers and exact likelihood live in the core modules;
networks in `diffjax.models`; the trainer and server come on top.
"""

__version__ = "0.1.0"
