"""Reading untrusted models and writing results: lazy weights, external data, structure checks, atomic
outputs."""
