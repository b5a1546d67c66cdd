"""Defaults shared by every experiment config; each `configs/<method>.py` starts here."""

import ml_collections


def base_config(process: str, model_name: str, size: str) -> ml_collections.ConfigDict:
    """Returns the full default config for one process/model/size; override any key."""
    from dlm.models import model_config  # lazy: keeps `--config` parsing cheap

    config = ml_collections.ConfigDict()
    config.seed = 0
    config.total_steps = 20_000
    config.log_every = 50
    config.eval_every = 1_000
    config.checkpoint_every = 1_000
    config.keep_checkpoints = 3
    config.max_consecutive_nonfinite = 10  # halt after this many skipped steps in a row
    config.init_from = ""  # a workdir whose latest params initialise this run
    config.fsdp = False  # shard params, EMA and optimizer state over the devices

    config.data = ml_collections.ConfigDict(dict(
        name="tiny_shakespeare",  # see dlm.data.builders.prepare_builder
        path="",  # text file or folder for 'text_files' / 'text8_style'
        manual_dir="",  # already-downloaded files for text8 / lm1b / openwebtext
        data_dir="",  # where tfds writes; empty: ~/.cache/dlm/tensorflow_datasets
        tokenizer="char",  # char | gpt2 | bpe
        gpt2_dir="",  # folder with GPT-2's encoder.json and vocab.bpe
        bpe_vocab_size=4096,
        seq_len=256,
        batch_size=32,  # global, over all processes and devices
        eval_batch_size=32,
        packing="wrap",  # wrap | pad
        separators=False,  # MDLM's BOS/EOS around documents and chunks
        # Prompt/response data (data.name = task | jsonl | gsm8k; see dlm.data.sft):
        task="",  # data.name='task': a dlm.data.tasks name (addition, word_problems, ...)
        task_options={},  # its options, e.g. {'max_digits': 3}
        task_seed=0,
        task_examples=(20_000, 500, 500),  # train, validation, test
        fill="eos",  # eos: LLaDA's trained-on EOS fill | pad: untrained, never attended
        too_long="error",  # error | drop: examples longer than seq_len
    ))

    config.model = model_config(size, name=model_name)

    config.process = ml_collections.ConfigDict(dict(
        name=process,  # mdlm | ar
        schedule="loglinear",  # loglinear | linear | cosine | polynomial
        schedule_eps=1e-3,
        schedule_power=1.0,
        t_min=1e-3,
        num_timesteps=0,  # 0: continuous-time NELBO; T > 0: the T-step discrete bound
        mask_id=-1,  # -1: the last id, V - 1, where dlm's tokenizers put the mask; an
        # imported model sets its own (LLaDA 126336, Dream 151666)
    ))

    config.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=3e-4,
        warmup_steps=2_500,
        schedule="constant",  # constant | cosine (after warmup)
        min_learning_rate=0.0,  # cosine floor
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        grad_clip=1.0,  # global-norm clipping; 0 disables
        ema_decay=0.9999,  # 0 disables the EMA
        grad_accum_steps=1,
    ))

    config.eval = ml_collections.ConfigDict(dict(
        split="validation",
        num_batches=0,  # 0: the whole split
        seed=0,  # fixed, so the Monte-Carlo bound is comparable across runs
        use_ema=True,
    ))
    return config


def apply_variant(config: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
    """Shrinks the schedule for the CPU-sized variants (`micro`); sizes are set by the caller."""
    if arg == "micro":
        config.total_steps = 1_000
        config.log_every = 25
        config.eval_every = 500
        config.checkpoint_every = 500
        config.optimizer.learning_rate = 1e-3
        config.optimizer.warmup_steps = 100
        config.optimizer.ema_decay = 0.999
        config.eval.num_batches = 8
    return config
