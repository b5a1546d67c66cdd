r"""Probes a masked-diffusion run trained on sudoku: is a low accuracy deduction or planning?

    python -m experiments.sudoku_probe --workdir=RUN [--checkpoint_step=N] [--num_examples=200]

On the run's test puzzles, with the solution written after the prompt (EOS fill, as trained),
it prints one JSON line:

- `one_hole`: the argmax is right when exactly one hole of the solution is masked (the
  denoiser's deduction from a full grid);
- `all_holes_per_hole` / `all_holes_most_confident`: with every hole masked, how many holes
  the argmax gets right, and whether the most confident hole is right (what a
  most-confident-first decoder commits first);
- `hand_decode`: the puzzle accuracy of a most-confident-first decode written here in numpy
  over the network's logits (one hole per call). It should equal `evaluate_task` with
  `llada`, which is how a sampler bug would show.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from dlm.data import sft
from dlm.diffusion import process as process_lib
from dlm.parallel import model_fn
from dlm.runs import answering, loading
from experiments import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A masked-diffusion run trained on sudoku.")
_STEP = flags.DEFINE_integer("checkpoint_step", None, "Checkpoint (default: latest).")
_NUM = flags.DEFINE_integer("num_examples", 200, "Test puzzles.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
    del argv
    run = loading.load_run(_WORKDIR.value, step=_STEP.value)
    if run.config.data.get("task") != "sudoku" or run.network_kind != "denoiser":
        raise ValueError(f"{run.workdir} is not a masked-diffusion run on data.task='sudoku'")
    tokenizer, mask_id = run.tokenizer, run.process.mask_id
    specials = sft.Specials.of(tokenizer)
    length = int(run.config.data.seq_len)
    rows, holes, spans = [], [], []
    for example in answering.task_examples(run, "test", _NUM.value):
        prompt = sft.encode_prompt(tokenizer.encode(example.prompt), specials)
        response = tokenizer.encode(example.response)
        row = np.full(length, specials.eos, np.int32)
        row[:len(prompt)] = prompt
        row[len(prompt):len(prompt) + len(response)] = response
        rows.append(row)
        holes.append([len(prompt) + i for i, c in enumerate(example.prompt[:len(response)])
                      if c == "."])
        spans.append((len(prompt), len(prompt) + len(response)))
    solved = np.stack(rows)
    valid = jnp.ones(solved.shape, jnp.float32)
    forward = jax.jit(lambda p, x: model_fn(run.module, p, train=False)(
        x, None, **process_lib.attention_options({"valid": valid})))

    def log_probs(tokens):
        logits = forward(run.params, jnp.asarray(tokens))
        return np.asarray(jax.nn.log_softmax(process_lib.exclude_token(logits, mask_id)))

    one_hole = []
    for k in range(max(map(len, holes))):
        tokens, cells = solved.copy(), []
        for r, h in enumerate(holes):
            if k < len(h):
                tokens[r, h[k]] = mask_id
                cells.append((r, h[k]))
        lp = log_probs(tokens)
        one_hole += [lp[r, p].argmax() == solved[r, p] for r, p in cells]

    masked = np.zeros(solved.shape, bool)
    for r, h in enumerate(holes):
        masked[r, h] = True
    lp = log_probs(np.where(masked, mask_id, solved))
    per_hole = [lp[r, p].argmax() == solved[r, p] for r, h in enumerate(holes) for p in h]
    first = []
    for r, h in enumerate(holes):
        p = h[int(np.argmax([lp[r, q].max() for q in h]))]
        first.append(lp[r, p].argmax() == solved[r, p])

    tokens, still = np.where(masked, mask_id, solved), masked.copy()
    while still.any():
        lp = log_probs(tokens)
        confidence = np.where(still, lp.max(-1), -np.inf)
        for r in np.flatnonzero(still.any(-1)):
            p = int(confidence[r].argmax())
            tokens[r, p], still[r, p] = lp[r, p].argmax(), False
    decoded = [np.array_equal(tokens[r, a:b], solved[r, a:b]) for r, (a, b) in enumerate(spans)]
    print(json.dumps({"workdir": str(run.workdir), "step": run.step, "puzzles": len(rows),
                      "holes_per_puzzle": float(np.mean([len(h) for h in holes])),
                      "one_hole": float(np.mean(one_hole)),
                      "all_holes_per_hole": float(np.mean(per_hole)),
                      "all_holes_most_confident": float(np.mean(first)),
                      "hand_decode": float(np.mean(decoded))}))


if __name__ == "__main__":
    cli.run(main, "experiments.sudoku_probe")
