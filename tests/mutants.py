"""Deliberate breakages of the properties the docs promise, each with the tests that must
catch it (run by tools/mutation_check.py in a scratch copy; never applied to this tree).

A mutant replaces ``old`` (which must occur exactly once in ``file``) by ``new``. Keep ``tests``
to the few tests whose names state the property: the check is that *they* notice. When the code
changes, update ``old`` here (the check reports a mutant whose code is gone as stale).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutant:
    name: str
    property: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


# Resume that ignores the checkpoint and trains from scratch, logging the line a resume logs: as
# training is deterministic, only a test that checks where the rerun starts notices.
_FROM_SCRATCH = dict(
    file="engine/trainer.py",
    old=("        path, ckpt = resume\n"
         "        self.start_epoch, self.best, self.progress = self.saver.restore(\n"),
    new=("        path, ckpt = resume\n"
         "        from .checkpoint import resume_position\n"
         "        start_epoch, progress = resume_position(ckpt, config, self.updates_per_epoch, "
         "logger)\n"
         "        logger.info(f'resumed from {path}: epoch {start_epoch}, step "
         "{progress.epoch_step}, {progress.num_updates} optimizer steps done, max accuracy "
         "0.00%')\n"
         "        self.lr_scheduler.step_update(0)\n"
         "        return\n"
         "        self.start_epoch, self.best, self.progress = self.saver.restore(\n"))
_RESUME_TESTS = {
    "mid-epoch-signal": "tests/test_preemption.py::test_signal_to_the_process_group_saves_a_step_"
                        "and_the_rerun_equals_an_uninterrupted_run",
    "kill-9": "tests/test_robustness.py::test_kill_9_after_second_epoch_then_auto_resume_matches_"
              "uninterrupted_run",
    "finetune": "tests/test_finetune.py::test_finetune_auto_resume_after_an_epoch_is_exact",
    "segmentation": "tests/test_seg_cli.py::test_preempted_run_resumes_mid_epoch_exactly",
}

MUTANTS = [
    Mutant("released-names-ignored", "the released repository's MODEL.NAME spellings build their "
           "variant", "config.py",
           "    return RELEASED_NAMES.get(model_name)\n", "    return None\n",
           ("tests/test_config.py::test_released_repository_config_files_build_their_variant",)),
    Mutant("fused-kernels-unused", "SS-MSA + AF runs the fused CPU kernels where they apply",
           "models/separable.py", "    if (_pytorch_ops_depth or heads <= 0",
           "    if (True or heads <= 0",
           ("tests/test_separable.py::test_fused_matches_pytorch_ops_float64",)),
    Mutant("ssmsa-one-thread", "the SS-MSA kernels share their work over PyTorch's threads",
           "models/separable.py", "    threads = torch.get_num_threads()\n    scratch",
           "    threads = 1\n    scratch",
           ("tests/test_separable.py::test_any_thread_count_on_any_pool",)),
    Mutant("depthwise-one-thread", "the depthwise weight-gradient kernel shares its work over "
           "PyTorch's threads", "models/depthwise.py",
           "        torch.get_num_threads(), *ckernel.openmp_pool())",
           "        1, *ckernel.openmp_pool())",
           ("tests/test_depthwise.py::test_weight_gradient_with_any_thread_count_on_any_pool",)),
    Mutant("depthwise-window-edge", "the depthwise weight-gradient kernel's register window "
           "holds zeros for output columns right of a map narrower than the kernel",
           "models/depthwise.py", "gw[j] = w >= 0 && w < W ? LOADV", "gw[j] = w >= 0 ? LOADV",
           ("tests/test_depthwise.py::test_float32_matches_conv2d",)),
    Mutant("depthwise-kernel-unused", "the 7x7 depthwise weight gradient runs the C kernel",
           "models/depthwise.py", "and k in _FAST_KERNELS\n", "and k in ()\n",
           ("tests/test_depthwise.py::test_float32_matches_conv2d",)),
    Mutant("bfloat16-generic-convolutions", "under CPU bf16 autocast without oneDNN's bf16 "
           "kernels the convolutions run through float32", "models/conv.py",
           "    return not _BFLOAT16_NATIVE and cpu_bfloat16_autocast(x)\n",
           "    return not True and cpu_bfloat16_autocast(x)\n",
           ("tests/test_conv.py::test_mg_ssaf_runs_every_convolution_through_float32",)),
    Mutant("bfloat16-operands-unrounded", "the bf16 convolutions through float32 give a bf16 "
           "convolution's numbers", "models/conv.py",
           "return None if t is None else t.to(torch.bfloat16).float()",
           "return None if t is None else t.float()",
           ("tests/test_conv.py::test_through_float32_gives_a_bfloat16_convolutions_numbers_"
            "and_dtypes",)),
    Mutant("depthwise-backward-under-autocast", "compiled code keeps the bf16 convolutions' "
           "float32 path (backward formulas traced under autocast)", "models/depthwise.py",
           "        with autocast_off(grad_out.device.type):\n", "        if True:\n",
           ("tests/test_conv.py::test_compiled_code_keeps_the_float32_path",)),
    Mutant("pointwise-matrix-product-rows", "the 1x1 convolutions as matrix products are "
           "nn.Conv2d's", "models/pointwise.py",
           "    out = F.linear(x.permute(0, 2, 3, 1), _weight_matrix(weight), bias)",
           "    out = F.linear(x.permute(0, 2, 3, 1).flip(1), _weight_matrix(weight), bias)",
           ("tests/test_pointwise.py::test_matches_conv2d",)),
    Mutant("pointwise-weight-grad-strides", "the 1x1 weight gradient has the weight's strides "
           "(DDP's buckets)", "models/pointwise.py",
           "    return weight.permute(0, 2, 3, 1).flatten(1)",
           "    return weight.flatten(1)",
           ("tests/test_pointwise.py::test_weight_gradient_keeps_the_weight_strides",)),
    Mutant("pointwise-compiled-bf16-products", "compiled code keeps the 1x1 convolutions' "
           "float32 path under bf16 autocast (no bf16 matrix products in the backward)",
           "models/pointwise.py", "        if torch.compiler.is_compiling():\n",
           "        if False:\n",
           ("tests/test_conv.py::test_compiled_code_keeps_the_float32_path",)),
    Mutant("separable-attention-4d", "compiled training copies no attention maps (the row and "
           "column attention kept for the backward are 3-D)", "models/separable.py",
           "    return tuple(x.new_empty(heads, groups, size, dtype=_compute(x.dtype)) for",
           "    return tuple(x.new_empty(heads, groups, size // 7, 7, dtype=_compute(x.dtype)) for",
           ("tests/test_separable.py::"
            "test_the_forward_keeps_only_the_attention_for_the_backward",)),
    Mutant("gelu-series-range", "the SS-MSA kernels' GELU series serves only |Y| <= 1",
           "models/separable.py", "#define SERIES_BOUND 1.0f", "#define SERIES_BOUND 3.0f",
           ("tests/test_separable.py::test_float32_gelu_is_as_close_to_float64_as_pytorchs",)),
    Mutant("gelu-series-coefficient", "the SS-MSA kernels' GELU series has Phi's coefficients",
           "models/separable.py", "-6.649038007e-02f, 3.989422804e-01f", "-6.6e-02f, 3.989422804e-01f",
           ("tests/test_separable.py::test_float32_gelu_is_as_close_to_float64_as_pytorchs",)),
    Mutant("separable-zero-filled-gradients", "autograd fills no zero gradients for the maps the "
           "SS-MSA forward hands its backward", "models/separable.py",
           "    ctx.set_materialize_grads(False)", "    ctx.set_materialize_grads(True)",
           ("tests/test_separable.py::test_the_backward_fills_no_gradient_for_the_maps",)),
    Mutant("strided-depthwise-bf16", "strided depthwise convolutions train through float32 under "
           "bf16 autocast", "models/depthwise.py",
           "            self.stride != (1, 1) and wants_grad(x, *self.parameters())",
           "            False and wants_grad(x, *self.parameters())",
           ("tests/test_conv.py::"
            "test_strided_depthwise_training_runs_through_float32_on_any_cpu",)),
    Mutant("bf16-truncated", "the kernels for bf16 activations round to nearest even, as torch "
           "does", "models/separable.py",
           "    return (IO)((c.u + 0x7fffu + ((c.u >> 16) & 1)) >> 16);",
           "    return (IO)(c.u >> 16);",
           ("tests/test_separable.py::"
            "test_bfloat16_activations_are_the_float32_kernels_numbers_rounded_once",)),
    Mutant("pointwise-batch-view-everywhere", "1x1 convolutions take the batch view only where "
           "PyTorch would use its own kernel (float32, one thread)", "models/pointwise.py",
           "    return x.dtype == torch.float32 and not torch.is_autocast_enabled(\"cpu\")"
           " and _one_thread()",
           "    return True",
           ("tests/test_pointwise.py::"
            "test_the_batch_view_only_where_pytorch_would_use_its_own_kernel",)),
    Mutant("attention-scale", "the model computes the released network (golden logits)",
           "models/mg_ssaf.py", "        self.scale = self.head_dim ** -0.5",
           "        self.scale = self.head_dim ** -0.5 * 1.001",
           ("tests/test_model.py::test_golden_logits",)),
    Mutant("unsafe-load", "checkpoints are read without running pickled code",
           "models/checkpoint_io.py",
           'ckpt = torch.load(path, map_location="cpu", weights_only=True)',
           'ckpt = torch.load(path, map_location="cpu", weights_only=False)',
           ("tests/test_robustness.py::test_checkpoint_that_would_run_code_is_refused",)),
    Mutant("save-not-atomic", "a failed save leaves the previous checkpoint intact", "utils.py",
           '    try:\n        fd, tmp = tempfile.mkstemp(',
           '    open(path, "wb").close()\n    try:\n        fd, tmp = tempfile.mkstemp(',
           ("tests/test_robustness.py::"
            "test_a_failed_save_leaves_the_previous_checkpoint_and_no_partial_file",)),
    Mutant("no-cross-rank-sum", "validation counts every image once over all ranks", "utils.py",
           "    if get_world_size() > 1:\n        dist.all_reduce(tensor)",
           "    if False:\n        dist.all_reduce(tensor)",
           ("tests/test_pipeline.py::"
            "test_torchrun_two_processes_train_and_evaluate_as_users_run_them",)),
    *[Mutant(f"resume-from-scratch-{case}", "a resume starts at the saved step and does not redo "
             "finished steps", tests=(test,), **_FROM_SCRATCH)
      for case, test in _RESUME_TESTS.items()],
    Mutant("checksum-not-verified", "a checkpoint whose checksum does not match is not loaded",
           "models/checkpoint_io.py", "    if stored != actual:\n", "    if False:\n",
           ("tests/test_integrity.py::"
            "test_a_corrupt_checkpoint_that_parses_is_skipped_by_auto_resume_and_kept",)),
    Mutant("eval-without-weights", "--eval --resume evaluates the checkpoint's weights",
           "engine/run.py", "        if resume:\n            load_weights(model, resume[1], resume[0])\n",
           "        if resume:\n            pass\n",
           ("tests/test_seg_cli.py::test_torchrun_two_processes_train_with_workers_and_evaluate",)),
    Mutant("seg-totals-not-summed", "segmentation metrics sum every rank's per-class totals",
           "engine/segmentation.py", "        torch.distributed.all_reduce(metrics.totals)\n", "",
           ("tests/test_seg_cli.py::test_torchrun_two_processes_train_with_workers_and_evaluate",)),
    Mutant("seg-test-mode-ignored", "segmentation inference runs the mode SEG.TEST_MODE names",
           "models/seg_inference.py", '    if seg.TEST_MODE == "whole":\n', "    if True:\n",
           ("tests/test_seg.py::test_inference_runs_the_function_seg_test_mode_names",)),
    Mutant("buffers-not-broadcast", "every rank evaluates the state rank 0 saves",
           "engine/trainer.py",
           "                broadcast_buffers(module)", "                pass",
           ("tests/test_seg_cli.py::test_torchrun_two_processes_train_with_workers_and_evaluate",)),
    Mutant("fp16-without-loss-scaling", "AMP float16 trains with a GradScaler's loss scaling",
           "engine/trainer.py", "enabled=amp.enabled and amp.dtype == torch.float16)",
           "enabled=False)",
           ("tests/test_defaults.py::test_shipped_recipe_trains_through_the_cli_on_photos",)),
    Mutant("loader-workers-forked", "loader workers are not forks of the multi-threaded "
           "training process", "data/common.py",
           '    "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else',
           '    "fork" if "forkserver" in multiprocessing.get_all_start_methods() else',
           ("tests/test_pipeline.py::"
            "test_loader_workers_start_from_a_fork_server_with_the_same_batches",)),
    Mutant("workers-outlive-a-killed-training-process", "loader workers end with the training "
           "process, a kill -9 included", "data/build.py",
           '    threading.Thread(target=_exit_with, args=(training_pid,), '
           'name="exit-with-training",\n                     daemon=True).start()\n', "",
           ("tests/test_pipeline.py::"
            "test_loader_workers_end_with_a_training_process_killed_with_9",)),
    Mutant("fork-server-takes-stop-signals", "the fork server does not die of a stop signal sent "
           "to the process group", "data/build.py",
           "    logs = WORKER_CONTEXT.Queue()\n    signal.pthread_sigmask(signal.SIG_BLOCK, "
           "STOP_SIGNALS)\n", "    logs = WORKER_CONTEXT.Queue()\n",
           ("tests/test_pipeline.py::"
            "test_loader_workers_start_from_a_fork_server_with_the_same_batches",)),
    Mutant("worker-logs-lost", "a loader worker's warnings reach the run's console and log",
           "data/build.py", "    logger.addHandler(logging.handlers.QueueHandler(logs))\n", "",
           ("tests/test_robustness.py::test_skip_bad_images_warns_and_counts",)),
    Mutant("training-workers-per-epoch", "the training loader's workers start once per run",
           "data/build.py", "SeededSamples(dataset_train, config.SEED), persistent=True,",
           "SeededSamples(dataset_train, config.SEED), persistent=False,",
           ("tests/test_pipeline.py::"
            "test_loader_workers_start_from_a_fork_server_with_the_same_batches",)),
]
