"""The runtime: every side effect (Docker, registries, processes, files) lives here."""
