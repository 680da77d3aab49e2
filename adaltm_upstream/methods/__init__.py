"""Merging methods: task-vector operations and λ constraints, one module each, registered by name (`registry`).

`base` (the interface), `registry` (names → classes; the config's lists), `pipeline` (the operations fitted to
the vectors: τ → τ'), `trim`, `ties`, `dare`, `constraints` (clamp, softmax, sum_to_one).
"""
