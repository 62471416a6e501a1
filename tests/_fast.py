"""The overrides that shrink a training run to seconds for the tests of the trainer's machinery: 2
prompts x 2 images per epoch, short prompts, half the steps trained, no eval, a checkpoint every
epoch, no progress bar or TensorBoard. Each test file adds what it needs; a later override wins."""

QUICK_RUN = [
    "sample.group_size=2", "sample.prompts_per_epoch=2", "sample.batch_size=4", "sample.max_sequence_length=8",
    "train.timestep_fraction=0.5", "eval.num_steps=2", "eval.num_prompts=2", "eval.every=0", "checkpoint.every=1",
    "log.progress=false", "log.tensorboard=false",
]


def quick_run(*extra: str) -> list[str]:
    """QUICK_RUN followed by `extra` (which may replace any of its values)."""
    return QUICK_RUN + list(extra)
