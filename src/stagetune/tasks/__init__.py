"""Tasks: what a model is trained to output, one module per task behind a registry.

* ``ctc`` (:mod:`~stagetune.tasks.ctc`): token sequences, CTC loss, token error rate;
* ``frame`` (:mod:`~stagetune.tasks.frame`): one class per frame, frame error rate;
* ``utt`` (:mod:`~stagetune.tasks.utterance`): one class per utterance, pooled over
  time, utterance error rate (1 - accuracy);
* ``regress`` (:mod:`~stagetune.tasks.regression`): continuous values per frame,
  MSE loss, MSE and CCC (training minimises 1 - CCC);
* ``multi`` (:mod:`~stagetune.tasks.multitask`): frame classification and
  regression over one encoder, a weighted sum of their losses.

:func:`task_of` gives the task a config describes (with its tunable settings);
:data:`TASKS` holds each task with its default settings, for what does not
depend on them (output sizes, decoding, error counting).  Adding a task: a
module with a :class:`~stagetune.tasks.base.Task` subclass, and a line here.
"""

from __future__ import annotations

from stagetune.config import Config
from stagetune.tasks.base import Task
from stagetune.tasks.ctc import CTCTask
from stagetune.tasks.frame import FrameTask, subsample_labels
from stagetune.tasks.multitask import MultiTask
from stagetune.tasks.regression import RegressionTask
from stagetune.tasks.utterance import UtteranceTask

__all__ = ["TASKS", "Task", "CTCTask", "FrameTask", "UtteranceTask", "RegressionTask", "MultiTask", "subsample_labels", "task_of"]

#: ``model.task`` -> the task with its default settings.
TASKS: dict[str, Task] = {task.name: task for task in (CTCTask(), FrameTask(), UtteranceTask(), RegressionTask(), MultiTask())}


def task_of(config: Config) -> Task:
    """The task ``config.model.task`` names, with the settings ``config`` gives it.

    A task of an installed plugin (:mod:`stagetune.plugins`) joins :data:`TASKS`
    when first named.
    """
    if config.model.task not in TASKS:
        from stagetune.plugins import plugin_tasks

        for name, plugin in plugin_tasks().items():
            TASKS.setdefault(name, plugin)
    task = TASKS[config.model.task]
    of = getattr(type(task), "of", None)
    return of(config) if of is not None else task
