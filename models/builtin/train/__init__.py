"""Train the built-in model, one curriculum stage at a time, resumably.

``python -m models.builtin.train --out DIR --stage single --steps 20000 [--init DIR] [--resume] ...``

* Data: `models.builtin.data.SceneBatches` in DataLoader workers (scenes drawn straight into tensors).
* Optimiser: AdamW (no weight decay on norms, biases and embeddings: the `<loc_k>` rows carry an ordinal code
  that decay would erode), linear warm-up then cosine decay to 10% of the peak, gradient clipping at 1.0.
* Loss: cross-entropy on answer tokens and `</s>` only. For a `<loc_k>` target the target distribution is
  ``(1 - w) * onehot(k) + w * gauss(k, sigma)``, the Gaussian taken over the 1000 location bins and renormalised
  there (default w = 0.5, sigma = 8 bins, i.e. 2.7 px at 336 px, a tenth of a 28 px patch). The soft part tells
  the tiny model that a near miss is better than a far one (the hard target alone treats bin k+1 like bin 0);
  the hard part keeps the mode sharp for greedy decoding. sigma is wider than a few bins because 1000 bins are
  finer than anything the 12x12 patch grid resolves, and an Acc@0.5 hit tolerates several pixels of error.
* Auxiliary loss (``--aux-weight``, default 0.5): a training-only linear probe (`PatchHead`) on the visual
  tokens predicts each patch's colour shares, shape shares and grid position (targets from
  `data.patch_targets`). Without it the from-scratch vision tower collapsed to a constant output within ~100
  steps (see `PatchHead`); the probe is saved in trainer_state.pt only, never in the model directory.
* Evaluation every ``--eval-every`` steps: greedy `generate()` through the real processor on a held-out set of
  the stage's own items and on the first items of `scenes.evaluation_set` (Acc@0.5 and VQA exact match, also
  per kind), appended to DIR/metrics.jsonl with the training loss.
* Checkpoints: DIR/checkpoint (a loadable model directory: model + processor) and DIR/trainer_state.pt
  (optimizer, scheduler, probe, step, RNG states). ``--resume`` continues exactly: the data stream is a pure function of
  (seed, step). ``--resume --steps N`` with a larger N extends the run (the cosine restarts from its new
  schedule position). Each stage of the curriculum starts from the previous stage with ``--init PREV_DIR``.
* CUDA when present, else CPU with ``--threads`` torch threads. ``--precision auto`` is bf16 autocast on CUDA and
  fp32 on CPU; ``--precision bf16`` on a CPU with AVX512-BF16 was measured 2.5x faster per step than fp32 with one
  thread (0.85 s vs 2.1 s at batch 16, 2 threads vs 1), the master weights and optimizer staying fp32.
* ``--example-weighting``: every example weighs the same in the answer loss, however many answer tokens it has.
  With the plain token mean a grounding item (4 location tokens + ``</s>``) outweighed a question (a word +
  ``</s>``) 2.5 to 1, and the questions stayed at answer priors while grounding rose (stage ``single``, step 750).
* ``--attn-weight`` with ``--attn-layers``, ``--attn-heads``, ``--attn-positions``, ``--attn-questions``: the
  `AttentionTargetLoss` tells LLM heads where in the image the prompt's object is. One head of the middle layer
  was not enough (the box was read from other layers' reads of other objects); every head of layers 2-7 at every
  location token took the evaluation-set grounding from 0.35 to 0.84 (docs/MODEL.md).
"""

from models.builtin.train.checkpoint import CHECKPOINT, METRICS_FILE, STATE_FILE
from models.builtin.train.cli import main, parse_args
from models.builtin.train.evaluation import evaluate, generate_answers, predicted_box
from models.builtin.train.heads import AttentionTargetLoss, PatchHead, PhraseHead, rescale_image_tokens
from models.builtin.train.loop import train, training_step
from models.builtin.train.losses import answer_loss, answer_start_positions

__all__ = [
    "CHECKPOINT",
    "METRICS_FILE",
    "STATE_FILE",
    "AttentionTargetLoss",
    "PatchHead",
    "PhraseHead",
    "answer_loss",
    "answer_start_positions",
    "evaluate",
    "generate_answers",
    "main",
    "parse_args",
    "predicted_box",
    "rescale_image_tokens",
    "train",
    "training_step",
]
