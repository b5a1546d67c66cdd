"""Supervised fine-tuning on a verifiable task: `--config=configs/sft.py:PROCESS,TASK[,SIZE]`.

PROCESS is mdlm, bd3lm or ar; TASK one of `dlm.data.tasks` (addition, multiplication,
sorting, word_problems, countdown, sudoku); SIZE a model size (default micro). The examples
are generated (`data.name='task'`, `data.task_examples` train/validation/test); each task
gets a `data.seq_len` that holds its longest example as BOS prompt SEP response EOS with the
char tokenizer. Every key is overridable as usual, e.g. `--config.data.fill=pad`,
`--config.data.task_options.max_digits=4`, or `--config.init_from=RUN` to fine-tune an
unconditional run (same tokenizer and size). BD3-LM uses blocks of 4. Then:

    python -m experiments.evaluate_task --workdir=RUN --sampler=fast_dllm
"""

from ml_collections import config_dict

from configs import ar, bd3lm, mdlm
from dlm.data import tasks

PROCESSES = {"mdlm": mdlm, "bd3lm": bd3lm, "ar": ar}
# task -> data.seq_len (a multiple of 8, so that BD3-LM blocks of 4 or 8 fit) for the
# default options; the longest default example is 15, 13, 43, 151, 37 and 42 characters.
SEQ_LEN = {"addition": 16, "multiplication": 16, "sorting": 48, "word_problems": 160,
           "countdown": 40, "sudoku": 48}

# The data of the demo and of the `tasks` benchmark suite (data.* keys over the defaults):
# two-digit addition has 8,100 problems, so its splits are disjoint subsets of those.
BENCHMARK_DATA = {
    "addition": {"task_options": {"min_digits": 2, "max_digits": 2},
                 "task_examples": (6_000, 200, 300)},
    "word_problems": {},
    "sudoku": {},
}


def get_config(arg: str | None = None):
    parts = (arg or "mdlm,addition").split(",")
    if len(parts) not in (2, 3):
        raise ValueError(f"configs/sft.py takes PROCESS,TASK[,SIZE], got {arg!r}")
    process, task = parts[:2]
    size = parts[2] if len(parts) == 3 else "micro"
    if process not in PROCESSES:
        raise ValueError(f"configs/sft.py: process {process!r}; allowed: {', '.join(PROCESSES)}")
    if task not in SEQ_LEN:
        raise ValueError(f"configs/sft.py: task {task!r}; allowed: {', '.join(SEQ_LEN)}")
    config = PROCESSES[process].get_config(size)
    config.data.update(name="task", task=task, seq_len=SEQ_LEN[task], batch_size=64,
                       eval_batch_size=64)
    # Every option of the task, so that `--config.data.task_options.K=V` overrides it (a
    # ConfigDict takes no new keys from the command line); None stays None unless set.
    config.data.task_options = {
        k: config_dict.placeholder(int) if v is None else v
        for k, v in tasks.default_options(task).items()}
    config.total_steps = 2_000
    config.eval_every = 1_000
    config.checkpoint_every = 1_000
    config.log_every = 100
    config.optimizer.warmup_steps = 100
    config.eval.num_batches = 4
    if process == "bd3lm":
        config.process.clip_search_widths = ()  # a fixed interval: searches cost evaluations
    return config
