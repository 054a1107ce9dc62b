"""Performance: time the train step and compile it ahead of time for a TPU slice.

  program   a run config's train step as an abstract program (nothing allocated)
  aot       AOT compiles for TPU topologies on a CPU host: memory per chip, fits or not
            (`kto-jax compile`)
  workload  the benchmark's examples (fixed lengths, or drawn from a length distribution
            in data/) laid out as the step reads them (padded or packed)
  bench     `kto-jax bench`: the KTO step on that workload, timed; FLOPs and MFU

docs/performance.md and docs/tpu.md are the user's guides.
"""
