"""The batch layout shared by the data pipeline and the train step.

Every array has leading dims [A, M]: A gradient-accumulation microbatches of M
examples each. The step scans over A; the M axis is sharded over ('data', 'fsdp').
Prompts and completions are stored apart so the mismatched KL pairs of the paper
(x_i, y_{i+1 mod M}) are a `jnp.roll` of the completion arrays along the M axis,
inside the jitted step, within one microbatch.

Unpaired batches (KTO and every loss on binary feedback):
  prompt_ids        int32 [A, M, P]  left-padded with the pad id
  prompt_mask       int32 [A, M, P]  1 on real prompt tokens
  completion_ids    int32 [A, M, C]  right-padded
  completion_mask   int32 [A, M, C]  1 on real completion tokens
  desirable         bool  [A, M]     thumbs up (True) / down (False)
  weight            f32   [A, M]     per-example weight (1.0 unless scored data)
  valid             bool  [A, M]     False on filler rows that pad the last batch
  reference_logps     f32 [A, M]     optional: precomputed log pi_ref(y|x)
  reference_kl_logps  f32 [A, M]     optional: precomputed log pi_ref(y_{i+1}|x_i)

Paired batches (DPO, IPO, ORPO, SimPO, SLiC, ...): the same prompt arrays plus
  chosen_ids, chosen_mask, rejected_ids, rejected_mask   int32 [A, M, C]
  valid                                                  bool  [A, M]
  reference_chosen_logps, reference_rejected_logps       f32 [A, M] (optional)
"""

UNPAIRED_KEYS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask",
                 "desirable", "weight", "valid")
PAIRED_KEYS = ("prompt_ids", "prompt_mask", "chosen_ids", "chosen_mask",
               "rejected_ids", "rejected_mask", "valid")
PRECOMPUTED_UNPAIRED_KEYS = ("reference_logps", "reference_kl_logps")
PRECOMPUTED_PAIRED_KEYS = ("reference_chosen_logps", "reference_rejected_logps")
