"""The serving process: settings, model registry, runtimes, search, servicers, metrics. Never imports torch."""
