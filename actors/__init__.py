"""Ray actors: shard, router, trigger sink and supervisor. Every ray.* call lives here."""
