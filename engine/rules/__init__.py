"""Rules as data: the YAML rule spec, the safe expression language and vectorized evaluators."""
