"""Ray actors and every ray.* call: shard, router, sinks, supervisor, gateway, Serve scorer."""
