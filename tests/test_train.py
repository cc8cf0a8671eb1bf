"""The training loop: schedule, decay groups, reproducibility and an exact resume."""
import math
import re

import pytest
import torch

import fastbert
from fastbert import heads, train

CONFIG = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=32)


def _features(n=40):
    generator = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        length = int(torch.randint(3, 20, (1,), generator=generator))
        ids = torch.randint(1, 64, (length,), generator=generator)
        out.append({"input_ids": ids, "label": int(ids.sum() % 2)})
    return out


def _collate(examples):
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, e in enumerate(examples):
        ids[row, :len(e["input_ids"])] = e["input_ids"]
        mask[row, :len(e["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["label"] for e in examples])}


def _trainer(out, **overrides):
    torch.manual_seed(0)
    model = heads.BertForSequenceClassification(fastbert.BertConfig(**CONFIG), num_labels=2)
    cfg = train.TrainConfig(out=out, **{**dict(epochs=2, batch_size=8, lr=1e-3, save_every=3, progress=False), **overrides})
    features = _features()
    return train.Trainer(model, features, _collate, cfg, lengths=[len(f["input_ids"]) for f in features])


def test_interrupted_and_resumed_run_ends_with_identical_weights(tmp_path):
    whole = _trainer(tmp_path / "whole")
    whole.train()
    first = _trainer(tmp_path / "resumed")
    assert first.train(stop_after_step=6) == {"stopped_at_step": 6}   # checkpoint at step 6 was written
    second = _trainer(tmp_path / "resumed")
    torch.manual_seed(1234)  # a fresh process would start from another RNG state: resume must restore it
    assert second.resume() and second.step == 6
    second.train()
    assert second.step == whole.step == 10
    for (name, a), b in zip(whole.model.state_dict().items(), second.model.state_dict().values()):
        assert torch.equal(a, b), name
    # the epoch cut by the interruption reports the mean loss of all its batches, not just the resumed ones
    assert second.history == whole.history


def test_resume_from_a_checkpoint_at_the_last_step_closes_the_epoch(tmp_path):
    """save_every that divides the run: the last checkpoint comes before the epoch's evaluation;
    a run stopped there and resumed still evaluates and records that epoch (it ended without it)."""
    def trainer(out):
        t = _trainer(out, save_every=5)
        t.evaluate_fn = lambda model: {"score": 0.5}
        return t

    whole = trainer(tmp_path / "whole")
    whole.train()
    stopped = trainer(tmp_path / "resumed")
    stopped.train(stop_after_step=10)
    again = trainer(tmp_path / "resumed")
    assert again.resume() and again.step == 10
    summary = again.train()
    assert summary["epochs"] == whole.history and [h["epoch"] for h in whole.history] == [1, 2]
    assert whole.history[-1]["score"] == 0.5


def test_resume_with_other_settings_is_refused(tmp_path):
    _trainer(tmp_path).train(stop_after_step=3)
    other = _trainer(tmp_path, batch_size=4)
    with pytest.raises(ValueError, match=r"cannot resume .*batch_size=8 there, 4 now"):
        other.resume()
    # accepted before: the schedule's length, the learning rate and the update's settings (the
    # scheduler restores only its step count, so each of these bent the rest of the run)
    for change, said in [(dict(epochs=3), "total_steps=10 there, 15 now"), (dict(max_steps=4), "total_steps=10 there, 4 now"),
                         (dict(lr=2e-3), "lr=0.001 there, 0.002 now"), (dict(warmup_ratio=0.2), "warmup_ratio=0.1 there"),
                         (dict(weight_decay=0.0), "weight_decay=0.01 there"), (dict(max_grad_norm=0.5), "max_grad_norm=1.0 there")]:
        with pytest.raises(ValueError, match=rf"cannot resume .*{said}.*fresh folder"):
            _trainer(tmp_path, **change).resume()
    assert _trainer(tmp_path).resume()  # the same settings still resume


def test_resume_in_another_precision_is_refused(tmp_path):
    """An fp32 checkpoint resumed under bf16 autocast (or the other way) continued as neither run."""
    _trainer(tmp_path).train(stop_after_step=3)
    with pytest.raises(ValueError, match=r"cannot resume .*precision='float32' there, 'bfloat16' now"):
        _trainer(tmp_path, precision="bf16").resume()
    assert _trainer(tmp_path, precision="fp32").resume()


def test_two_trainers_never_write_one_folder_at_once(tmp_path):
    """Two runs writing one --out shared its staging names: the second died on the first's
    temporary files, or left a checkpoint of one's weights beside the other's optimizer state,
    which a resume accepted. The folder is held from resume() (or train()) to the end of train()."""
    first, second = _trainer(tmp_path), _trainer(tmp_path)
    assert not first.resume()                               # holds the folder, nothing to load yet
    with pytest.raises(RuntimeError, match=r"is in use by another fastbert run .*\.lock"):
        second.train()
    with pytest.raises(RuntimeError, match="is in use by another fastbert run"):
        second.resume()
    first.train(stop_after_step=3)                          # lets it go at the end
    assert second.resume() and second.step == 3
    second.train()
    assert second.step == 10


def test_a_trainer_that_will_not_train_lets_the_folder_go(tmp_path):
    """A Trainer that resumed (to inspect a run) and never trained held --out until garbage
    collection: another run on the folder was refused meanwhile. close() lets it go."""
    _trainer(tmp_path).train(stop_after_step=3)
    looked = _trainer(tmp_path)
    assert looked.resume() and looked.step == 3
    with pytest.raises(RuntimeError, match="is in use by another fastbert run"):
        _trainer(tmp_path).resume()
    looked.close()
    looked.close()                                          # twice is harmless
    assert _trainer(tmp_path).resume()


def test_a_with_block_holds_the_folder_past_train(tmp_path):
    """train() lets --out go at its end; the CLI then wrote the final model there unheld. A `with`
    block holds it to the block's end, through what the caller writes after train()."""
    with _trainer(tmp_path) as first:
        first.train(stop_after_step=3)
        with pytest.raises(RuntimeError, match="is in use by another fastbert run"):
            _trainer(tmp_path).resume()
    assert _trainer(tmp_path).resume()
    with pytest.raises(ZeroDivisionError):
        with _trainer(tmp_path) as failed:
            failed.resume()
            raise ZeroDivisionError
    assert _trainer(tmp_path).resume()                      # let go on the way out of an error too


def test_a_refused_resume_leaves_the_model_as_it_was(tmp_path):
    """The checkpoint's weights were copied in before its state was checked: a caller who caught the
    refusal and trained afresh started from them."""
    _trainer(tmp_path).train(stop_after_step=3)
    other = _trainer(tmp_path, batch_size=4)
    before = {k: v.clone() for k, v in other.model.state_dict().items()}
    with pytest.raises(ValueError, match="cannot resume"):
        other.resume()
    assert all(torch.equal(before[k], v) for k, v in other.model.state_dict().items())
    assert other.step == 0 and not other.optimizer.state


def test_resume_on_other_token_ids_of_the_same_count_is_refused(tmp_path):
    """Only the number of examples was compared: other data of the same size, or the same data cut
    to another --max-seq-len or read by another tokenizer, resumed as if it were the run's."""
    _trainer(tmp_path).train(stop_after_step=3)
    cut = _trainer(tmp_path)
    cut.features = [{**f, "input_ids": f["input_ids"][:8]} for f in cut.features]  # a shorter max length
    with pytest.raises(ValueError, match=r"cannot resume .*token_ids='[0-9a-f]{16}' there, '[0-9a-f]{16}' now"):
        cut.resume()
    assert _trainer(tmp_path).resume()


@pytest.mark.parametrize("pointer", ["", "checkpoint-99", "../elsewhere", "."])
def test_a_latest_naming_no_checkpoint_folder_is_named(tmp_path, pointer):
    _trainer(tmp_path).train(stop_after_step=3)
    (tmp_path / "latest").write_text(pointer + "\n")
    with pytest.raises(FileNotFoundError, match=rf"cannot resume: .*latest must name a checkpoint folder in "
                                                rf".*, holds '{re.escape(pointer)}'"):
        _trainer(tmp_path).resume()


def test_saving_again_the_step_latest_names_never_leaves_it_naming_a_missing_folder(tmp_path, monkeypatch):
    """A resumed run can save the step it resumed from again: the old folder was deleted while
    `latest` still named it, so a crash before the new one was renamed in left nothing to resume."""
    import os

    _trainer(tmp_path).train(stop_after_step=3)
    again = _trainer(tmp_path)
    assert again.resume() and again.step == 3
    real_replace = os.replace

    def crash_on_the_checkpoint_rename(src, dst):
        if os.path.basename(dst) == "checkpoint-3":
            raise KeyboardInterrupt("killed between deleting checkpoint-3 and renaming its new copy in")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_the_checkpoint_rename)
    with pytest.raises(KeyboardInterrupt):
        again.save_checkpoint()
    monkeypatch.setattr(os, "replace", real_replace)
    again._release_out()  # killed: the kernel lets its lock go
    after_crash = _trainer(tmp_path)
    assert after_crash.resume() and after_crash.step == 3
    assert (tmp_path / again.save_checkpoint()).name == "checkpoint-3"   # the next save completes it
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-3" and not list(tmp_path.glob(".staging-*"))
    after_crash._release_out()
    assert _trainer(tmp_path).resume()


@pytest.mark.parametrize("pointer", ["global_step100", "..", "ABSOLUTE"])
def test_a_save_deletes_no_folder_but_its_own_checkpoints(tmp_path, pointer):
    """A save deleted whatever folder `latest` named: another tool's (DeepSpeed writes `latest` =
    "global_step100"), an absolute path, or ".." (the folder above --out, the new checkpoint in it)."""
    out, victim = tmp_path / "project" / "run", tmp_path / "victim"
    for folder in (out / "global_step100", victim):
        folder.mkdir(parents=True)
        (folder / "notes.txt").write_text("keep me")
    (out.parent / "notes.txt").write_text("keep me")
    (out / "latest").write_text((str(victim) if pointer == "ABSOLUTE" else pointer) + "\n")
    _trainer(out).train(stop_after_step=3)
    for kept in (out / "global_step100", victim, out.parent):
        assert (kept / "notes.txt").read_text() == "keep me", kept
    assert (out / "latest").read_text().strip() == "checkpoint-3" and _trainer(out).resume()


def test_a_save_cut_short_after_moving_its_copy_in_still_resumes(tmp_path, monkeypatch):
    """Saving again the step `latest` names points `latest` at the staging copy, moves it into
    place, then points `latest` back. Killed before that last write, `latest` named a staging
    folder that was gone, beside the complete checkpoint, and --resume refused."""
    from fastbert.checkpoint import atomic_write_text as real_write

    _trainer(tmp_path).train(stop_after_step=3)
    again = _trainer(tmp_path)
    assert again.resume() and again.step == 3

    def crash_on_the_pointer_back(path, text):
        if path.name == "latest" and text.strip() == "checkpoint-3" and (tmp_path / "checkpoint-3").is_dir() \
                and not (tmp_path / ".staging-checkpoint-3").exists():
            raise KeyboardInterrupt("killed after the rename, before `latest` names it")
        return real_write(path, text)

    monkeypatch.setattr(train, "atomic_write_text", crash_on_the_pointer_back)
    with pytest.raises(KeyboardInterrupt):
        again.save_checkpoint()
    monkeypatch.setattr(train, "atomic_write_text", real_write)
    assert (tmp_path / "latest").read_text().strip() == ".staging-checkpoint-3"
    again._release_out()  # killed: the kernel lets its lock go
    resumed = _trainer(tmp_path)
    assert resumed.resume() and resumed.step == 3
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-3"


def test_an_old_checkpoint_whose_delete_was_cut_short_goes_at_the_next_save(tmp_path, monkeypatch):
    """The previous checkpoint was deleted in place: killed mid-delete, a folder of half its files
    (weights, no trainer state) stayed beside the new one for good, against "only the newest is kept"."""
    import shutil

    t = _trainer(tmp_path)
    t.train(stop_after_step=3)
    real_rmtree = shutil.rmtree

    def killed_mid_delete(path, *args, **kwargs):
        path = train.Path(path)
        if path.name.endswith("checkpoint-3-old") and path.exists():
            (path / "trainer_state.pt").unlink()
            raise KeyboardInterrupt("killed while deleting the old checkpoint")
        return real_rmtree(path, *args, **kwargs)

    t.step = 6
    monkeypatch.setattr(shutil, "rmtree", killed_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        t.save_checkpoint()
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert (tmp_path / "latest").read_text().strip() == "checkpoint-6"
    assert not (tmp_path / "checkpoint-3").exists(), "half a checkpoint kept under a checkpoint's name"
    t.step = 9
    t.save_checkpoint()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["checkpoint-9"]


def test_resume_from_a_broken_trainer_state_names_the_file(tmp_path):
    _trainer(tmp_path).train(stop_after_step=3)
    path = tmp_path / (tmp_path / "latest").read_text().strip() / "trainer_state.pt"
    intact = path.read_bytes()
    path.write_bytes(intact[: len(intact) // 2])
    with pytest.raises(ValueError, match=r"cannot resume: .*trainer_state\.pt could not be loaded with weights_only=True"):
        _trainer(tmp_path).resume()
    torch.save({"step": 3}, path)
    with pytest.raises(ValueError, match=r"trainer_state\.pt is not a fastbert trainer state \(it lacks \['optimizer'"):
        _trainer(tmp_path).resume()
    torch.save({"step": 3, "payload": print}, path)  # code in the pickle: weights_only refuses it
    with pytest.raises(ValueError, match="could not be loaded with weights_only=True"):
        _trainer(tmp_path).resume()
    path.write_bytes(intact)
    assert _trainer(tmp_path).resume()

def test_same_seed_same_run(tmp_path):
    a, b = _trainer(tmp_path / "a"), _trainer(tmp_path / "b")
    a.train(), b.train()
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))


def test_loss_goes_down_and_checkpoint_is_loadable(tmp_path):
    t = _trainer(tmp_path, bucket_by_length=True)
    t.cfg.epochs = 6
    t.__init__(t.model, t.features, t.collate, t.cfg, lengths=[len(f["input_ids"]) for f in t.features])
    summary = t.train()
    losses = [e["train_loss"] for e in summary["epochs"]]
    assert losses[-1] < losses[0]
    latest = tmp_path / (tmp_path / "latest").read_text().strip()
    again = heads.BertForSequenceClassification.from_pretrained(latest)
    assert all(torch.equal(x, y) for x, y in zip(again.state_dict().values(), t.model.state_dict().values()))
    assert len(list(tmp_path.glob("checkpoint-*"))) == 1  # older checkpoints are removed


def test_bf16_autocast_run_trains_with_float32_master_weights(tmp_path):
    """Mixed precision as on a GPU (there bf16 is the default), through CPU autocast: the loop
    runs, parameters and their optimizer state stay float32, the loss goes down."""
    t = _trainer(tmp_path, precision="bf16")
    assert t.autocast == torch.bfloat16
    t.cfg.epochs = 6
    t.__init__(t.model, t.features, t.collate, t.cfg, lengths=[len(f["input_ids"]) for f in t.features])
    summary = t.train()
    losses = [e["train_loss"] for e in summary["epochs"]]
    assert all(l == l for l in losses) and losses[-1] < losses[0], losses
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
    assert all(v.dtype == torch.float32 for st in t.optimizer.state.values() for k, v in st.items() if k != "step")


def test_precision_choice():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert train._autocast_dtype("auto", cpu) is None and train._autocast_dtype("fp32", gpu) is None
    assert train._autocast_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        train._autocast_dtype("fp16", cpu)
    assert train._autocast_dtype("fp16", gpu) == torch.float16


def test_auto_precision_asks_the_training_device(monkeypatch):
    """is_bf16_supported() asks the current device (cuda:0) and says yes on pre-Ampere GPUs too (its
    emulation check): "auto" on a V100 as cuda:1 beside an H100 as cuda:0 took bf16."""
    capabilities = {0: (9, 0), 1: (7, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capabilities[
        device.index if isinstance(device, torch.device) and device.index is not None else 0])
    assert train._autocast_dtype("auto", torch.device("cuda:1")) == torch.float16
    assert train._autocast_dtype("auto", torch.device("cuda:0")) == torch.bfloat16
    assert train._autocast_dtype("auto", torch.device("cuda")) == torch.bfloat16


def test_decay_groups_and_schedule():
    model = heads.BertForSequenceClassification(fastbert.BertConfig(**CONFIG), num_labels=2)
    decay, exempt = train.parameter_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(not names[id(p)].endswith("bias") and "norm" not in names[id(p)] for p in decay["params"])
    assert any("norm" in names[id(p)] for p in exempt["params"])
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = train.linear_warmup_decay(opt, warmup_steps=2, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    assert lrs[0] < lrs[1] < lrs[2] == 1.0 and lrs[-1] < lrs[3] and lrs[-1] > 0


def test_epoch_batches_are_a_permutation_and_deterministic():
    batches = train.epoch_batches(103, 10, seed=3, epoch=1, lengths=list(range(103)))
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(103)) and batches == train.epoch_batches(103, 10, seed=3, epoch=1, lengths=list(range(103)))
    assert batches != train.epoch_batches(103, 10, seed=3, epoch=2, lengths=list(range(103)))


def test_bad_config(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        train.TrainConfig(out=tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="precision must be"):
        train.TrainConfig(out=tmp_path, precision="fp8")
    # silently accepted before: save_every=0 wrote no checkpoint at all; a warm-up ratio outside [0, 1]
    with pytest.raises(ValueError, match="save_every must be >= 1"):
        train.TrainConfig(out=tmp_path, save_every=0)
    with pytest.raises(ValueError, match=r"warmup_ratio must be in \[0, 1\]"):
        train.TrainConfig(out=tmp_path, warmup_ratio=-0.5)
    # inf passed both range checks and trained to NaN weights, saved without a word
    for name, value in (("weight_decay", -1.0), ("weight_decay", math.inf), ("weight_decay", math.nan)):
        with pytest.raises(ValueError, match="weight_decay must be finite and >= 0"):
            train.TrainConfig(out=tmp_path, **{name: value})
    for lr in (0.0, -1e-3, math.inf, math.nan):
        with pytest.raises(ValueError, match="lr must be finite and > 0"):
            train.TrainConfig(out=tmp_path, lr=lr)
    for name, value in (("lr", "1e-3"), ("weight_decay", None), ("max_grad_norm", True)):
        with pytest.raises(TypeError, match=f"{name} must be a number"):
            train.TrainConfig(out=tmp_path, **{name: value})
    # 2.5 failed later as a slice index, naming nothing
    for name, value in (("batch_size", 2.5), ("grad_accum", 1.5), ("epochs", True), ("max_steps", 3.0),
                        ("save_every", "2")):
        with pytest.raises(TypeError, match=f"{name} must be an int"):
            train.TrainConfig(out=tmp_path, **{name: value})
    for seed in (-1, 2**32, 2**45, 1.5, True):  # 2**45 overflowed torch's seed after the data was read
        with pytest.raises(ValueError, match=r"seed must be an int in \[0, 2\*\*32\)"):
            train.TrainConfig(out=tmp_path, seed=seed)
    assert train.TrainConfig(out=tmp_path, seed=2**32 - 1).seed == 2**32 - 1
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="is a file; checkpoints need a folder"):
        train.TrainConfig(out=tmp_path / "a_file")


def test_non_finite_loss_stops_before_the_optimizer_step(tmp_path, monkeypatch):
    """A NaN loss raises a clear error at its step, and the weights stay as they were: the check
    (the step's one host sync) comes before the optimizer can spread the NaN."""
    trainer = _trainer(tmp_path / "run")
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    real_forward = trainer.model.forward

    def nan_loss(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer.model, "forward", nan_loss)
    with pytest.raises(FloatingPointError, match="loss became nan at step 0"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())


def test_compiled_training_forward_matches_eager(tmp_path):
    """TrainConfig(compile=...) trains through torch.compile (AOTAutograd here: the forward and
    backward graphs a compiled run uses, without inductor's minutes of C++ compiling on a CPU):
    the same losses and weights as eager, across batches of several lengths."""
    no_dropout = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    runs = {}
    for backend in (None, "aot_eager"):
        torch.manual_seed(0)
        model = heads.BertForSequenceClassification(fastbert.BertConfig(**CONFIG, **no_dropout), num_labels=2)
        cfg = train.TrainConfig(out=tmp_path / str(backend), max_steps=4, batch_size=8, lr=1e-3, progress=False,
                                compile=backend)
        trainer = train.Trainer(model, _features(), _collate, cfg)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        trainer.train()
        runs[backend] = trainer
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == (backend is not None), f"compile={backend}: {graphs} graphs compiled"
    compiled = runs["aot_eager"]
    losses = [h["train_loss"] for h in runs[None].history], [h["train_loss"] for h in compiled.history]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    for (name, a), b in zip(runs[None].model.state_dict().items(), compiled.model.state_dict().values()):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
    with pytest.raises(ValueError, match="torch.compile backend"):
        train.TrainConfig(out=tmp_path, compile="fastest")


# -- audit: accumulation, decay groups, resume in the same process, checkpoints, throughput -----------------

NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def recording_grads(trainer) -> list:
    """Each optimizer step's gradients, recorded in place of the update (the weights stay put), so
    runs with other batch splits (or processes: test_distributed.py) can be compared step by step."""
    grads = []

    def record():
        grads.append({n: p.grad.cpu() for n, p in trainer.model.named_parameters() if p.grad is not None})
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.step += 1

    trainer._optimizer_step = record
    return grads


def _grads_per_step(trainer):
    """The gradient each optimizer step would apply, with the update itself skipped: every group is
    differentiated at the same weights, so runs with other batch splits can be compared exactly."""
    grads = recording_grads(trainer)
    trainer.train()
    return grads


def _token_features(n=16):
    """Tagging-like examples: labels on some tokens only (-100 elsewhere), a different count in each;
    example 5 has no labelled token at all (a sentence whose words all tokenize to nothing)."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 20, (1,), generator=generator))
        ids = torch.randint(1, 64, (length,), generator=generator).tolist()
        labelled = 0 if i == 5 else 1 + (i * 7) % (length - 1)
        labels = [-100] + [x % 3 for x in ids[1:1 + labelled]] + [-100] * (length - 1 - labelled)
        out.append({"input_ids": ids, "labels": labels})
    return out


def _qa_features(n=16):
    """QA examples; every third one has its answer outside the window (position 1000: the head
    ignores it, as transformers' does), so a batch of one may hold no loss term at all. One length:
    the span losses' softmax runs over padded positions too (as transformers'), so only batches
    without padding give the large batch's loss exactly."""
    generator = torch.Generator().manual_seed(2)
    out = []
    for i in range(n):
        length = 12
        start = 1000 if i % 3 == 0 else int(torch.randint(1, length - 2, (1,), generator=generator))
        out.append({"input_ids": torch.randint(1, 64, (length,), generator=generator).tolist(),
                    "start_positions": start, "end_positions": start if start == 1000 else start + 1})
    return out


@pytest.mark.parametrize("case", ["sequence_short_last_batch", "tokens", "tokens_unlabelled_batch", "qa_ignored"])
def test_accumulated_gradient_equals_the_large_batch_gradient(tmp_path, case):
    """grad_accum=k over batches of b is one batch of k*b: each micro-batch's mean loss is weighted by
    its share of the group's loss terms (examples; labelled tokens for tagging), not by 1/k. Before,
    a short last batch (44 = 8+8+8+8+8+4) and token losses over unequal label counts were misweighted,
    and a micro-batch without a labelled token gave a NaN loss (0/0) that stopped the run."""
    from fastbert import data

    config = fastbert.BertConfig(**CONFIG, **NO_DROPOUT)
    if case == "sequence_short_last_batch":
        features, collate, (small, large, accum) = _features(44), _collate, (8, 16, 2)
        make = lambda: heads.BertForSequenceClassification(config, num_labels=2)
    elif case == "qa_ignored":
        # positions outside the window count no loss term (a batch of only those was a NaN loss
        # that stopped the run, and the others were misweighted)
        features, collate, (small, large, accum) = _qa_features(), data.collate, (1, 4, 4)
        make = lambda: heads.BertForQuestionAnswering(config)
    else:
        features, collate = _token_features(), data.collate
        small, large, accum = (4, 8, 2) if case == "tokens" else (1, 4, 4)
        make = lambda: heads.BertForTokenClassification(config, num_labels=3)
    runs = []
    for batch_size, grad_accum in ((small, accum), (large, 1)):
        torch.manual_seed(0)
        cfg = train.TrainConfig(out=tmp_path / f"{batch_size}", epochs=1, batch_size=batch_size, grad_accum=grad_accum,
                                lr=1e-3, progress=False, save_every=10**9)
        runs.append(_grads_per_step(train.Trainer(make(), features, collate, cfg)))
    accumulated, whole = runs
    assert len(accumulated) == len(whole) == -(-len(features) // large) >= 2
    for step, (a, b) in enumerate(zip(accumulated, whole)):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6,
                                       msg=lambda m, name=name, step=step: f"step {step}, {name}: {m}")


def test_layernorm_is_exempt_from_decay_whatever_its_name():
    """transformers' Trainer finds LayerNorm by module type as well as by name: GPT-2 calls its norms
    ln_1/ln_f, and their weights must not be decayed towards zero either."""
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.ln_1 = torch.nn.LayerNorm(4)
            self.embeddings = torch.nn.Embedding(10, 4)

    block = Block()
    decay, exempt = train.parameter_groups(block, 0.01)
    names = {id(p): n for n, p in block.named_parameters()}
    assert sorted(names[id(p)] for p in decay["params"]) == ["embeddings.weight", "proj.weight"]
    assert sorted(names[id(p)] for p in exempt["params"]) == ["ln_1.bias", "ln_1.weight", "proj.bias"]


def test_resume_after_an_interruption_mid_accumulation_in_the_same_process(tmp_path):
    """Ctrl-C in the middle of an accumulation group leaves that group's gradients on the parameters;
    a new Trainer over the same model that resumes must not add them to its first step."""
    whole = _trainer(tmp_path / "whole", grad_accum=2)
    whole.train()
    first = _trainer(tmp_path / "resumed", grad_accum=2)   # 5 batches an epoch: steps of 2, 2, 1 batches
    calls, forward_backward = [], first._forward_backward

    def interrupted(batch, scale):
        calls.append(1)
        if len(calls) == 9:   # epoch 2, the second batch of step 5 (after checkpoint-3)
            raise KeyboardInterrupt
        return forward_backward(batch, scale)

    first._forward_backward = interrupted
    with pytest.raises(KeyboardInterrupt):
        first.train()
    assert any(p.grad is not None for p in first.model.parameters())
    again = train.Trainer(first.model, first.features, first.collate, first.cfg, lengths=first.lengths)
    torch.manual_seed(1234)
    assert again.resume() and again.step == 3
    again.train()
    for (name, a), b in zip(whole.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_cuda_rng_state_is_the_training_devices(tmp_path, monkeypatch):
    """On cuda:1 the dropout seeds come from cuda:1's generator; torch.cuda.get_rng_state() without
    a device is the current device's (cuda:0), so a resume there would not continue the same run."""
    seen = []
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda device="cuda": seen.append(("get", torch.device(device))) or torch.zeros(8, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device="cuda": seen.append(("set", torch.device(device))))
    saver = _trainer(tmp_path)
    saver.device = torch.device("cuda", 1)
    saver.save_checkpoint()
    loader = _trainer(tmp_path)
    loader.device = torch.device("cuda", 1)
    assert loader.resume()
    assert seen == [("get", torch.device("cuda", 1)), ("set", torch.device("cuda", 1))]


def test_checkpoint_is_durable_before_the_previous_one_is_removed(tmp_path, monkeypatch):
    """Atomic is not enough across a power cut: the renames (checkpoint folder, `latest`) live in the
    output folder's entries, which must be fsynced before the previous checkpoint is deleted."""
    import os
    import shutil
    import stat

    events = []
    real_fsync, real_replace, real_rmtree = os.fsync, os.replace, shutil.rmtree

    def fsync(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            events.append(("fsync", os.path.realpath(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.realpath(dst)))
        return real_replace(src, dst)

    def rmtree(path, *args, **kwargs):
        events.append(("rmtree", os.path.realpath(path)))
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    out = tmp_path.resolve()
    _trainer(out).train(stop_after_step=6)   # checkpoint-3, then checkpoint-6 replaces it
    # the deletion: checkpoint-3 renamed out of the way, then deleted
    removed = events.index(("replace", str(out / ".staging-checkpoint-3-old")))
    assert ("rmtree", str(out / ".staging-checkpoint-3-old")) in events[removed:]
    pointer = max(i for i, e in enumerate(events[:removed]) if e == ("replace", str(out / "latest")))
    moved = events.index(("replace", str(out / "checkpoint-6")))
    assert ("fsync", str(out)) in events[pointer:removed]                       # `latest` -> 6 is on disk
    assert ("fsync", str(out)) in events[moved:pointer]                         # so is checkpoint-6's name
    assert ("fsync", str(out / ".staging-checkpoint-6")) in events[:moved]      # and its files' names


def test_tokens_per_second_counts_real_tokens_over_training_time(tmp_path):
    """tok/s is real (unpadded) tokens over the time spent training: evaluation and checkpoint
    writes are not training, and before they were in the denominator (the bar's tok/s fell after
    each evaluation)."""
    import time

    t = _trainer(tmp_path)
    t.evaluate_fn = lambda model: time.sleep(0.2) or {"score": 1.0}
    summary = t.train()
    real_tokens = 2 * sum(len(f["input_ids"]) for f in t.features)   # two epochs; padding not counted
    assert summary["tokens_per_s"] * summary["train_time_s"] == pytest.approx(real_tokens, rel=1e-9)
    assert summary["train_time_s"] <= summary["wall_time_s"] - 2 * 0.2


def test_epoch_record_printed_as_strict_json(tmp_path, capsys):
    """The line printed after each epoch is JSON: an undefined metric (Pearson of constant
    predictions is NaN) is null there, as in metrics.json, not the bare NaN strict parsers refuse."""
    import json

    t = _trainer(tmp_path, max_steps=2)
    t.evaluate_fn = lambda model: {"pearson": float("nan")}
    t.train()

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert lines and all(json.loads(line, parse_constant=refuse)["pearson"] is None for line in lines)


def test_collate_drawing_from_python_and_numpy_random_is_reproducible_and_resumes_exactly(tmp_path):
    """A collate that augments (random masking, as for MLM) draws from `random` or numpy, not torch:
    the seed fixes those generators too and a checkpoint holds their state, as transformers'
    Trainer does (set_seed; rng_state.pth)."""
    import random

    import numpy as np

    def masking_collate(examples):
        batch = _collate(examples)
        for row in range(len(examples)):
            if random.random() < 0.5:
                batch["input_ids"][row, 1] = 0
            batch["input_ids"][row, 2] = int(np.random.randint(1, 64))
        return batch

    def trainer(out):
        t = _trainer(out)
        t.collate = masking_collate
        return t

    random.seed(1), np.random.seed(1)
    whole = trainer(tmp_path / "whole")
    whole.train()
    random.seed(2), np.random.seed(2)            # another process: the same seed, the same run
    again = trainer(tmp_path / "again")
    again.train()
    first = trainer(tmp_path / "resumed")
    first.train(stop_after_step=6)
    random.seed(3), np.random.seed(3)            # a fresh process resumes from another state
    second = trainer(tmp_path / "resumed")
    assert second.resume() and second.step == 6
    second.train()
    for (name, a), b, c in zip(whole.model.state_dict().items(), again.model.state_dict().values(),
                               second.model.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c), name


def test_a_step_the_fp16_gradient_scaler_skips_does_not_advance_the_schedule(tmp_path):
    """fp16's GradScaler skips the update of a step whose gradients overflowed (common in the first
    steps while its scale settles); the learning-rate schedule must not move on without it, as in
    transformers' Trainer (optimizer_step_was_skipped), or the warm-up is cut short."""
    import warnings

    t = _trainer(tmp_path, max_steps=4, save_every=None)
    t.scaler = torch.amp.GradScaler("cpu")   # the CUDA scaler's logic, on the CPU
    overflowing = [True, True]                # the first two steps' gradients overflow

    def hook(grad):
        return torch.full_like(grad, float("inf")) if overflowing else grad

    t.model.classifier.weight.register_hook(hook)
    real_step = t._optimizer_step

    def step():
        real_step()
        if overflowing:
            overflowing.pop()

    t._optimizer_step = step
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*lr_scheduler.step.*before.*optimizer.step")
        t.train()
    assert t.step == 4 and t.scheduler.last_epoch == 2
    assert t.scaler.get_scale() == 65536.0 / 4


def test_bucketing_without_lengths_measures_them(tmp_path):
    """bucket_by_length=True with no lengths= used to train unbucketed without a word."""
    torch.manual_seed(0)
    model = heads.BertForSequenceClassification(fastbert.BertConfig(**CONFIG), num_labels=2)
    features = _features()
    cfg = train.TrainConfig(out=tmp_path, epochs=1, batch_size=8, progress=False, bucket_by_length=True)
    measured = train.Trainer(model, features, _collate, cfg)
    given = train.Trainer(model, features, _collate, cfg, lengths=[len(f["input_ids"]) for f in features])
    assert measured.lengths == given.lengths
    with pytest.raises(ValueError, match="bucket_by_length needs lengths"):
        train.Trainer(model, [{"text": "no ids"}] * 4, _collate, cfg)
    for wrong in (given.lengths[:-1], given.lengths + [3]):  # an IndexError mid-epoch, or silently ignored, before
        with pytest.raises(ValueError, match=f"one length per feature: 40 features, {len(wrong)} lengths"):
            train.Trainer(model, features, _collate, cfg, lengths=wrong)


def test_a_staging_folder_left_by_a_killed_run_is_removed(tmp_path):
    t = _trainer(tmp_path)
    (tmp_path / ".staging-checkpoint-7").mkdir(parents=True)          # a run killed while writing step 7
    (tmp_path / ".staging-checkpoint-7" / "config.json").write_text("{")
    t.save_checkpoint()
    assert not list(tmp_path.glob(".staging-*")) and (tmp_path / "checkpoint-0").is_dir()


# -- audit: the optimizer step against a plain PyTorch loop; clipping; weights_only --------------------


def test_updates_match_a_plain_pytorch_adamw_loop(tmp_path):
    """The Trainer's steps against the recipe written out by hand: AdamW with weight decay on the
    matrices only (biases and LayerNorm exempt), each step's learning rate from the documented
    schedule (warm-up factor (step + 1) / (warmup_steps + 1) with warmup_steps = int(warmup_ratio *
    total_steps), then linear decay to 0 at total_steps), gradients clipped to max_grad_norm. The other
    tests compare the Trainer with itself (resumed or not, accumulated or not), which a wrong recipe
    passes. One batch holds every example, so both loops see the same batch at each step; a large
    weight decay and a max_grad_norm below the gradients' norm make each ingredient count."""
    import copy

    lr, weight_decay, max_grad_norm = 1e-2, 0.5, 0.5
    torch.manual_seed(0)
    model = heads.BertForSequenceClassification(fastbert.BertConfig(**CONFIG, **NO_DROPOUT), num_labels=2)
    reference = copy.deepcopy(model)
    batches = []

    def collate(examples):
        batches.append(_collate(examples))
        return batches[-1]

    cfg = train.TrainConfig(out=tmp_path, max_steps=4, batch_size=12, lr=lr, weight_decay=weight_decay,
                            warmup_ratio=0.3, max_grad_norm=max_grad_norm, progress=False, save_every=10**9)
    trainer = train.Trainer(model, _features(12), collate, cfg)
    lrs = []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: lrs.append([g["lr"] for g in opt.param_groups]))
    trainer.train()
    # 4 steps, int(0.3 * 4) = 1 warm-up step: factor 1/2, then (4 - step) / 3 (transformers' rounding up
    # to 2 warm-up steps, or its factor step / warmup_steps, would start at 0)
    factors = [1 / 2, 1, 2 / 3, 1 / 3]
    assert len(batches) == len(lrs) == 4
    assert lrs == [[pytest.approx(lr * f, rel=1e-12)] * 2 for f in factors]

    exempt = {n for n, _ in reference.named_parameters() if n.endswith("bias") or "norm" in n}
    assert exempt >= {"bert.embeddings.norm.weight", "bert.layers.1.ffn_norm.weight", "classifier.bias"}
    params = dict(reference.named_parameters())
    optimizer = torch.optim.AdamW([{"params": [p for n, p in params.items() if n not in exempt], "weight_decay": weight_decay},
                                   {"params": [p for n, p in params.items() if n in exempt], "weight_decay": 0.0}], lr=lr,
                                  fused=True)   # the Trainer's AdamW on the CPU (its for-loop rounds otherwise)
    reference.train()
    for batch, factor in zip(batches, factors):
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        reference(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
    for (name, ours), theirs in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("scaled", [False, True], ids=["fp32", "grad_scaler"])
def test_gradients_reach_the_optimizer_clipped_to_max_grad_norm(tmp_path, scaled):
    """The optimizer sees gradients of global norm max_grad_norm where the raw ones are larger (far
    larger here). With fp16's GradScaler the clip must come after unscale_: clipping the scaled
    gradients (65536 times too large) leaves max_grad_norm / 65536 once they are unscaled."""
    t = _trainer(tmp_path, max_steps=3, max_grad_norm=1e-3, save_every=None)
    if scaled:
        t.scaler = torch.amp.GradScaler("cpu")   # the CUDA scaler's logic, on the CPU
    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    t.optimizer.register_step_pre_hook(record)
    t.train()
    assert norms == [pytest.approx(1e-3, rel=1e-3)] * 3


def test_resume_refuses_code_even_where_torch_would_unpickle_it(tmp_path, monkeypatch):
    """weights_only=True must be passed, not left to torch's default: the default is False before torch
    2.6, and TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns it off in any version, so a trainer_state.pt with
    code in its pickle would run that code on resume."""
    _trainer(tmp_path).train(stop_after_step=3)
    path = tmp_path / (tmp_path / "latest").read_text().strip() / "trainer_state.pt"
    torch.save({"step": 3, "payload": print}, path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(ValueError, match="could not be loaded with weights_only=True"):
        _trainer(tmp_path).resume()


def test_weights_made_non_finite_by_the_last_update_are_not_saved(tmp_path):
    """The loss is checked before each update; the update before a checkpoint is followed by no loss, so
    NaN weights from it were written as a good checkpoint (and refused only when loaded)."""
    trainer = _trainer(tmp_path, save_every=3)
    updates = []

    def poison_the_third_update(optimizer, args, kwargs):
        updates.append(1)
        if len(updates) == 3:
            with torch.no_grad():
                trainer.model.head.weight[0, 0] = float("nan")

    trainer.optimizer.register_step_post_hook(poison_the_third_update)
    with pytest.raises(FloatingPointError, match=r"weights became non-finite at step 3 \(classifier.weight\)"):
        trainer.train()
    assert not any(p.name.startswith(("checkpoint-", ".staging")) for p in tmp_path.iterdir())


def test_a_collate_without_attention_mask_trains(tmp_path):
    """The model takes attention_mask=None (every token real); the Trainer's token count read the
    mask and failed with a bare KeyError."""
    def collate_unpadded(examples):
        batch = _collate(examples)
        assert bool(batch.pop("attention_mask").all())  # one length: nothing padded
        return batch

    generator = torch.Generator().manual_seed(0)
    features = [{"input_ids": torch.randint(1, 64, (6,), generator=generator), "label": i % 2} for i in range(8)]
    torch.manual_seed(0)
    model = heads.BertForSequenceClassification(fastbert.BertConfig(**CONFIG), num_labels=2)
    cfg = train.TrainConfig(out=tmp_path, max_steps=2, batch_size=4, lr=1e-3, progress=False)
    before = model.classifier.weight.detach().clone()
    summary = train.Trainer(model, features, collate_unpadded, cfg).train()
    assert summary["tokens_per_s"] > 0 and not torch.equal(before, model.classifier.weight)


def test_a_folder_that_cannot_be_locked_still_trains(tmp_path, monkeypatch):
    """NFS without lockd answers flock with ENOLCK: training died before its first step there."""
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="cannot lock .*No locks available"):
        assert _trainer(tmp_path).train(stop_after_step=1) == {"stopped_at_step": 1}


def _scored_trainer(out, scores, **overrides):
    """A Trainer whose evaluation gives epoch e the score scores[e] and remembers the weights it scored."""
    scored_weights, holder = {}, []

    def evaluate(model):
        scored_weights[holder[0].epoch] = {k: v.clone() for k, v in model.state_dict().items()}
        return {"accuracy": scores[holder[0].epoch], "f1": 0.0}

    torch.manual_seed(0)
    model = heads.BertForSequenceClassification(fastbert.BertConfig(**CONFIG), num_labels=2)
    cfg = train.TrainConfig(out=out, **{**dict(epochs=len(scores), batch_size=8, lr=1e-3, progress=False,
                                               keep_best="accuracy"), **overrides})
    features = _features()
    holder.append(train.Trainer(model, features, _collate, cfg, evaluate, lengths=[len(f["input_ids"]) for f in features]))
    holder[0].scored_weights = scored_weights
    return holder[0]


def _checkpoints(out):
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))


@pytest.mark.parametrize("save_every", [None, 2], ids=["each_epoch", "every_2_steps"])
def test_keep_best_keeps_the_best_epochs_checkpoint(tmp_path, save_every):
    """The best epoch's checkpoint outlives later saves (every 2 steps: it is saved at its epoch's end
    even off that rhythm); a NaN score (a correlation of constant predictions) is never the best."""
    trainer = _scored_trainer(tmp_path / "run", [0.5, float("nan"), 0.9, 0.7, 0.9], save_every=save_every)
    summary = trainer.train()   # 5 batches an epoch: steps 5, 10, 15, 20, 25 end the epochs
    assert summary["best"]["epoch"] == 3 and summary["best"]["step"] == 15      # the earlier of the two 0.9
    assert trainer.best_checkpoint() == tmp_path / "run" / "checkpoint-15"
    assert _checkpoints(tmp_path / "run") == [15, 25 if save_every is None else 24]
    kept = heads.BertForSequenceClassification.from_pretrained(tmp_path / "run" / "checkpoint-15").state_dict()
    for name, weight in trainer.scored_weights[2].items():
        assert torch.equal(kept[name], weight), name


def test_keep_best_survives_an_interruption(tmp_path):
    """Resumed after the best epoch, the run keeps that checkpoint (its history says which it is) and
    deletes the one it no longer needs."""
    scores = [0.5, 0.9, 0.7, 0.6]
    whole = _scored_trainer(tmp_path / "whole", scores)
    whole.train()
    first = _scored_trainer(tmp_path / "resumed", scores)
    first.train(stop_after_step=12)
    assert _checkpoints(tmp_path / "resumed") == [10]
    again = _scored_trainer(tmp_path / "resumed", scores)
    assert again.resume() and again.best_checkpoint() == tmp_path / "resumed" / "checkpoint-10"
    assert again.train()["best"]["step"] == 10
    assert _checkpoints(tmp_path / "resumed") == _checkpoints(tmp_path / "whole") == [10, 20]


def test_a_resume_keeping_the_best_by_a_metric_its_evaluations_lack_is_refused(tmp_path):
    """A checkpoint whose evaluations lack the keep_best metric (a tagging run from before entity_f1
    became its default; found by a review helper): its evaluations were silently no candidates, and
    the first new one deleted the kept best. A metric they hold resumes."""
    first = _scored_trainer(tmp_path / "run", [0.5, 0.9, 0.7, 0.6])
    first.train(stop_after_step=12)
    with pytest.raises(ValueError, match=r"keeping the best by 'entity_f1': its evaluations hold accuracy, f1; "):
        _scored_trainer(tmp_path / "run", [0.5, 0.9, 0.7, 0.6], keep_best="entity_f1").resume()
    assert _checkpoints(tmp_path / "run") == [10]                             # nothing deleted or loaded
    assert _scored_trainer(tmp_path / "run", [0.5, 0.9, 0.7, 0.6], keep_best="f1").resume()


def test_keep_best_needs_a_metric_the_evaluation_gives(tmp_path):
    with pytest.raises(ValueError, match="keep_best 'pearson' is not one of the evaluation's metrics \\['accuracy', 'f1'\\]"):
        _scored_trainer(tmp_path / "run", [0.5], keep_best="pearson").train()
    with pytest.raises(ValueError, match="keep_best='accuracy' needs an evaluate function"):
        _trainer(tmp_path / "other", keep_best="accuracy")


def _step_scored_trainer(out, score_of_step, **overrides):
    """A Trainer whose evaluation at step s scores score_of_step(s)."""
    holder = []
    torch.manual_seed(0)
    model = heads.BertForSequenceClassification(fastbert.BertConfig(**CONFIG), num_labels=2)
    cfg = train.TrainConfig(out=out, **{**dict(epochs=2, batch_size=8, lr=1e-3, progress=False, eval_every=2), **overrides})
    features = _features()
    holder.append(train.Trainer(model, features, _collate, cfg, lambda m: {"accuracy": score_of_step(holder[0].step)},
                                lengths=[len(f["input_ids"]) for f in features]))
    return holder[0]


def test_eval_every_evaluates_inside_epochs_without_changing_the_training(tmp_path):
    """Every 2 steps of 5-step epochs, plus each epoch's end (its last step is not evaluated twice);
    "epoch" is the fraction done, as transformers logs it. The weights are bitwise those of a run that
    never evaluated: evaluation draws nothing from the generators dropout uses."""
    evaluated = _step_scored_trainer(tmp_path / "evaluated", lambda step: step / 100)
    evaluated.train()
    assert [(r["epoch"], r["step"], r["accuracy"]) for r in evaluated.history] == [
        (0.4, 2, 0.02), (0.8, 4, 0.04), (1, 5, 0.05), (1.2, 6, 0.06), (1.6, 8, 0.08), (2, 10, 0.1)]
    plain = _trainer(tmp_path / "plain", save_every=None)
    plain.train()
    _assert_same_weights(plain.model, evaluated.model)


def _assert_same_weights(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


def test_eval_every_resumes_exactly_and_keeps_the_best_evaluation_inside_an_epoch(tmp_path):
    """The best score comes at step 4, inside the first epoch: its checkpoint is written then (save_every
    is 3) and kept. A run interrupted after step 7 resumes from checkpoint-6 with the same history and
    ends with the same weights and checkpoints as one that never stopped."""
    score = {2: 0.5, 4: 0.9, 5: 0.6, 6: 0.7, 8: 0.8, 10: 0.85}.get
    settings = dict(save_every=3, keep_best="accuracy")
    whole = _step_scored_trainer(tmp_path / "whole", score, **settings)
    summary = whole.train()
    assert summary["best"]["step"] == 4 and whole.best_checkpoint() == tmp_path / "whole" / "checkpoint-4"
    assert _checkpoints(tmp_path / "whole") == [4, 9]
    first = _step_scored_trainer(tmp_path / "resumed", score, **settings)
    first.train(stop_after_step=7)
    again = _step_scored_trainer(tmp_path / "resumed", score, **settings)
    assert again.resume() and again.step == 6
    assert again.train()["best"] == summary["best"]
    assert again.history == whole.history
    _assert_same_weights(whole.model, again.model)
    assert _checkpoints(tmp_path / "resumed") == [4, 9]


@pytest.mark.parametrize("eval_every", [None, 2], ids=["epochs", "inside_epochs"])
def test_early_stop_ends_the_run_after_that_many_evaluations_without_a_better_score(tmp_path, eval_every):
    """Patience 2: the best score at step 4 (inside_epochs) or 10 (epochs), then two evaluations without a
    better one (an equal one is not better) end the run there, the rest of the schedule unrun. A run
    interrupted before that and resumed stops at the same step with the same history."""
    if eval_every:
        score = {2: 0.5, 4: 0.9, 5: 0.9, 6: 0.7}.get
        stop, best = 6, 4
    else:
        score = {5: 0.5, 10: 0.9, 15: 0.9, 20: 0.8}.get
        stop, best = 20, 10
    settings = dict(epochs=6, eval_every=eval_every, keep_best="accuracy", early_stop=2, save_every=3)
    whole = _step_scored_trainer(tmp_path / "whole", score, **settings)
    summary = whole.train()
    assert summary["stopped_early_at_step"] == stop == whole.step and summary["best"]["step"] == best
    assert whole.history[-1]["step"] == stop and whole.best_checkpoint().is_dir()
    first = _step_scored_trainer(tmp_path / "resumed", score, **settings)
    first.train(stop_after_step=stop - 1)
    again = _step_scored_trainer(tmp_path / "resumed", score, **settings)
    assert again.resume() and again.train()["stopped_early_at_step"] == stop
    assert again.history == whole.history
    _assert_same_weights(whole.model, again.model)


def test_early_stop_needs_keep_best(tmp_path):
    with pytest.raises(ValueError, match="early_stop needs keep_best"):
        train.TrainConfig(out=tmp_path, early_stop=2)


def test_a_run_that_ends_on_schedule_is_not_reported_as_stopped_early(tmp_path):
    """early_stop=1, scores 0.9 then 0.5: the last evaluation ends the schedule anyway; the CLI printed
    'stopped early at step 10 of 10' (found by a review helper)."""
    trainer = _scored_trainer(tmp_path / "run", [0.9, 0.5], early_stop=1)
    summary = trainer.train()
    assert trainer.step == trainer.total_steps == 10 and "stopped_early_at_step" not in summary


def test_max_steps_inside_an_epoch_records_the_fraction_done(tmp_path):
    """max_steps=8 of 5-step epochs: the last record is at 1.6 epochs, as the evaluations inside epochs
    say, not 2."""
    trainer = _step_scored_trainer(tmp_path / "run", lambda s: s / 100, max_steps=8, keep_best="accuracy")
    trainer.train()
    assert [(r["step"], r["epoch"]) for r in trainer.history] == [(2, 0.4), (4, 0.8), (5, 1), (6, 1.2), (8, 1.6)]


def test_a_best_checkpoint_goes_once_a_run_resumed_without_keep_best_saves_again(tmp_path):
    """keep_best kept checkpoint-10 beside checkpoint-15; resumed without keep_best, the saves deleted
    only `latest`'s predecessor, so checkpoint-10 stayed for good: the state now names what it kept."""
    out = tmp_path / "run"
    _scored_trainer(out, [0.5, 0.9, 0.1, 0.1, 0.1]).train(stop_after_step=16)
    assert _checkpoints(out) == [10, 15]
    again = _scored_trainer(out, [0.5, 0.9, 0.1, 0.1, 0.1], keep_best=None)
    assert again.resume()
    again.train()
    assert _checkpoints(out) == [25]


def test_warmup_steps_overrides_the_ratio(tmp_path):
    """warmup_steps=3 of 10 steps (the ratio's 0.1 would give 1): the lr climbs for 3 steps, then falls
    to 0; 0 is no warm-up; a resume with another count is refused (it bends the curve)."""
    trainer = _trainer(tmp_path / "run", warmup_steps=3)
    lrs = []
    for _ in range(trainer.total_steps):
        lrs.append(trainer.scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.scheduler.step()
    assert lrs[:4] == pytest.approx([1e-3 / 4, 2e-3 / 4, 3e-3 / 4, 1e-3]) and lrs[4] < 1e-3 and lrs[-1] > 0
    none = _trainer(tmp_path / "none", warmup_steps=0)
    assert none.scheduler.get_last_lr()[0] == pytest.approx(1e-3)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0, got -1"):
        train.TrainConfig(out=tmp_path, warmup_steps=-1)
    _trainer(tmp_path / "resumed").train(stop_after_step=3)
    with pytest.raises(ValueError, match="warmup_steps=None there, 3 now"):
        _trainer(tmp_path / "resumed", warmup_steps=3).resume()


def test_cosine_and_constant_schedules_after_the_warm_up():
    """cosine: transformers' get_cosine_schedule_with_warmup after the same warm-up (half a period to 0);
    constant: the peak kept. Compared factor by factor over 10 steps with 2 of warm-up."""
    transformers = pytest.importorskip("transformers")

    def factors(make):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make(opt)
        out = []
        for _ in range(10):
            out.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        return out

    cosine = factors(lambda opt: train.linear_warmup_decay(opt, 2, 10, "cosine"))
    theirs = factors(lambda opt: transformers.get_cosine_schedule_with_warmup(opt, 2, 10))
    assert cosine[:2] == pytest.approx([1 / 3, 2 / 3]) and cosine[2:] == pytest.approx(theirs[2:])
    assert factors(lambda opt: train.linear_warmup_decay(opt, 2, 10, "constant"))[2:] == [1.0] * 8
    with pytest.raises(ValueError, match="schedule must be one of"):
        train.TrainConfig(out="x", schedule="step")


@pytest.mark.parametrize("override", [{"schedule": "cosine"}, {"warmup_steps": 5}, {"schedule": "constant"}])
def test_a_checkpoint_from_before_the_schedule_settings_resumes_only_under_its_schedule(tmp_path, override):
    """A checkpoint written before warmup_steps and schedule existed ran linear with the ratio's warm-up:
    it resumes under that, and another schedule is refused (it resumed silently; found by a review helper)."""
    import json

    _trainer(tmp_path / "run").train(stop_after_step=3)
    path = tmp_path / "run" / "checkpoint-3" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    run = json.loads(state["run"])
    del run["warmup_steps"], run["schedule"]
    state["run"] = json.dumps(run)
    torch.save(state, path)
    assert _trainer(tmp_path / "run").resume()
    with pytest.raises(ValueError, match="cannot resume from"):
        _trainer(tmp_path / "run", **override).resume()


def test_adam_betas_and_eps_reach_the_optimizer_and_a_resume_must_match(tmp_path):
    trainer = _trainer(tmp_path / "run", adam_betas=(0.9, 0.98), adam_eps=1e-6)
    assert all(g["betas"] == (0.9, 0.98) and g["eps"] == 1e-6 for g in trainer.optimizer.param_groups)
    trainer.train(stop_after_step=3)
    with pytest.raises(ValueError, match=r"adam_betas=\[0.9, 0.98\] there, \[0.9, 0.999\] now"):
        _trainer(tmp_path / "run").resume()
    assert _trainer(tmp_path / "run", adam_betas=[0.9, 0.98], adam_eps=1e-6).resume()
    for bad in ((0.9,), (0.9, 1.0), (0.9, -0.1), "0.9 0.98"):
        with pytest.raises(ValueError, match="adam_betas must be two numbers in \\[0, 1\\)"):
            train.TrainConfig(out=tmp_path, adam_betas=bad)
    with pytest.raises(ValueError, match="adam_eps must be finite and > 0"):
        train.TrainConfig(out=tmp_path, adam_eps=0.0)


def test_layer_lr_decay_groups_follow_the_layers_depths():
    """decay 0.8 over 2 layers: head and pooler at lr, layer 1 at 0.8 lr, layer 0 at 0.64 lr, the
    embeddings at 0.512 lr; weight decay still only on matrices; every parameter in one group. The
    names of transformers' BERT give the same depths; ELECTRA-small's embedding projection is an
    embedding (it trained at the head's lr); a frozen top layer moves no other layer's depth."""
    transformers = pytest.importorskip("transformers")
    model = heads.BertForSequenceClassification(fastbert.BertConfig(**CONFIG), num_labels=2)
    groups = train.parameter_groups(model, 0.01, lr=1e-3, layer_lr_decay=0.8)
    names = {id(p): n for n, p in model.named_parameters()}
    lr_of = {names[id(p)]: g["lr"] for g in groups for p in g["params"]}
    assert sorted(lr_of) == sorted(names.values()) and sum(len(g["params"]) for g in groups) == len(names)
    expected = {"bert.embeddings.word.weight": 0.512e-3, "bert.embeddings.norm.bias": 0.512e-3,
                "bert.layers.0.attention.query.weight": 0.64e-3, "bert.layers.1.ffn_norm.weight": 0.8e-3,
                "bert.pooler.weight": 1e-3, "classifier.bias": 1e-3}
    assert {k: lr_of[k] for k in expected} == pytest.approx(expected, rel=1e-12)
    for g in groups:
        exempt = [names[id(p)].endswith("bias") or "norm" in names[id(p)] for p in g["params"]]
        assert set(exempt) == {g["weight_decay"] == 0.0}
    assert train.parameter_groups(model, 0.01, lr=1e-3) == train.parameter_groups(model, 0.01)   # 1.0: two groups
    hf = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32))
    depths = train.layer_depths(hf)
    assert depths["bert.embeddings.word_embeddings.weight"] == 0 and depths["bert.encoder.layer.2.output.dense.bias"] == 3
    assert depths["bert.pooler.dense.weight"] == depths["classifier.weight"] == 4
    with pytest.raises(ValueError, match="needs a model whose parameter names number its layers"):
        train.parameter_groups(torch.nn.Linear(2, 2), 0.01, lr=1e-3, layer_lr_decay=0.8)
    electra = transformers.ElectraForSequenceClassification(transformers.ElectraConfig(
        vocab_size=64, embedding_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32))
    depths = train.layer_depths(electra)
    assert depths["electra.embeddings_project.weight"] == depths["electra.embeddings.word_embeddings.weight"] == 0
    assert depths["classifier.out_proj.weight"] == 3
    for p in hf.bert.encoder.layer[2].parameters():
        p.requires_grad_(False)
    frozen = train.layer_depths(hf)
    assert "bert.encoder.layer.2.output.dense.bias" not in frozen and frozen["classifier.weight"] == 4
    assert frozen["bert.encoder.layer.1.output.dense.bias"] == 2


def test_layer_lr_decay_scales_each_groups_schedule_and_a_resume_must_match(tmp_path):
    """Every group follows the one warm-up/decay curve at its own peak; a checkpoint from another
    decay (or from before the setting, meaning 1.0) is refused."""
    trainer = _trainer(tmp_path / "run", layer_lr_decay=0.5)
    lrs = []
    trainer.optimizer.register_step_pre_hook(lambda opt, args, kwargs: lrs.append([g["lr"] for g in opt.param_groups]))
    trainer.train(stop_after_step=4)
    peaks = [g["initial_lr"] for g in trainer.optimizer.param_groups]
    assert sorted(set(peaks)) == pytest.approx([1e-3 * 0.5 ** k for k in (3, 2, 1, 0)])
    for step in lrs:
        assert [lr / peak for lr, peak in zip(step, peaks)] == pytest.approx([step[0] / peaks[0]] * len(peaks))
    assert len({round(s[0] / peaks[0], 12) for s in lrs}) == len(lrs) == 4           # the schedule moved
    with pytest.raises(ValueError, match="layer_lr_decay=0.5 there, 1.0 now"):
        _trainer(tmp_path / "run").resume()
    assert _trainer(tmp_path / "run", layer_lr_decay=0.5).resume()
    for bad in (0.0, 1.5, math.inf, math.nan):
        with pytest.raises(ValueError, match="layer_lr_decay must be in \\(0, 1\\]"):
            train.TrainConfig(out=tmp_path, layer_lr_decay=bad)
    with pytest.raises(TypeError, match="layer_lr_decay must be a number"):
        train.TrainConfig(out=tmp_path, layer_lr_decay="0.8")


def test_the_guess_of_loss_terms_under_torchrun_follows_the_seed_not_the_callers_generators(tmp_path):
    """A collate that draws (label masking) measured the guess from whatever state the generators
    were in: a resumed process guessed otherwise, and its run was not bitwise the first one's (found
    by a review helper). Measured under the seed now, and the caller's generators are put back."""
    import random

    import numpy as np

    def masking_collate(features):
        batch = _collate(features)
        batch["labels"] = torch.where(torch.tensor([random.random() < np.random.rand() for _ in features]),
                                      batch["labels"], -100)
        return batch

    guesses = []
    for outside in (1, 2):
        random.seed(outside), np.random.seed(outside), torch.manual_seed(outside)
        trainer = _trainer(tmp_path / f"run{outside}")
        trainer.collate = masking_collate
        guesses.append(trainer._measure_items_per_example())
        assert (random.random(), np.random.rand()) == (random.Random(outside).random(),
                                                       np.random.RandomState(outside).rand())
    assert guesses[0] == guesses[1] and 0 < guesses[0] < 1


def _log(out):
    import json

    return [json.loads(line) for line in (out / train.Trainer.LOG_NAME).read_text().splitlines()]


def test_log_every_writes_the_mean_loss_lr_and_grad_norm_and_a_resume_rewrites_the_lines_past_its_step(tmp_path):
    """log_every=2 over 10 steps: a line at steps 2, 4, ..., 10, each with the mean loss of its two steps
    (the epochs' mean losses, 5 steps each, say the same sum), the learning rate the schedule gives the
    next step, a finite gradient norm. Interrupted at step 6 with lines past it (one cut short), the
    resumed run keeps steps 2-6 and writes 8 and 10 as the uninterrupted run did."""
    import json

    whole = _trainer(tmp_path / "whole", log_every=2)
    whole.train()
    lines = _log(tmp_path / "whole")
    assert [line["step"] for line in lines] == [2, 4, 6, 8, 10] and lines[-1]["epoch"] == 2
    assert sum(line["loss"] for line in lines) * 2 == pytest.approx(5 * sum(r["train_loss"] for r in whole.history), rel=1e-9)
    sched = train.linear_warmup_decay(torch.optim.SGD([torch.zeros(1)], lr=1e-3), int(0.1 * 10), 10)
    factors = [sched.lr_lambdas[0](step) for step in range(11)]
    assert [line["lr"] for line in lines] == pytest.approx([1e-3 * factors[s] for s in (2, 4, 6, 8, 10)], rel=1e-12)
    assert all(0 < line["grad_norm"] < math.inf and line["tokens_per_s"] > 0 for line in lines)

    _trainer(tmp_path / "resumed", log_every=2).train(stop_after_step=6)
    log = tmp_path / "resumed" / train.Trainer.LOG_NAME
    log.write_text(log.read_text() + json.dumps({"step": 8, "loss": 99.0}) + "\n" + '{"step": 9, "lo')
    again = _trainer(tmp_path / "resumed", log_every=2)
    assert again.resume()
    again.train()
    resumed = _log(tmp_path / "resumed")
    assert [line["step"] for line in resumed] == [2, 4, 6, 8, 10]
    for a, b in zip(resumed, lines):
        assert {k: a[k] for k in ("step", "epoch", "loss", "lr", "grad_norm")} == \
            {k: b[k] for k in ("step", "epoch", "loss", "lr", "grad_norm")}
    _trainer(tmp_path / "resumed", log_every=5).train()                     # a fresh run there: its lines only
    assert [line["step"] for line in _log(tmp_path / "resumed")] == [5, 10]
    _trainer(tmp_path / "resumed").train()                                   # and without a log: none
    assert not (tmp_path / "resumed" / train.Trainer.LOG_NAME).exists()
    with pytest.raises(ValueError, match="log_every must be >= 1, got 0"):
        train.TrainConfig(out=tmp_path, log_every=0)


def test_a_log_line_after_a_resume_between_lines_averages_every_step_since_the_last_line(tmp_path):
    """Checkpoints every 3 steps, lines every 4: resumed at step 6, the line at step 8 averaged steps 7-8
    only (found by a review helper); the checkpoint keeps the losses since the last line."""
    whole = _trainer(tmp_path / "whole", log_every=4)
    whole.train()
    _trainer(tmp_path / "resumed", log_every=4).train(stop_after_step=6)
    again = _trainer(tmp_path / "resumed", log_every=4)
    assert again.resume()
    again.train()
    assert [(line["step"], line["loss"]) for line in _log(tmp_path / "resumed")] == \
        [(line["step"], line["loss"]) for line in _log(tmp_path / "whole")] != []


def test_stop_after_a_step_already_passed_trains_nothing(tmp_path):
    """Resumed at step 6, stop_after_step=3 (or 6) trained step 7 (found by a fuzzing helper)."""
    _trainer(tmp_path / "run").train(stop_after_step=6)
    for stop in (3, 6):
        again = _trainer(tmp_path / "run")
        assert again.resume() and again.train(stop_after_step=stop) == {"stopped_at_step": 6} and again.step == 6


def test_the_log_gives_the_heads_lr_tok_s_since_the_last_line_and_no_norm_without_a_gradient(tmp_path):
    """With layer decay the lr logged is the head's (the highest); tok/s is over the interval since the
    last line, not the run; a step that ran no backward has no gradient norm (not the last step's)."""
    import json

    _trainer(tmp_path / "run", log_every=1, layer_lr_decay=0.5, max_steps=2).train()
    sched = train.linear_warmup_decay(torch.optim.SGD([torch.zeros(1)], lr=1e-3), 0, 2)
    assert _log(tmp_path / "run")[0]["lr"] == pytest.approx(1e-3 * sched.lr_lambdas[0](1), rel=1e-12)
    trainer = _trainer(tmp_path / "other", log_every=1)
    (tmp_path / "other").mkdir()
    trainer._log_step(0, 10.0, 1000)
    trainer._log_step(0, 12.0, 1400)
    lines = (tmp_path / "other" / train.Trainer.LOG_NAME).read_text().splitlines()
    assert [json.loads(line)["tokens_per_s"] for line in lines] == [100.0, 200.0]
    trainer._grad_norm = torch.tensor(3.0)
    trainer._optimizer_step()                        # no parameter has a gradient: no update, no norm
    assert trainer._grad_norm is None


def test_keep_best_resumes_from_a_checkpoint_of_a_run_that_never_evaluated(tmp_path):
    """Training records alone (no dev scores yet) are no evaluations lacking the metric."""
    _trainer(tmp_path / "run").train(stop_after_step=6)
    again = _scored_trainer(tmp_path / "run", [0.5, 0.9], save_every=3)
    assert again.resume()
    again.train()
    assert again.best_record()["accuracy"] == 0.9


def test_a_log_that_cannot_be_written_warns_and_training_goes_on(tmp_path):
    trainer = _trainer(tmp_path / "run", log_every=2, save_every=None)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / train.Trainer.LOG_NAME).mkdir()          # a folder where the log goes: open() fails
    with pytest.warns(RuntimeWarning, match="training goes on without the log"):
        summary = trainer.train()
    assert summary["steps"] == 10


def test_a_resume_into_a_model_of_other_shapes_is_refused_before_anything_loads(tmp_path):
    """A head of another size (another label set): load_state_dict's RuntimeError came after the
    optimizer state was loaded, its moments of the old shapes."""
    _trainer(tmp_path / "run").train(stop_after_step=3)
    torch.manual_seed(0)
    model = heads.BertForSequenceClassification(fastbert.BertConfig(**CONFIG), num_labels=3)
    features = _features()
    trainer = train.Trainer(model, features, _collate, train.TrainConfig(out=tmp_path / "run", epochs=2, batch_size=8,
                                                                        lr=1e-3, save_every=3, progress=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"its model is not this run's model \(classifier.weight \(2, 32\) there, "
                                         r"\(3, 32\) here"):
        trainer.resume()
    assert trainer.step == 0 and not trainer.optimizer.state
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("held", [[], [0.71, 0.69, 0.7]])
def test_a_checkpoint_holding_the_log_losses_as_a_list_resumes(tmp_path, held):
    """Checkpoints of early stop 30 held the list of losses since the last log line (found by a review
    helper: [] and three losses crashed at the next step, two were read as a sum and a count)."""
    import json

    _trainer(tmp_path / "run", log_every=4).train(stop_after_step=6)
    path = tmp_path / "run" / "checkpoint-6" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    state["log_losses"] = json.dumps(held)
    torch.save(state, path)
    again = _trainer(tmp_path / "run", log_every=4)
    assert again.resume() and again._log_losses == (sum(held, 0.0), len(held))
    again.train()
    line = [entry for entry in _log(tmp_path / "run") if entry["step"] == 8][0]
    assert line["loss"] > 0
