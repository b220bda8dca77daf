"""Progress lines: as they are, on the current stdout, visible by default and silenced through logging."""

import logging

from unipipe_ray.runtime.distributed import print0
from unipipe_ray.runtime.logs import FORMAT, PROGRESS, progress


def test_progress_lines_reach_the_current_stdout_as_they_are_and_can_be_silenced(capsys):
    progress("pipeline: stage 1/4 sft: run - first run")
    print0("sft: step 1/4 loss=1.2")  # rank 0 of a one-process run
    assert capsys.readouterr().out == "pipeline: stage 1/4 sft: run - first run\nsft: step 1/4 loss=1.2\n"
    logger = logging.getLogger(PROGRESS)
    logger.setLevel(logging.WARNING)
    try:
        progress("not shown")
        assert capsys.readouterr().out == ""
    finally:
        logger.setLevel(logging.INFO)


def test_diagnostics_have_one_format():
    record = logging.LogRecord("unipipe_ray.ppo.controller", logging.WARNING, __file__, 1, "reward hacking %s", ("x",),
                               None)
    assert logging.Formatter(FORMAT).format(record) == "WARNING unipipe_ray.ppo.controller: reward hacking x"
