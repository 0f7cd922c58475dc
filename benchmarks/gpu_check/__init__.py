"""``make gpu-check``: everything GPU-side measured and checked in one run of a few minutes.

Run from the repo root on a GPU machine (DALI installed; Ray and MLflow are not needed)::

    make gpu-check GPU_CHECK_ARGS="--out OUT"          # = python -m benchmarks.gpu_check --out OUT
    make gpu-check-data                                 # here, first: .gpucheck/shards from real JPEGs
    python -m benchmarks.gpu_check --smoke              # CPU: the same script with tiny sizes

A benchmark, above the product's packages: it drives the training loop, the loaders and the
evaluation, and nothing imports it but tests. Steps, in order, one module each in
``benchmarks/gpu_check/steps/`` (adding a step is adding a module there), each guarded so that one
failure does not hide the others, the report rewritten after each (``OUT/gpu_check.json``,
``OUT/gpu_check.md``):

1. ``gpu-tests``: the ``gpu``-marked tests (``pytest -m gpu``, slow ones included), pass/fail each.
2. ``loader``: train pipeline at 299 on real ImageNet JPEGs (replicated for steady state): DALI
   "mixed" (through ``make_loader`` and bare), DALI CPU and the Pillow DataLoader, images/s each on
   the same CPU threads, and the cost of starting an epoch (pipeline build + first batch).
3. ``train-step``: full Inception-v3 at 299 on synthetic device batches through the product's loop
   (``benchmarks.step_bench``): float32, bf16 autocast, + channels_last, + ``torch.compile``;
   batch 128 and 256; images/s and model FLOP utilisation (3 x forward multiply-adds x 2 FLOP).
4. ``peers``: torchvision's ``Inception3`` and timm's ``inception_v3`` load our ``state_dict``
   (``strict=True``) and must give our logits to 1e-4 (float32, eval); their training step is timed
   beside ours under the same loop, optimizer and settings.
5. ``end-to-end``: shards -> DALI mixed -> ``train_one_epoch`` for a few hundred steps, images/s and
   loader-wait fraction (CUDA-event timed), against the step-only rate; then a checkpoint, and a
   resume from it (loaded mapped to the GPU) that must repeat the uninterrupted run's losses bit
   for bit (deterministic kernels for that part).
6. ``multicrop``: ``ops.evaluate.evaluate_multicrop`` of a 2-member ensemble at 1, 10 and 144 crops,
   crops/s.

``--smoke`` runs on CPU with tiny sizes (75 px, width 0.25, a few steps) from the shipped CIFAR-10
subset; steps that need CUDA are reported as skipped. A test runs it in CI so that the script never rots.
"""

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS for the resume check
