"""The Trainer callback: total steps from the Trainer, checkpoints carry the pruner state,
and an interrupted run resumed from a checkpoint ends with the same adapter."""

import contextlib
import os

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import SaveStrategy

from prilora import PriLoraCallback, PriLoraConfig, get_prilora_model
from prilora.pruning import STATE_FILE

from conftest import tiny_bert


class Synthetic(torch.utils.data.Dataset):
    def __init__(self, n=48, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, 100, (n, 12), generator=g)
        self.labels = (self.ids[:, 0] > 50).long()  # learnable

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": self.labels[i]}


class StopAt(TrainerCallback):
    """Simulates an interruption: the run stops right after optimizer step `step`."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


def make_trainer(out, max_steps=12, callback_kwargs=None, **cfg):
    model, pruner = get_prilora_model(
        tiny_bert(seed=0), PriLoraConfig(task_type="SEQ_CLS", prune_interval=3, prune_end=0.75, **cfg)
    )
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=8, learning_rate=5e-3,
        save_strategy="steps", save_steps=5, logging_steps=100, report_to=[], seed=0, disable_tqdm=True,
        use_cpu=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Synthetic(),
                      callbacks=[PriLoraCallback(pruner, **(callback_kwargs or {}))])
    return trainer, model, pruner


@contextlib.contextmanager
def _nothing():
    yield


def lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_trainer_prunes_on_schedule_and_saves_state(tmp_path):
    trainer, model, pruner = make_trainer(tmp_path)
    trainer.train()
    assert pruner.total_steps == 12
    assert pruner.global_step == 12
    assert pruner.window() == (0, 9)
    assert pruner.events == 3  # steps 3, 6, 9; held afterwards
    assert pruner.sparsity()["A"] == 0.5
    for step in (5, 10):
        assert os.path.isfile(tmp_path / f"checkpoint-{step}" / STATE_FILE)
        assert os.path.isfile(tmp_path / f"checkpoint-{step}" / "prilora.json")


def test_a_save_total_limit_of_one_is_warned_about(tmp_path, recwarn):
    for folder, limit, strategy in (("two", 2, SaveStrategy.STEPS), ("unsaved", 1, SaveStrategy.NO)):
        trainer, _, _ = make_trainer(tmp_path / folder, max_steps=5)
        trainer.args.save_total_limit, trainer.args.save_strategy = limit, strategy
        trainer.train()
    assert not [w for w in recwarn if "save_total_limit" in str(w.message)]
    trainer, _, pruner = make_trainer(tmp_path / "one", max_steps=5)
    trainer.args.save_total_limit = 1
    with pytest.warns(RuntimeWarning, match=r"^save_total_limit=1: Trainer deletes the previous checkpoint before "
                                            r"PriLoraCallback saves .*use save_total_limit=2 or more$"):
        trainer.train()
    assert pruner.global_step == 5 and os.path.isfile(tmp_path / "one" / "checkpoint-5" / STATE_FILE)


def test_resume_gives_the_same_adapter(tmp_path):
    full, full_model, full_pruner = make_trainer(tmp_path / "full")
    full.train()
    expected = lora_state(full_model)

    # "Interrupted" run: same setup, stopped after the checkpoint at step 10 (after the last
    # event, so the held mask must come back from the checkpoint too) and at step 5.
    for stop in (5, 10):
        out = tmp_path / f"resumed-{stop}"
        part, _, _ = make_trainer(out)
        part.add_callback(StopAt(stop))
        with pytest.warns(RuntimeWarning, match="before the last pruning event") if stop < 9 else _nothing():
            part.train()
        resumed, model, pruner = make_trainer(out)
        resumed.train(resume_from_checkpoint=str(out / f"checkpoint-{stop}"))
        assert pruner.global_step == 12
        got = lora_state(model)
        assert got.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)
        for s_full, s_res in zip(full_pruner.sites, pruner.sites):
            torch.testing.assert_close(pruner.stats.emas.get(s_res.name, torch.zeros(1)),
                                       full_pruner.stats.emas.get(s_full.name, torch.zeros(1)))


def test_resume_without_pruner_state_is_an_error(tmp_path):
    part, _, _ = make_trainer(tmp_path)
    part.add_callback(StopAt(5))
    with pytest.warns(RuntimeWarning, match="before the last pruning event"):
        part.train()
    os.remove(tmp_path / "checkpoint-5" / STATE_FILE)
    resumed, _, _ = make_trainer(tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no prilora_pruner.safetensors: pass PriLoraCallback"):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-5"))


def test_state_dict_round_trip(tmp_path):
    trainer, model, pruner = make_trainer(tmp_path, max_steps=12)
    trainer.train()
    pruner.save(tmp_path)
    _, _, fresh = make_trainer(tmp_path / "other")
    fresh.load(tmp_path)
    assert (fresh.global_step, fresh.events, fresh.stats.updates) == (pruner.global_step, pruner.events, pruner.stats.updates)
    for name in pruner.stats.emas:
        torch.testing.assert_close(fresh.stats.emas[name], pruner.stats.emas[name], rtol=0, atol=0)
    for name, mask in pruner._masks.items():
        assert torch.equal(fresh._masks[name], mask)


def test_state_from_another_model_is_refused(tmp_path):
    trainer, model, pruner = make_trainer(tmp_path, max_steps=12)
    trainer.train()
    pruner.save(tmp_path)
    other_model, other = get_prilora_model(tiny_bert(seed=0), PriLoraConfig(task_type="SEQ_CLS", r_start=2, r_end=6))
    with pytest.raises(ValueError, match=r"mask for .* has shape \(4, 32\), the model.s A has \(2, 32\): it was saved from a different model"):
        other.load(tmp_path)


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"),  # the terminal that closed (SIGHUP)
                                   RuntimeError("reentrant call inside <_io.BufferedWriter name='<stderr>'>")])
def test_a_signal_whose_message_cannot_be_printed_still_stops_the_run(ctrl_c, monkeypatch, error):
    """The handler prints in the middle of whatever the run was doing: a write to a terminal that closed
    fails, and one that lands while the run itself is inside a write to stderr re-enters its buffer. Either
    would leave the handler as an exception raised inside the training step; the stop must hold instead."""
    import os
    import signal

    from prilora import SaveOnInterrupt

    class Unwritable:
        def write(self, text):
            raise error

        def flush(self):
            raise error

    monkeypatch.setattr("sys.stderr", Unwritable())
    with pytest.raises(KeyboardInterrupt, match="after the last optimizer step"):
        with SaveOnInterrupt() as interrupt:
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs here; nothing may escape it
            assert interrupt.requested


def test_save_on_interrupt_outside_a_step_and_when_disabled(ctrl_c):
    import os
    import signal

    from prilora import SaveOnInterrupt

    # A signal after the last optimizer step: training is over, the run still stops (no results written).
    with pytest.raises(KeyboardInterrupt, match="after the last optimizer step"):
        with SaveOnInterrupt() as interrupt:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGTERM)  # more signals: ignored while it stops
            assert interrupt.requested
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with interrupt:  # the same callback around a new train() call: the earlier stop is over
        assert not interrupt.requested and not interrupt.stopped
    # Disabled: Ctrl-C stops at once, as without it.
    with pytest.raises(KeyboardInterrupt) as stopped:
        with SaveOnInterrupt(enabled=False) as interrupt:
            os.kill(os.getpid(), signal.SIGINT)
    assert str(stopped.value) == "" and not interrupt.requested
    # An ignored SIGINT (a background job's) stays ignored; SIGTERM is still handled.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with SaveOnInterrupt() as interrupt:
        os.kill(os.getpid(), signal.SIGINT)
        assert not interrupt.requested and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupt.requested
        interrupt.requested = False  # training went on to its end
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    # A closed terminal (SIGHUP) stops it as SIGTERM does; under nohup (SIGHUP ignored) it stays ignored.
    before = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a terminal, whatever the test runner ignores
    try:
        with SaveOnInterrupt() as interrupt:
            os.kill(os.getpid(), signal.SIGHUP)
            assert interrupt.requested
            interrupt.requested = False
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        with SaveOnInterrupt() as interrupt:
            os.kill(os.getpid(), signal.SIGHUP)
            assert not interrupt.requested and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
