"""The training engine of main.py and main_seg.py.

``cli``: command line, exit codes; ``run``: one run (device, lock, logger, build, train or
evaluate); ``trainer``: the training loop; ``checkpoint``: saving, pruning, resuming;
``preemption``: stop signals; ``task``: the interface a task implements; ``classification`` and
``segmentation``: the two tasks."""
