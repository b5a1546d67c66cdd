"""Flags shared by the entry points that load a run or a pretrained folder to answer prompts
(experiments.sample, experiments.evaluate_task). Defined once on import, so both entry points
can be imported in one process."""

from absl import flags

CHAT = flags.DEFINE_bool("chat", False, "Put the prompt in the tokenizer's chat template (a "
                         "pretrained instruct model's).")
MODEL_PARALLEL = flags.DEFINE_integer(
    "model_parallel", 1, "Devices per tensor-parallel group (the params' `model` axis; "
    "batches are split over the rest).")
