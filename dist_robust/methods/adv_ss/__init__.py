"""Adv-SS (Chen et al., CVPR 2020): adversarial self-supervised pre-training on the source's images.

The data's labels are ignored. Each batch becomes one view per pretext task (``dist_robust.pretext``)
with that task's labels, and the network learns the tasks on clean and adversarial views:

- ``adv_rotation``, ``adv_jigsaw``, ``adv_selfie``: one task, loss = (CE(clean view) + CE(adversarial
  view)) / 2. The adversary is ``pgd()`` from ``attack.*`` on the view (the rotated image, the shuffled
  image; for selfie the whole image, before patching) through its custom-loss hook.
- ``adv_ss_ensemble``: several tasks on a shared trunk, each with its own copy of the backbone's last
  ``method.ensemble_branch_blocks`` stages (``models.stage_names``) and its own head (selfie reads the
  trunk output, pooled). The views are attacked jointly (``joint_attack``): every step ascends each
  task's loss plus ``adv_ss_lambda`` * h, with h = mean_batch logdet(G^T G + 1e-5 I) and G the
  per-sample L2-normalised input gradients of the tasks. The model minimises (sum of clean and
  adversarial CEs) / (2 * tasks) + lambda * h, h recomputed on the final adversarial views (double
  backward).

Every method trains a ``PretextNet`` and exports a plain ``ImageClassifier`` (keys ``normalize.*``,
``features.*``, ``head.*``), so ``model.init_from`` + ``load_backbone`` fine-tune it with a new head.
The exported head is the pretext head: 4-way rotation; jigsaw with its permutation table as the buffer
``head.permutations`` (how the table travels with the weights: every checkpoint and the exported model
hold it, ``pretext_model_from_state`` rebuilds the jigsaw model from that state alone); for selfie alone
the source model's untouched head. Pretext runs set ``eval.at_end: false``: their head does not predict
the dataset's classes.

Faithful to the authors' code: the view transforms and labels (see pretext.py); the two losses above
with lambda = 0.1 in the attack and in the loss, h from the same adversarial forward as the CEs, 1e-10
added to the gradient norms; selfie's attention pooling (a learned u0 token before the context
features, post-norm layers with dropout 0.1, query = u + row embedding + column embedding, row
embeddings N(0, 1) and column embeddings 0 at init, dot products with the target patches, label i for
target position i, loss summed over the positions, the CE-on-softmax quirk when
``method.selfie_faithful``); the attack in train-mode BN when ``attack.bn_mode: train``.

Differences: selfie's encoder is ``method.selfie_layers`` layers of ``selfie_heads`` heads with a
feed-forward width of twice the feature size (theirs: 13 layers of 16 x 64 at 1024, d_ff 2048), and
outside the faithful mode its scores are divided by sqrt(d) (see ``SelfiePooling``). The
single-task selfie encodes patches with the whole backbone (theirs stops before ResNet-50's layer4,
which then starts fine-tuning at its random init). The jigsaw table redraws duplicates and the
identity. The per-task blocks start as copies of the model's block (theirs: independent inits). The
random start is clamped into [0, 1] before the first step (theirs after it). The default attack BN
mode is eval. Under DDP (theirs is single-GPU) the clean views go through the DDP wrapper, whose
forward arms this step's gradient all-reduce; the attack, the adversarial forward and the penalty run
on the plain module, so ``autograd.grad`` never meets DDP, and the one backward syncs all gradients.
Every term is a batch mean (h too), so nothing depends on the per-rank batch beyond BN statistics.
The ensemble refuses synchronised BN, attack restarts and half-precision attacks (config.py); the
joint attack lives here, not in attacks/, because it needs the views of one ``PretextNet``. Attacks
through pgd()'s custom-loss hook always run eagerly (``attack.compile`` does not apply).

Config keys read: ``method.ensemble_tasks``, ``ensemble_export``, ``ensemble_branch_blocks``,
``adv_ss_lambda``, ``jigsaw_grid``, ``jigsaw_perms``, ``jigsaw_seed``, ``selfie_grid``,
``selfie_layers``, ``selfie_heads``, ``selfie_faithful``; ``attack.*`` (the pretext adversary).
"""
from . import methods  # noqa: F401  (registers adv_rotation, adv_jigsaw, adv_selfie, adv_ss_ensemble)
