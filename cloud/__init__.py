"""edgefleet cloud: registry, bundles, TUF trust, deployments, telemetry and the REST console."""
