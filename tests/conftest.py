"""Give JAX 8 CPU devices before anything starts its backend, so sharding is real."""

import jax

jax.config.update("jax_num_cpu_devices", 8)
