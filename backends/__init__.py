"""hal backends: one folder per backend, loaded by name through hal.registry."""
